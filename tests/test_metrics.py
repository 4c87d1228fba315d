"""selfment_dist.evaluation.metrics: pysodmetrics parity, the unsupervised-SOD protocol, exact merging."""
from __future__ import annotations

import pickle
import warnings

import numpy as np
import py_sod_metrics as psm
import pytest
import torch

from selfment_dist.evaluation.metrics import (
    SCORE_KEYS,
    image_record,
    merge_curves,
    merge_records,
    record_summary,
    resize_to,
    sod_scores,
)

SOD_KEYS = ("max_fm", "mean_fm", "adp_fm", "wfm", "sm", "max_em", "mean_em", "adp_em", "mae")


def make_pair(seed: int, shape=(48, 64)) -> tuple[np.ndarray, np.ndarray]:
    """A soft blob prediction and an elliptic mask with anti-aliased (127/128) edge values."""
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
    ry, rx = rng.uniform(0.15, 0.35) * h, rng.uniform(0.15, 0.35) * w
    d = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
    gt = np.where(d < 1, 255, 0).astype(np.uint8)
    gt[(d >= 1) & (d < 1.1)] = rng.choice([127, 128], size=int(((d >= 1) & (d < 1.1)).sum()))
    shift = rng.normal(0, 0.2, size=2)
    d2 = ((yy - cy - shift[0] * h) / ry) ** 2 + ((xx - cx - shift[1] * w) / rx) ** 2
    soft = 1 / (1 + np.exp(3 * (d2 - 1))) + rng.normal(0, 0.08, shape)
    pred = np.clip(soft * 255, 0, 255).astype(np.uint8)
    return pred, gt


