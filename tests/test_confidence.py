"""Issue 13: quality columns and confidence of pseudo-masks, train's confidence filters, inspect.

Pipeline runs share one module-scoped Ray and one pseudo-label output (scenes with and without
an object, plus an unreadable file).
"""
from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from selfment_dist.io.schema import QUALITY_COLUMNS
from selfment_dist.algorithm.labeler import pseudo_label
from selfment_dist.algorithm.ncut import fiedler_vectors
from selfment_dist.pipeline._internal.train_data import _confidence_filter
from selfment_dist.algorithm.quality import SIGNALS
from selfment_dist.data.synthetic import (NO_OBJECT_KINDS, make_patch_feature_batch, make_scene,
                                     scene_kinds, write_scenes)

IMAGE_SIZE = 96  # 6x6 patch grid


# ---------------------------------------------------------------------------------------------
# Library: signals and confidence (no Ray)

def test_quality_signals_in_range_and_deterministic():
    feats = torch.from_numpy(make_patch_feature_batch(np.random.default_rng(3), 6, 12, 12, 32))
    mask, quality = pseudo_label(feats, return_quality=True)
    again = pseudo_label(feats, return_quality=True)[1]
    assert set(quality) == set(SIGNALS) | {"confidence"}
    for name, value in quality.items():
        assert value.shape == (6,) and value.dtype == torch.float32, name
        assert torch.isfinite(value).all(), name
        assert torch.equal(value, again[name]), name
    for name in ("fg_fraction", "border_fraction", "ipo_change", "ipo_converged", "confidence"):
        assert ((quality[name] >= 0) & (quality[name] <= 1)).all(), name
    assert torch.allclose(quality["fg_fraction"], mask.float().mean((1, 2)))
    assert (quality["ncut_value"] >= 0).all() and (quality["spectral_gap"] >= -1e-6).all()
    # The mask itself is what it was without quality.
    assert torch.equal(mask, pseudo_label(feats))


def test_krylov_and_dense_solvers_report_the_same_split_quality():
    x = torch.nn.functional.normalize(torch.from_numpy(
        make_patch_feature_batch(np.random.default_rng(0), 2, 18, 18, 32)), dim=-1).flatten(1, 2)
    _, krylov = fiedler_vectors(x, return_info=True)  # 324 nodes: the block Krylov path
    _, dense = fiedler_vectors(x, return_info=True, dense_max_nodes=10_000)
    for name in krylov:
        assert torch.allclose(krylov[name], dense[name], atol=1e-3), name


def test_no_object_scenes_and_features():
    kinds = scene_kinds(10, no_object_fraction=0.4)
    assert kinds.count("object") == 6 and set(kinds) - {"object"} <= set(NO_OBJECT_KINDS)
    for kind in NO_OBJECT_KINDS:
        image, mask = make_scene(7, size=(48, 64), kind=kind)
        assert image.shape == (48, 64, 3) and image.dtype == np.uint8 and image.std() > 1
        if kind == "fill":  # the object covers most of the frame and touches every border
            assert mask.mean() > 0.8 and mask[0].any() and mask[-1].any()
        else:
            assert not mask.any()
    with pytest.raises(ValueError, match="kind"):
        make_scene(0, kind="nothing")
    from selfment_dist.data.synthetic import make_patch_features
    feats, fg = make_patch_features(np.random.default_rng(0), 8, 8, 16, with_object=False,
                                    return_mask=True)
    assert feats.shape == (8, 8, 16) and not fg.any()


