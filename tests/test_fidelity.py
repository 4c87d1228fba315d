"""Defaults against the official Selfment code (geshang777/Selfment), restated plainly here:
benchmark evaluation in the official runner's frame (``eval/runner.py`` + ``eval/metrics.py``,
maps written as ``inference.py`` writes them), training on every pseudo-label, and the options
that name the other variants.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import py_sod_metrics as psm
import pytest

from calibrated_head import calibrated_head
import torch
from PIL import Image

from selfment_dist.data.synthetic import make_scene
from selfment_dist.model.artifact import save_artifact
from selfment_dist.model.backbone import build_backbone, resize_square
from selfment_dist.model.maps import to_png_bytes, to_uint8
from selfment_dist.model.segmenter import Segmenter
from selfment_dist.pipeline.evaluate import run_evaluate

BACKBONE = "vit_small_patch16_dinov3.lvd1689m"
SIZE = 32  # inference size of the test artifact (2x2 grid)
EXIF_ORIENTATION = 0x0112
# Official result names → ours.
OFFICIAL_KEYS = {"IoU": "iou", "accuracy": "accuracy", "F_max": "fmax", "wFmeasure": "wfm",
                 "MAE": "mae", "Smeasure": "sm", "meanEm": "mean_em", "maxEm": "max_em",
                 "adpEm": "adp_em", "meanFm": "mean_fm", "maxFm": "max_fm", "adpFm": "adp_fm"}


# ----------------------------------------------------------------------------------------------
# The official runner, restated per image

def official_load(pred_path: Path, gt_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``load_masks_from_folder`` for one pair: float32 maps in [0, 1]; a mask whose size
    differs is resized to the prediction (PIL bilinear on its 8-bit levels, kept soft)."""
    pred = np.array(Image.open(pred_path).convert("L"), dtype=np.float32) / 255.0
    gt = np.array(Image.open(gt_path).convert("L"), dtype=np.float32) / 255.0
    if pred.shape != gt.shape:
        levels = Image.fromarray((gt * 255).astype(np.uint8))
        gt = np.array(levels.resize(pred.shape[::-1], Image.BILINEAR)) / 255.0
    return pred, gt


def official_simple(pred: np.ndarray, gt: np.ndarray) -> dict:
    """``compute_simple_metrics`` terms of one image (torch float32, as the official code)."""
    p, g = torch.from_numpy(pred).float(), torch.from_numpy(gt).float()
    gb, pb = g > 0.5, p > 0.5
    union = (gb | pb).sum().float()
    iou = 1.0 if union == 0 else float((gb & pb).sum().float() / union)
    acc = float((gb == pb).float().mean())
    thresholds = torch.arange(0, 1, 1 / 255).view(255, 1, 1)
    binary = p.unsqueeze(0) > thresholds
    tp = (binary & gb).sum(dim=(-1, -2))
    prec = tp / (binary.sum(dim=(-1, -2)) + 1e-7)
    rec = tp / (gb.sum() + 1e-7)
    b2 = 0.3 ** 2  # FMeasureTorch(beta_square=0.3) squares it again
    f = (1 + b2) * prec * rec / (b2 * prec + rec + 1e-7)
    return {"IoU": iou, "accuracy": acc, "F_max": float(f.max())}


def official_runner_scores(pairs: list[tuple[Path, Path]]) -> dict:
    """``compute_all_metrics`` over ``official_load``-ed pairs, in the given order. The biref
    classes of the official eval/metrics.py are pysodmetrics' (same prepare_data, histograms,
    S/E/weighted-F code): they get the arrays the official code builds, ``(x * 255)`` float32."""
    sums = {"IoU": 0.0, "accuracy": 0.0, "F_max": 0.0}
    fm, em, sm, mae, wfm = (psm.Fmeasure(), psm.Emeasure(), psm.Smeasure(), psm.MAE(),
                            psm.WeightedFmeasure())
    for pred_path, gt_path in pairs:
        pred, gt = official_load(pred_path, gt_path)
        for k, v in official_simple(pred, gt).items():
            sums[k] += v
        pred_arr, gt_arr = (pred * 255.0).astype(np.float32), (gt * 255.0).astype(np.float32)
        for m in (fm, em, sm, mae, wfm):
            m.step(pred=pred_arr, gt=gt_arr)
    n = len(pairs)
    e, f = em.get_results()["em"], fm.get_results()["fm"]
    return {**{k: v / n for k, v in sums.items()},
            "wFmeasure": wfm.get_results()["wfm"], "MAE": mae.get_results()["mae"],
            "Smeasure": sm.get_results()["sm"], "meanEm": float(np.mean(e["curve"])),
            "maxEm": float(np.max(e["curve"])), "adpEm": e["adp"],
            "meanFm": float(np.mean(f["curve"])), "maxFm": float(np.max(f["curve"])),
            "adpFm": f["adp"]}