def pysodmetrics_direct(preds, gts) -> dict:
    """pysodmetrics used the documented way: one step per image, get_results at the end, on
    float32 arrays as the official runner (Selfment eval/metrics.py compute_biref_metrics)
    passes them (``pred / 255 * 255`` in float32: the 8-bit values, as float32)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fm = psm.Fmeasure()
    wfm, sm, em, mae = psm.WeightedFmeasure(), psm.Smeasure(), psm.Emeasure(), psm.MAE()
    for p, g in zip(preds, gts):
        for m in (fm, wfm, sm, em, mae):
            m.step(pred=p.astype(np.float32), gt=g.astype(np.float32))
    f, e = fm.get_results(), em.get_results()["em"]
    return {
        "max_fm": f["fm"]["curve"].max(), "mean_fm": f["fm"]["curve"].mean(), "adp_fm": f["fm"]["adp"],
        "wfm": wfm.get_results()["wfm"], "sm": sm.get_results()["sm"],
        "max_em": e["curve"].max(), "mean_em": e["curve"].mean(), "adp_em": e["adp"],
        "mae": mae.get_results()["mae"],
        "p": f["pr"]["p"], "r": f["pr"]["r"],
    }


def usod_reference(preds, gts) -> dict:
    """Slow restatement of the official evaluation (Selfment ``eval/metrics.py``,
    ``compute_simple_metrics``): float32 maps in [0, 1], per image IoU and accuracy at 0.5 and the
    max F over ``arange(0, 1, 1/255)``; each summed over images and divided by their number.
    ``fmax_curve`` is the other figure (max of the image-averaged curve), for comparison only."""
    beta_square = 0.3  # the official code squares it again
    eps = 1e-7
    thresholds = torch.arange(0, 1, 1 / 255)
    iou_sum = acc_sum = fmax_sum = 0.0
    curves = []
    for p, g in zip(preds, gts):
        pm = torch.from_numpy(p).float() / 255.0
        gm = torch.from_numpy(g).float() / 255.0 > 0.5
        b = pm > 0.5
        # The official IoU: |gt ∩ (gt == pred)| / |gt + pred| with bools; empty union -> 1.
        inter = (gm & (gm == b)).sum().item()
        union = (gm | b).sum().item()
        iou_sum += 1.0 if union == 0 else inter / union
        acc_sum += (gm == b).to(torch.float32).mean().item()
        curve = []
        for t in thresholds:
            bt = pm > t
            tp = (bt & gm).sum()
            prec = tp / (bt.sum() + eps)
            rec = tp / (gm.sum() + eps)
            f = (1 + beta_square ** 2) * prec * rec / (beta_square ** 2 * prec + rec + eps)
            curve.append(f.item())
        fmax_sum += max(curve)
        curves.append(curve)
    n = len(preds)
    return {"iou": iou_sum / n, "accuracy": acc_sum / n, "fmax": fmax_sum / n,
            "fmax_curve": np.mean(curves, axis=0).max()}


@pytest.fixture(scope="module")
def pairs():
    shapes = [(48, 64), (40, 40), (33, 57), (64, 48)]
    return [make_pair(i, shapes[i % len(shapes)]) for i in range(12)]


def test_sod_scores_matches_pysodmetrics(pairs):
    preds, gts = zip(*pairs)
    ours = sod_scores(preds, gts)
    ref = pysodmetrics_direct(preds, gts)
    assert set(ours) == set(SCORE_KEYS)
    for key in SOD_KEYS:
        assert ours[key] == pytest.approx(ref[key], abs=1e-9), key
    curves = merge_curves(image_record(p, g) for p, g in pairs)
    np.testing.assert_allclose(curves["sod"]["precision"], ref["p"][::-1], atol=1e-12)
    np.testing.assert_allclose(curves["sod"]["recall"], ref["r"][::-1], atol=1e-12)


def test_unsupervised_protocol_matches_reference(pairs):
    preds, gts = zip(*pairs)
    ours = sod_scores(preds, gts)
    ref = usod_reference(preds, gts)
    for key in ("iou", "accuracy", "fmax", "fmax_curve"):
        assert ours[key] == pytest.approx(ref[key], abs=1e-6), key
    # The two F_max figures differ on this set by far more than the tolerance, so the check
    # above tells them apart (averaging curves before the max would fail it).
    assert ref["fmax"] - ref["fmax_curve"] > 1e-3
    per_image = np.mean([record_summary(image_record(p, g))["fmax"] for p, g in pairs])
    assert ours["fmax"] == pytest.approx(per_image, abs=1e-12)


def test_merge_is_exact_across_shards_and_order(pairs):
    keyed = [(f"k{i:03d}", image_record(p, g)) for i, (p, g) in enumerate(pairs)]
    one_pass = merge_records(r for _, r in keyed)
    rng = np.random.default_rng(1)
    for _ in range(3):
        # shard at random cut points, shuffle within and across shards, pickle like Ray does
        order = rng.permutation(len(keyed))
        cuts = np.sort(rng.choice(np.arange(1, len(keyed)), size=3, replace=False))
        shards = [pickle.loads(pickle.dumps([keyed[i] for i in part]))
                  for part in np.split(order, cuts)]
        gathered = [item for shard in rng.permutation(len(shards)) for item in shards[shard]]
        merged = merge_records(r for _, r in sorted(gathered, key=lambda kr: kr[0]))
        assert merged == one_pass  # bit for bit once sorted by key
        unsorted = merge_records(r for _, r in gathered)
        for key in SCORE_KEYS:
            assert unsorted[key] == pytest.approx(one_pass[key], abs=1e-12)
    # and the merge of records is the one-call public API
    assert one_pass == sod_scores(*zip(*pairs))


def test_degenerate_cases():
    shape = (30, 40)
    empty = np.zeros(shape, np.uint8)
    full = np.full(shape, 255, np.uint8)
    _, gt = make_pair(3, shape)
    const = np.full(shape, 128, np.uint8)
    cases = [(empty, empty), (full, empty), (empty, full), (full, full), (full, gt),
             (const, gt), (empty, gt), (gt, gt)]
    for pred, g in cases:
        scores = sod_scores([pred], [g])
        assert all(np.isfinite(v) for v in scores.values()), (scores, pred.max(), g.max())
        ref = pysodmetrics_direct([pred], [g])
        for key in SOD_KEYS:
            assert scores[key] == pytest.approx(ref[key], abs=1e-9)
        usod = usod_reference([pred], [g])
        for key in ("iou", "accuracy", "fmax"):
            assert scores[key] == pytest.approx(usod[key], abs=1e-6)
    # All degenerate cases together (empty GT, constant and empty predictions mixed in).
    preds, gts = zip(*cases)
    together, usod = sod_scores(preds, gts), usod_reference(preds, gts)
    for key in ("iou", "accuracy", "fmax", "fmax_curve"):
        assert together[key] == pytest.approx(usod[key], abs=1e-6), key

    nothing = sod_scores([empty], [empty])  # empty ∪ empty: IoU defined as 1
    assert nothing["iou"] == 1.0 and nothing["accuracy"] == 1.0 and nothing["fmax"] == 0.0
    fg = (gt > 127).mean()
    assert sod_scores([full], [gt])["iou"] == pytest.approx(fg)  # all-foreground prediction
    assert sod_scores([const], [gt])["iou"] == pytest.approx(fg)  # constant 128 > 0.5
    perfect = sod_scores([full], [full])
    assert perfect["iou"] == 1.0 and perfect["mae"] == 0.0
    assert perfect["fmax"] == pytest.approx(1.0, abs=1e-6)


def test_size_mismatch_resizes_the_mask_by_default():
    """The official runner resizes the mask to the prediction; ``resize="prediction"`` is the
    other way round."""
    pred, gt = make_pair(5, (60, 80))
    small = resize_to(pred, (30, 40))
    record = image_record(small, gt)
    assert record["resized"] and record["shape"] == (30, 40)
    assert record["pred_shape"] == (30, 40) and record["mask_shape"] == (60, 80)
    assert not image_record(pred, gt)["resized"]
    small_gt = resize_to(gt, small.shape)
    assert sod_scores([small], [gt]) == sod_scores([small], [small_gt])
    upsampled = resize_to(small, gt.shape)
    assert upsampled.shape == gt.shape and upsampled.dtype == np.uint8
    assert image_record(small, gt, resize="prediction")["shape"] == (60, 80)
    assert sod_scores([small], [gt], resize="prediction") == sod_scores([upsampled], [gt])
    ref = pysodmetrics_direct([upsampled], [gt])
    for key in SOD_KEYS:
        assert sod_scores([small], [gt], resize="prediction")[key] == pytest.approx(
            ref[key], abs=1e-9)
    with pytest.raises(ValueError, match="resize"):
        image_record(small, gt, resize="both")


def test_records_are_small_and_picklable(pairs):
    record = image_record(*pairs[0])
    clone = pickle.loads(pickle.dumps(record))
    assert merge_records([clone]) == merge_records([record])
    assert len(pickle.dumps(record)) < 16_000
    summary = record_summary(record)
    assert set(summary) == set(SCORE_KEYS) | {"resized"}
    curves = merge_curves([record])
    assert curves["usod"]["fmeasure"].shape == (255,)
    assert curves["sod"]["fmeasure"].shape == (256,)
    assert np.all(np.diff(curves["usod"]["threshold"]) > 0)


def test_bad_inputs():
    pred, gt = make_pair(0)
    with pytest.raises(ValueError):
        sod_scores([pred], [])
    with pytest.raises(ValueError):
        sod_scores([], [])
    with pytest.raises(ValueError):
        image_record(np.stack([pred] * 3, axis=-1), gt)
    with pytest.raises(TypeError):
        image_record(pred.astype(np.float32) / 255, gt)
    # bool masks are accepted as 0/255
    assert sod_scores([pred], [gt > 127]) == sod_scores([pred], [np.where(gt > 127, 255, 0).astype(np.uint8)])