def test_confidence_filter_rules():
    conf = np.array([0.1, 0.9, 0.5, 0.7, 0.3], np.float32)
    flags = conf < 0.5
    assert _confidence_filter(conf, flags, min_confidence=None, keep_fraction=None,
                              labels="x") == ({"rule": "none", "threshold": None}, 0)
    assert _confidence_filter(conf, flags, min_confidence=None, keep_fraction=None,
                              labels="x", skip_no_object=True) == (
        {"rule": "no_object", "threshold": None}, 2)
    rule, left_out = _confidence_filter(conf, flags, min_confidence=0.0, keep_fraction=None,
                                        labels="x")
    assert rule["rule"] == "min_confidence" and left_out == 0
    rule, left_out = _confidence_filter(conf, flags, min_confidence=None, keep_fraction=0.4,
                                        labels="x")
    assert left_out == 3 and rule["threshold"] == pytest.approx(0.7)
    with pytest.raises(ValueError, match="not both"):
        _confidence_filter(conf, flags, min_confidence=0.1, keep_fraction=0.5, labels="x")
    with pytest.raises(ValueError, match="keep_fraction"):
        _confidence_filter(conf, flags, min_confidence=None, keep_fraction=0.0, labels="x")
    # Labels made before the confidence column: all rows, and a clear error when asked to filter.
    assert _confidence_filter(conf[:0], None, min_confidence=None, keep_fraction=None,
                              labels="x")[1] == 0
    with pytest.raises(ValueError, match="no confidence column"):
        _confidence_filter(conf[:0], None, min_confidence=0.5, keep_fraction=None, labels="x")


# ---------------------------------------------------------------------------------------------
# Pipeline: columns, train filters, inspect