def assert_official(scores: dict, official: dict) -> None:
    for theirs, ours in OFFICIAL_KEYS.items():
        assert scores[ours] == pytest.approx(official[theirs], abs=1e-6), ours


# ----------------------------------------------------------------------------------------------
# Data

def soft_map(rng, shape) -> tuple[np.ndarray, np.ndarray]:
    """A soft prediction (float in [0, 1], values away from 0 and 1: min-max scaling matters)
    and a binary mask of an ellipse."""
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    d = np.hypot((yy - rng.uniform(0.3, 0.7) * h) / (0.25 * h),
                 (xx - rng.uniform(0.3, 0.7) * w) / (0.3 * w))
    mask = np.where(d < 1, 255, 0).astype(np.uint8)
    pred = 0.05 + 0.9 / (1 + np.exp(3 * (d - 1))) + rng.normal(0, 0.05, shape)
    return np.clip(pred, 0, 1).astype(np.float32), mask


def write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(to_png_bytes(array))


def test_saved_maps_floor_like_the_official_code():
    rng = np.random.default_rng(0)
    sal = rng.uniform(0, 1, (40, 50)).astype(np.float32)
    sal[0, :4] = [0.0, 1.0, 0.5, 254.5 / 255]
    official = (sal * 255).astype(np.uint8)
    np.testing.assert_array_equal(to_uint8(sal), official)
    np.testing.assert_array_equal(np.array(Image.open(io.BytesIO(to_png_bytes(sal)))), official)
    np.testing.assert_array_equal(to_uint8(sal, "round"), np.rint(sal * 255).astype(np.uint8))
    assert (to_uint8(sal, "round") != official).any()
    with pytest.raises(ValueError, match="quantize"):
        to_uint8(sal, "ceil")


def test_evaluate_predictions_scores_like_the_official_runner(ray_local, tmp_path):
    """``evaluate --predictions``: floored soft maps read back from PNG, binary and soft masks,
    masks larger and smaller than their predictions (resized to the prediction)."""
    rng = np.random.default_rng(1)
    preds, masks = tmp_path / "preds", tmp_path / "masks"
    shapes = [((40, 56), (40, 56)), ((36, 48), (72, 96)), ((50, 40), (25, 20)),
              ((33, 45), (33, 45)), ((48, 48), (60, 52))]
    for i, (pred_shape, mask_shape) in enumerate(shapes):
        pred, mask = soft_map(rng, pred_shape)
        if mask_shape != pred_shape:
            mask = np.array(Image.fromarray(mask).resize(mask_shape[::-1], Image.NEAREST))
        if i == 3:  # a soft mask (PASCAL-S style): the metrics binarise it
            mask = (mask * rng.uniform(0.3, 1.0, mask.shape)).astype(np.uint8)
        write_png(preds / f"k{i}.png", pred)  # floor(255 p), as inference.py
        write_png(masks / f"k{i}.png", mask)
    result = run_evaluate(predictions=str(preds), masks=str(masks), output=str(tmp_path / "out"),
                          num_shards=2)
    entry = result["datasets"]["default"]
    assert entry["problems"]["counts"]["size_mismatch"] == 3
    pairs = [(preds / f"k{i}.png", masks / f"k{i}.png") for i in range(len(shapes))]
    assert_official(entry["scores"], official_runner_scores(pairs))

    other = run_evaluate(predictions=str(preds), masks=str(masks), output=str(tmp_path / "o2"),
                         resize="prediction")["datasets"]["default"]["scores"]
    assert other != entry["scores"]  # the named variant really is another frame


def _exif_jpeg(rgb: np.ndarray, orientation: int | None) -> bytes:
    buf = io.BytesIO()
    exif = Image.Exif()
    if orientation is not None:
        exif[EXIF_ORIENTATION] = orientation
    Image.fromarray(rgb).save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> str:
    """A random-weights ViT-S artifact whose head spreads its logits (maps use 0-255)."""
    backbone = build_backbone(BACKBONE, weights="random", image_size=SIZE, device="cpu")
    images = np.stack([resize_square(Image.fromarray(make_scene((5, i), size=(40, 48))[0]),
                                     SIZE) for i in range(4)])
    head = calibrated_head(backbone, images)
    uri = str(tmp_path_factory.mktemp("model") / "artifact")
    save_artifact(uri, head, {"backbone": BACKBONE, "weights": "random", "image_size": SIZE,
                              "inference_image_size": SIZE, "training": {"epochs": 0}})
    return uri


