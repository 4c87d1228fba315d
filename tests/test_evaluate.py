"""pipeline.evaluate on a local Ray: sharded scores, reports (local and S3), reported problems."""
from __future__ import annotations

import csv
import json
import logging
import warnings
from pathlib import Path

import fsspec
import numpy as np
import py_sod_metrics as psm
import pytest
from PIL import Image

from selfment_dist.evaluation.metrics import SCORE_KEYS, sod_scores
from selfment_dist.pipeline._internal.ray_runtime import ensure_ray
from selfment_dist.pipeline.evaluate import list_images, run_evaluate
from selfment_dist.evaluation.reports import STANDARD_BENCHMARKS, benchmark_uris, benchmarks_table

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SOD_KEYS = ("max_fm", "mean_fm", "adp_fm", "wfm", "sm", "max_em", "mean_em", "adp_em", "mae")


def synthetic_pair(rng, shape=(36, 48)):
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    cy, cx, r = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w, rng.uniform(0.2, 0.4) * min(h, w)
    d = np.hypot(yy - cy, xx - cx) / r
    gt = np.where(d < 1, 255, 0).astype(np.uint8)
    pred = np.clip(255 / (1 + np.exp(4 * (d - 1 + rng.normal(0, 0.2)))) + rng.normal(0, 20, shape), 0, 255)
    return pred.astype(np.uint8), gt