@pytest.fixture(scope="module")
def labelled(ray_local, tmp_path_factory):
    from selfment_dist.pipeline.pseudo_label import run_pseudo_label

    root = tmp_path_factory.mktemp("conf")
    write_scenes(str(root / "scenes"), 10, seed=4, size=(64, 80), no_object_fraction=0.4)
    (root / "scenes" / "images" / "broken.jpg").write_bytes(b"not a jpeg")
    out = str(root / "labels")
    # The threshold is the median confidence the default constants give these scenes, so that
    # both sides hold rows whatever the calibration: the filters are what is tested here.
    run_pseudo_label(str(root / "scenes" / "images"), out, weights="random",
                     image_size=IMAGE_SIZE, batch_size=4, save_features=True, progress=False,
                     no_object_threshold=0.0, model_workers="tasks")
    table = pq.read_table(out)
    conf = np.sort(table.column("confidence").drop_null().to_numpy())
    threshold = float(conf[len(conf) // 2])
    out2 = str(root / "labels2")
    summary = run_pseudo_label(str(root / "scenes" / "images"), out2, weights="random",
                               image_size=IMAGE_SIZE, batch_size=4, save_features=True,
                               progress=False, no_object_threshold=threshold,
                               model_workers="tasks")
    return {"root": root, "first": out, "labels": out2, "threshold": threshold,
            "summary": summary}


def test_quality_columns_present_in_range_and_deterministic(labelled):
    table = pq.read_table(labelled["labels"]).sort_by("key")
    first = pq.read_table(labelled["first"]).sort_by("key")
    assert set(QUALITY_COLUMNS) <= set(table.column_names)
    rows = table.to_pylist()
    assert len(rows) == 11
    errors = [r for r in rows if r["error"] is not None]
    assert [r["key"] for r in errors] == ["broken"]
    assert all(errors[0][c] is None for c in QUALITY_COLUMNS)
    for r in rows:
        if r["error"] is None:
            assert 0.0 <= r["confidence"] <= 1.0 and math.isfinite(r["confidence"])
            assert 0.0 <= r["border_fraction"] <= 1.0 and 0.0 <= r["ipo_change"] <= 1.0
            assert r["no_object"] == (r["confidence"] < np.float32(labelled["threshold"]))
    # Same images, same settings but the threshold: the same signals, bit for bit.
    for c in QUALITY_COLUMNS[:-1]:
        assert table.column(c).equals(first.column(c)), c
    assert 0 < sum(bool(r["no_object"]) for r in rows if r["error"] is None) < 10


def _expected_keys(labelled, cut: dict) -> tuple[set[str], int]:
    """The keys ``cut`` keeps (worked out here from the rows), and the number of usable rows."""
    table = pq.read_table(labelled["labels"]).to_pylist()
    ok = [r for r in table if r["error"] is None]
    if "keep_fraction" in cut:
        k = math.ceil(cut["keep_fraction"] * len(ok))
        last = sorted((r["confidence"] for r in ok), reverse=True)[k - 1]
        return {r["key"] for r in ok if r["confidence"] >= last}, len(ok)
    if "min_confidence" in cut:
        return {r["key"] for r in ok if r["confidence"] >= cut["min_confidence"]}, len(ok)
    if cut.get("skip_no_object"):
        return {r["key"] for r in ok if not r["no_object"]}, len(ok)
    return {r["key"] for r in ok}, len(ok)  # the default: every row, as the official code


@pytest.mark.parametrize("cut", [{}, {"skip_no_object": True}, {"keep_fraction": 0.3},
                                 {"min_confidence": 0.0}],
                         ids=["default", "skip_no_object", "keep_fraction", "min_confidence_0"])
def test_training_dataset_holds_the_rows_the_filter_keeps(labelled, cut):
    """The dataset train's workers read (Ray Data, without starting Ray Train) holds the rows
    each rule keeps, on these real pseudo-labels. That Ray Train's ranks train on exactly the
    dataset's rows (the default rule end to end) is tests/test_train.py's DDP test."""
    from selfment_dist.pipeline._internal.train_data import build_dataset, inspect_labels

    expected, _ = _expected_keys(labelled, cut)
    ls = inspect_labels(labelled["labels"], **cut)
    assert ls.usable == len(expected)
    ds = build_dataset(ls, stored=ls.feature_source == "stored", storage_options=None,
                       max_pixels=None, shuffle="none")
    keys = [r["key"] for r in ds.select_columns(["key"]).take_all()]
    assert len(keys) == len(set(keys)) and set(keys) == expected


def _check_inspect_output(out_dir, summary):
    for name in ("lowest.png", "middle.png", "highest.png", "confidence.png", "index.html",
                 "inspect.json"):
        assert (out_dir / name).exists(), name
    page = (out_dir / "index.html").read_text()
    assert "lowest.png" in page and "confidence.png" in page
    with Image.open(out_dir / "lowest.png") as im:
        assert im.size[0] > 200 and im.size[1] > 100
    assert summary["unreadable"] == []


def test_inspect_writes_sheets_for_an_output_with_error_rows(labelled, tmp_path):
    from selfment_dist.pipeline.inspect import run_inspect

    summary = run_inspect(labelled["labels"], str(tmp_path / "inspect"), per_sheet=4,
                          thumb_size=64)
    assert summary["rows"] == 11 and summary["errors"] == 1
    assert summary["no_object"] == sum(1 for r in pq.read_table(labelled["labels"]).to_pylist()
                                       if r["no_object"])
    _check_inspect_output(tmp_path / "inspect", summary)


@pytest.mark.slow
def test_inspect_reads_originals_and_labels_on_s3(ray_local, s3_bucket, tmp_path):
    from selfment_dist.cli import main
    from selfment_dist.pipeline.pseudo_label import run_pseudo_label

    bucket, so = s3_bucket
    write_scenes(f"s3://{bucket}/scenes", 4, seed=9, size=(64, 64), no_object_fraction=0.5,
                 storage_options=so)
    run_pseudo_label(f"s3://{bucket}/scenes/images", f"s3://{bucket}/labels", weights="random",
                     image_size=64, batch_size=4, storage_options=so, progress=False,
                     model_workers="tasks")
    out = tmp_path / "inspect"
    assert main(["inspect", "--labels", f"s3://{bucket}/labels", "--output", str(out),
                 "--per-sheet", "2", *[f"--storage-option={k}={v}" for k, v in so.items()]]) == 0
    summary = json.loads((out / "inspect.json").read_text())
    assert summary["rows"] == 4 and summary["errors"] == 0
    _check_inspect_output(out, summary)


def test_confidence_of_an_image_does_not_depend_on_its_batch():
    """Batches are cut by Ray Data as blocks arrive: an image's confidence must be the same
    bits whichever images share its batch."""
    import torch
    from selfment_dist.algorithm.quality import SIGNALS, confidence
    rng = np.random.default_rng(5)
    signals = {k: torch.from_numpy(rng.random(37).astype(np.float32)) for k in SIGNALS}
    whole = confidence(signals)
    for start, stop in ((0, 1), (3, 11), (5, 37)):
        part = confidence({k: v[start:stop] for k, v in signals.items()})
        assert torch.equal(part, whole[start:stop])