@pytest.mark.slow  # ~50 s: a segment run and a second Segmenter on 2 CPUs
def test_evaluate_model_scores_like_official_inference_and_runner(ray_local, artifact, tmp_path):
    """``evaluate --model``: images with and without an EXIF orientation, one mask of another
    size. The maps must be what inference.py writes (image as stored, no EXIF transpose, floor)
    and the scores the official runner's on those maps."""
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    stored = {"plain": (None, (40, 56)), "rot90": (6, (36, 52)), "flip": (3, (44, 40)),
              "mirror": (2, (40, 48)), "resized": (None, (32, 44))}
    for i, (key, (orientation, shape)) in enumerate(stored.items()):
        rgb, mask = make_scene((7, i), size=shape)[:2]
        (images / f"{key}.jpg").write_bytes(_exif_jpeg(rgb, orientation))
        mask = np.asarray(mask, np.uint8) * (255 if np.asarray(mask).max() <= 1 else 1)
        if key == "resized":  # the benchmark's mask at twice the size: resized to the map
            mask = np.array(Image.fromarray(mask).resize((shape[1] * 2, shape[0] * 2)))
        write_png(masks / f"{key}.png", mask)
    out = tmp_path / "report"
    result = run_evaluate(model=artifact, benchmarks={"B": (str(images), str(masks))},
                          output=str(out), batch_size=4, model_workers="tasks")
    entry = result["datasets"]["B"]
    assert entry["n_images"] == len(stored)
    assert entry["problems"]["counts"]["size_mismatch"] == 1

    # The maps, as the official inference computes and writes them.
    segmenter = Segmenter.from_artifact(artifact, device="cpu")
    pred_dir = out / "predictions" / "B"
    for key, (_, shape) in stored.items():
        with Image.open(images / f"{key}.jpg") as im:
            want = segmenter.predict(im.convert("RGB"))[0]  # Image.open: no EXIF transpose
        got = np.array(Image.open(pred_dir / f"{key}.png"))
        assert got.shape == shape, key
        np.testing.assert_array_equal(got, want, err_msg=key)

    pairs = [(pred_dir / f"{k}.png", masks / f"{k}.png") for k in sorted(stored)]
    assert_official(entry["scores"], official_runner_scores(pairs))
    assert json.loads((out / "metrics.json").read_text())["config"]["exif_orientation"] is False


# ----------------------------------------------------------------------------------------------
# Training set and numerics: the official code trains on every image, in fp32, for 1 epoch

@pytest.fixture(scope="module")
def all_flagged_labels(tmp_path_factory) -> str:
    """8 usable rows, every one flagged no_object (low confidence), and one error row."""
    from test_train import _feature_rows, write_labels

    from selfment_dist.io.schema import error_row

    rows = _feature_rows(8, seed=3)
    for row in rows:
        row.update(confidence=0.05, no_object=True)
    rows.append(error_row("broken", "/data/broken.jpg", "not an image"))
    return write_labels(tmp_path_factory.mktemp("flagged") / "labels", rows, image_size=128,
                        features=True)


def test_training_set_is_every_row_with_a_mask_by_default(all_flagged_labels):
    from selfment_dist.pipeline._internal.train_data import inspect_labels
    from selfment_dist.settings import TrainSettings

    ls = inspect_labels(all_flagged_labels)
    assert (ls.rows, ls.errors, ls.usable, ls.no_object_rows) == (9, 1, 8, 8)
    assert ls.row_filter == {"rule": "none", "threshold": None}
    with pytest.raises(ValueError, match="leaves none"):  # the explicit option still filters
        inspect_labels(all_flagged_labels, skip_no_object=True)
    defaults = TrainSettings(labels="l", output="o")
    assert (defaults.epochs, defaults.precision, defaults.skip_no_object) == (1, "auto", False)
    assert defaults.min_confidence is None and defaults.keep_fraction is None
    with pytest.raises(ValueError, match="one confidence filter"):
        TrainSettings(labels="l", output="o", skip_no_object=True, min_confidence=0.5)


@pytest.mark.slow  # ~40 s: a Ray Train run
def test_train_defaults_use_every_flagged_row_and_say_so(ray_local, all_flagged_labels,
                                                          tmp_path):
    from selfment_dist.pipeline.train import run_train

    summary = run_train(all_flagged_labels, str(tmp_path / "model"), workers=1, batch_size=4)
    assert summary["status"] == "trained" and summary["epochs"] == 1
    assert (summary["train_rows"], summary["no_object_rows"], summary["low_confidence_rows"]) \
        == (8, 8, 0)
    assert summary["images_seen"] == 8 and summary["precision"] == "fp32"