def write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def write_dataset(root: Path, n: int, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``root/preds/<key>.png`` and ``root/masks/<key>.png``; some keys in a subfolder."""
    rng = np.random.default_rng(seed)
    pairs = {}
    for i in range(n):
        key = f"sub/img{i:03d}" if i % 4 == 0 else f"img{i:03d}"
        pred, gt = synthetic_pair(rng)
        write_png(root / "preds" / f"{key}.png", pred)
        write_png(root / "masks" / f"{key}.png", gt)
        pairs[key] = (pred, gt)
    return pairs


def pysodmetrics_on_files(pred_dir: Path, mask_dir: Path) -> dict:
    """Single-process pysodmetrics over the same files, read independently, in key order, fed
    float32 arrays as the official runner (Selfment eval/metrics.py) feeds them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fm = psm.Fmeasure()
    wfm, sm, em, mae = psm.WeightedFmeasure(), psm.Smeasure(), psm.Emeasure(), psm.MAE()
    for mask_path in sorted(mask_dir.rglob("*.png"), key=lambda p: p.relative_to(mask_dir).as_posix()):
        gt = np.array(Image.open(mask_path).convert("L"))
        pred = np.array(Image.open(pred_dir / mask_path.relative_to(mask_dir)).convert("L"))
        for m in (fm, wfm, sm, em, mae):
            m.step(pred=pred.astype(np.float32), gt=gt.astype(np.float32))
    f, e = fm.get_results()["fm"], em.get_results()["em"]
    return {"max_fm": f["curve"].max(), "mean_fm": f["curve"].mean(), "adp_fm": f["adp"],
            "wfm": wfm.get_results()["wfm"], "sm": sm.get_results()["sm"], "max_em": e["curve"].max(),
            "mean_em": e["curve"].mean(), "adp_em": e["adp"], "mae": mae.get_results()["mae"]}


def test_sharded_run_matches_single_process_pysodmetrics(ray_local, tmp_path, caplog):
    pairs = write_dataset(tmp_path, 14)
    with caplog.at_level(logging.INFO, logger="selfment_dist.pipeline.evaluate"):
        result = run_evaluate(predictions=str(tmp_path / "preds"), masks=str(tmp_path / "masks"),
                              output=str(tmp_path / "out"), name="synth", num_shards=3)
    assert "in 3 Ray tasks" in caplog.text
    entry = result["datasets"]["synth"]
    assert entry["n_images"] == 14
    assert not any(entry["problems"]["counts"].values())
    ref = pysodmetrics_on_files(tmp_path / "preds", tmp_path / "masks")
    for key in SOD_KEYS:
        assert entry["scores"][key] == pytest.approx(ref[key], abs=1e-9), key
    keys = sorted(pairs)
    expected = sod_scores([pairs[k][0] for k in keys], [pairs[k][1] for k in keys])
    assert entry["scores"] == expected  # bit for bit: records merged in sorted key order

    out = tmp_path / "out"
    assert json.loads((out / "metrics.json").read_text())["datasets"]["synth"]["scores"] == expected
    table = (out / "metrics.md").read_text()
    assert "| synth | 14 |" in table and all(k in table for k in SCORE_KEYS)
    rows = list(csv.DictReader((out / "per_image.csv").open()))
    assert [r["key"] for r in rows] == keys and {r["dataset"] for r in rows} == {"synth"}
    for kind in ("pr", "f"):
        assert (out / "plots" / f"synth_{kind}.png").read_bytes().startswith(PNG_MAGIC)


def test_problems_are_reported_not_raised(ray_local, tmp_path):
    pairs = write_dataset(tmp_path, 8, seed=1)
    preds, masks = tmp_path / "preds", tmp_path / "masks"
    write_png(preds / "orphan_pred.png", pairs["img001"][0])           # no mask
    write_png(masks / "orphan_mask.png", pairs["img001"][1])           # no prediction
    (preds / "img002.png").write_bytes(b"this is not a png")           # corrupt prediction
    (masks / "img003.png").write_bytes(PNG_MAGIC + b"\x00" * 20)       # truncated mask
    write_png(preds / "img005.png", pairs["img005"][0][::2, ::2].copy())  # half size: resized
    write_png(preds / "img006.jpg", pairs["img006"][0])                # duplicate key
    (preds / "notes.txt").write_text("ignored")                        # not an image
    write_png(preds / "__MACOSX" / "img007.png", pairs["img007"][0])  # archive litter, ignored
    write_png(preds / ".hidden.png", pairs["img007"][0])

    result = run_evaluate(predictions=str(preds), masks=str(masks), output=str(tmp_path / "out"),
                          num_shards=3)
    entry = result["datasets"]["default"]
    counts, examples = entry["problems"]["counts"], entry["problems"]["examples"]
    assert counts["missing_mask"] == 1 and examples["missing_mask"] == ["orphan_pred"]
    assert counts["missing_prediction"] == 1 and examples["missing_prediction"] == ["orphan_mask"]
    assert counts["unreadable_prediction"] == 1 and examples["unreadable_prediction"][0].startswith("img002:")
    assert counts["unreadable_mask"] == 1 and examples["unreadable_mask"][0].startswith("img003:")
    assert counts["size_mismatch"] == 1
    assert examples["size_mismatch"] == ["img005: mask 48x36 resized to the prediction's 24x18"]
    assert counts["duplicate_key"] == 1
    assert examples["duplicate_key"] == ["predictions: img006: img006.png kept, img006.jpg ignored"]
    assert "cannot identify image file 'img002.png'" in examples["unreadable_prediction"][0]
    assert counts["failed"] == 0 and counts["empty_folder"] == 0
    assert entry["n_images"] == 6  # 8 pairs minus the two unreadable ones; img005 is scored
    on_disk = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert on_disk["datasets"]["default"]["problems"] == entry["problems"]
    assert "unreadable_prediction 1" in (tmp_path / "out" / "metrics.md").read_text()
    rows = {r["key"]: r for r in csv.DictReader((tmp_path / "out" / "per_image.csv").open())}
    assert rows["img005"]["resized"] == "1" and rows["img001"]["resized"] == "0"


def test_empty_folder_and_bad_arguments(ray_local, tmp_path):
    write_dataset(tmp_path, 2)
    # A folder that is not there is a typo: one line, before anything runs or is written.
    with pytest.raises(FileNotFoundError, match="no such folder"):
        run_evaluate(predictions=str(tmp_path / "nothing"), masks=str(tmp_path / "masks"),
                     output=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    # An empty one is a dataset problem, reported.
    (tmp_path / "nothing").mkdir()
    result = run_evaluate(predictions=str(tmp_path / "nothing"), masks=str(tmp_path / "masks"),
                          output=str(tmp_path / "out"))
    entry = result["datasets"]["default"]
    assert entry["n_images"] == 0 and all(v is None for v in entry["scores"].values())
    assert entry["problems"]["counts"]["empty_folder"] == 1
    assert entry["problems"]["counts"]["missing_prediction"] == 2
    with pytest.raises(ValueError):
        run_evaluate(output=str(tmp_path / "out"))
    with pytest.raises(ValueError):
        run_evaluate(output=str(tmp_path / "out"), predictions=str(tmp_path / "preds"))
    with pytest.raises(ValueError):
        run_evaluate(output=str(tmp_path / "out"), predictions="a", masks="b", model="m",
                     benchmarks={"X": ("i", "m")})


@pytest.mark.slow
def test_s3_inputs_and_reports(ray_local, tmp_path, s3_bucket):
    bucket, options = s3_bucket
    pairs = write_dataset(tmp_path, 6, seed=2)
    fs = fsspec.filesystem("s3", **options)
    fs.put(str(tmp_path / "preds"), f"{bucket}/data/preds", recursive=True)
    fs.put(str(tmp_path / "masks"), f"{bucket}/data/masks", recursive=True)
    found, _ = list_images(f"s3://{bucket}/data/preds", options)
    assert sorted(found) == sorted(pairs)

    result = run_evaluate(predictions=f"s3://{bucket}/data/preds", masks=f"s3://{bucket}/data/masks",
                          output=f"s3://{bucket}/report", name="s3set", storage_options=options,
                          num_shards=3)
    keys = sorted(pairs)
    expected = sod_scores([pairs[k][0] for k in keys], [pairs[k][1] for k in keys])
    assert result["datasets"]["s3set"]["scores"] == expected
    assert "secret" not in json.dumps(result)  # storage options stay out of the reports
    fs.invalidate_cache()
    written = {p.split("/report/", 1)[1] for p in fs.find(f"{bucket}/report")}
    assert written == {"metrics.json", "metrics.md", "per_image.csv", "plots/s3set_pr.png",
                       "plots/s3set_f.png"}
    assert json.loads(fs.cat_file(f"{bucket}/report/metrics.json"))["datasets"]["s3set"]["scores"] == expected
    assert fs.cat_file(f"{bucket}/report/plots/s3set_pr.png").startswith(PNG_MAGIC)
    assert result["files"]["metrics.json"] == f"s3://{bucket}/report/metrics.json"


@pytest.mark.slow
def test_benchmark_mode_segments_then_evaluates(ray_local, tmp_path, monkeypatch):
    """run_segment is replaced by a fake that writes a PNG per image (the real one needs a model)."""
    calls = []
    gts = {}
    for bench, n in (("BENCH-A", 3), ("BENCH-B", 4)):
        rng = np.random.default_rng(len(bench) + n)
        for i in range(n):
            pred, gt = synthetic_pair(rng)
            write_png(tmp_path / bench / "images" / f"{i:04d}.png", pred)  # the "image" is the map
            write_png(tmp_path / bench / "masks" / f"{i:04d}.png", gt)
            gts.setdefault(bench, []).append((pred, gt))

    def fake_run_segment(model, inputs, output, *, image_size=None, storage_options=None, **kwargs):
        calls.append((model, list(inputs), output, image_size, storage_options))
        src = Path(inputs[0])
        for path in sorted(src.glob("*.png")):
            write_png(Path(output) / path.name, np.array(Image.open(path)))
        return {"images": len(list(src.glob("*.png"))), "errors": 0}

    # Segmentation itself is faked here (scores only); tests/test_pipeline_strength.py runs
    # the real segment and evaluate through the CLI.
    import selfment_dist.pipeline.segment as segment
    monkeypatch.setattr(segment, "run_segment", fake_run_segment)

    out = tmp_path / "out"
    benchmarks = {b: (str(tmp_path / b / "images"), str(tmp_path / b / "masks")) for b in gts}
    result = run_evaluate(model="memory://model", benchmarks=benchmarks, output=str(out), image_size=320)
    assert [c[2] for c in calls] == [str(out / "predictions" / b) for b in gts]
    assert all(c[0] == "memory://model" and c[3] == 320 and c[1] == [benchmarks[b][0]]
               for c, b in zip(calls, gts))
    for bench, items in gts.items():
        entry = result["datasets"][bench]
        assert entry["n_images"] == len(items)
        assert entry["scores"] == sod_scores(*zip(*items))
        assert entry["segment"] == {"images": len(items), "errors": 0}
        assert (out / "plots" / f"{bench}_pr.png").exists()
    assert "| BENCH-A | 3 |" in (out / "metrics.md").read_text()


def test_ensure_ray_keeps_a_running_ray(ray_local):
    assert ensure_ray() is False
    assert ensure_ray("127.0.0.1:1", num_cpus=1) is False  # already connected: nothing changes


def test_standard_benchmarks_table():
    assert {"ECSSD", "DUTS-TE", "DUT-OMRON", "HKU-IS", "PASCAL-S", "CAMO", "CHAMELEON", "COD10K",
            "NC4K"} <= set(STANDARD_BENCHMARKS)
    assert benchmark_uris("DUTS-TE", "s3://b/DUTS-TE") == ("s3://b/DUTS-TE/DUTS-TE-Image",
                                                             "s3://b/DUTS-TE/DUTS-TE-Mask")
    table = benchmarks_table()
    assert all(f"| {name} |" in table for name in STANDARD_BENCHMARKS)
    with pytest.raises(KeyError):
        benchmark_uris("NOPE", "/x")


def test_a_failing_task_is_reported_for_its_keys(ray_local):
    from selfment_dist.pipeline.evaluate import _shard_results

    items = [(f"k{i}", f"/nowhere/k{i}.png", f"/nowhere/m{i}.png") for i in range(4)]
    # an unknown protocol makes the task itself raise before it reaches any file
    results = [r for shard in _shard_results(items, "nope://preds", "/nowhere", name="t",
                                             storage_options=None, num_shards=2)
               for r in shard]
    assert sorted(key for key, _, _ in results) == ["k0", "k1", "k2", "k3"]
    assert all(record is None and issues[0][0] == "failed" for _, record, issues in results)
    assert "nope" in results[0][2][0][1]  # the cause, not Ray's wrapper, is reported


@pytest.mark.slow
def test_benchmark_mode_with_the_real_segment_stage(ray_local, tmp_path):
    """model → run_segment (Ray Data) → evaluation, on a random-weights backbone at 64 px."""
    torch = pytest.importorskip("torch")
    from selfment_dist.model.artifact import save_artifact
    from selfment_dist.model.backbone import build_backbone
    from selfment_dist.model.head import PatchHead
    from selfment_dist.data.synthetic import write_scenes

    backbone_name = "vit_small_patch16_224.dino"
    backbone = build_backbone(backbone_name, weights="random", image_size=64, device="cpu")
    torch.manual_seed(0)
    model = str(tmp_path / "model")
    save_artifact(model, PatchHead(backbone.embed_dim).eval(),
                  {"backbone": backbone_name, "weights": "random", "image_size": 64})
    keys = write_scenes(str(tmp_path / "SYN"), 4, seed=3, size=(40, 56))

    out = tmp_path / "out"
    result = run_evaluate(model=model, benchmarks={"SYN": (str(tmp_path / "SYN" / "images"),
                                                           str(tmp_path / "SYN" / "masks"))},
                          output=str(out), image_size=64, model_workers="tasks")
    entry = result["datasets"]["SYN"]
    assert entry["n_images"] == len(keys) and not any(entry["problems"]["counts"].values())
    assert entry["segment"]["images"] == len(keys)
    preds = [np.array(Image.open(out / "predictions" / "SYN" / f"{k}.png")) for k in sorted(keys)]
    masks = [np.array(Image.open(tmp_path / "SYN" / "masks" / f"{k}.png")) for k in sorted(keys)]
    assert all(p.shape == m.shape for p, m in zip(preds, masks))  # maps at the original size
    assert entry["scores"] == sod_scores(preds, masks)
