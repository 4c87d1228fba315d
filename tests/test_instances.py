"""Several objects per image in the system: the ``objects`` column, ``export-coco`` and
``evaluate --instances``.

Unit tests on hand-made masks (the column's cells, the COCO writer, the instance evaluator);
end to end (slow): ``pseudo-label --max-objects 3`` → ``export-coco`` → ``evaluate
--instances`` on synthetic multi-object scenes, locally and on a local S3 server.
"""
from __future__ import annotations

import json
import tracemalloc

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from selfment_dist.evaluation.instances import evaluate_instances, write_instance_reports
from selfment_dist.io.coco import object_annotations, upsample_nearest
from selfment_dist.io.masks import encode_mask
from selfment_dist.io.objects import decode_objects, grid_bbox, objects_cell
from selfment_dist.io.schema import PSEUDO_LABEL_SCHEMA, error_row, pseudo_label_schema
from selfment_dist.pipeline.export_coco import export_part, merge_shards
from selfment_dist.settings import EvaluateSettings, ExportCocoSettings, PseudoLabelSettings, \
    SettingsError


def _box(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


# ---------------------------------------------------------------------------------------------
# The objects column

def test_objects_cell_keeps_present_rounds_in_order_and_round_trips():
    masks = np.stack([_box(6, 8, 1, 3, 2, 5), np.zeros((6, 8), bool), _box(6, 8, 4, 6, 0, 1)])
    cell = objects_cell(masks, np.array([0.9, 0.1, 0.4]), np.array([True, False, True]))
    assert [c["confidence"] for c in cell] == pytest.approx([0.9, 0.4])
    assert [c["bbox"] for c in cell] == [[2, 1, 5, 3], [0, 4, 1, 6]]  # half-open x0 y0 x1 y1
    assert cell[0]["mask"] == encode_mask(masks[0])  # the row's mask encoding
    back, conf, bbox = decode_objects(cell, 6, 8)
    np.testing.assert_array_equal(back, masks[[0, 2]])
    assert bbox.tolist() == [[2, 1, 5, 3], [0, 4, 1, 6]] and conf.dtype == np.float32
    # a present round whose mask is empty is no object
    assert objects_cell(np.zeros((2, 3, 3), bool), np.ones(2), np.ones(2, bool)) == []
    assert grid_bbox(np.zeros((3, 3), bool)) == [0, 0, 0, 0]


def test_objects_column_is_optional_and_fits_the_schema():
    assert "objects" not in PSEUDO_LABEL_SCHEMA.names  # default output: unchanged
    schema = pseudo_label_schema(objects=True)
    assert schema.names[-1] == "objects"
    cell = objects_cell(_box(4, 4, 0, 2, 0, 2)[None], [0.5])
    row = {**error_row("a", "/a.png", "bad", width=3, height=4), "error": None}
    table = pa.Table.from_pylist([row | {"objects": cell}, error_row("b", "/b.png", "bad")],
                                 schema=schema)
    assert table.column("objects").to_pylist()[1] is None
    assert table.column("objects").to_pylist()[0][0]["bbox"] == [0, 0, 2, 2]


def test_settings_of_the_object_options():
    base = {"inputs": ["x"], "output": "y"}
    assert PseudoLabelSettings(**base).max_objects == 1
    with pytest.raises(ValueError, match="need max_objects > 1"):
        PseudoLabelSettings(**base, min_object_confidence=0.5)
    with pytest.raises(ValueError):
        PseudoLabelSettings(**base, max_objects=0)
    with pytest.raises(ValueError, match="instances needs"):
        EvaluateSettings(output="o", predictions="p.json", instances=True)
    with pytest.raises(ValueError, match="instances takes"):
        EvaluateSettings(output="o", predictions="p", ground_truth="g", masks="m", instances=True)
    assert ExportCocoSettings(labels="l", output="o").shard_size >= 1


def test_labeler_adds_objects_only_when_asked(monkeypatch):
    """``mask`` keeps the single-object mask; the objects come from multi_object_labels."""
    import types

    from selfment_dist.algorithm.labeler import PseudoLabeler

    calls = {}

    def fake(feats, *, max_objects, **kw):
        calls.update(kw, max_objects=max_objects)
        b, h, w, _ = feats.shape
        return {"mask": torch.zeros(b, max_objects, h, w, dtype=torch.bool),
                "confidence": torch.full((b, max_objects), 0.5),
                "present": torch.ones(b, max_objects, dtype=torch.bool)}

    monkeypatch.setitem(__import__("sys").modules, "selfment_dist.algorithm.maskcut_labels",
                        types.SimpleNamespace(multi_object_labels=fake))
    feats = torch.randn(2, 4, 4, 8)
    single = PseudoLabeler(lambda x: feats)(None)
    multi = PseudoLabeler(lambda x: feats, max_objects=3, min_object_confidence=0.2)(None)
    PseudoLabeler(lambda x: feats, max_objects=2, object_ipo=True, n_iter=7)(None)
    assert calls["ipo"] is True and calls["n_iter"] == 7 and calls["max_objects"] == 2
    assert not any(k.startswith("objects_") for k in single)
    np.testing.assert_array_equal(single["mask"], multi["mask"])
    assert multi["objects_mask"].shape == (2, 3, 4, 4) and multi["objects_present"].all()
    calls.clear()
    PseudoLabeler(lambda x: feats, max_objects=3, min_object_confidence=0.2)(None)
    assert calls["max_objects"] == 3 and calls["min_object_confidence"] == 0.2
    assert "ipo" not in calls  # options not asked for are left to the algorithm's defaults


# ---------------------------------------------------------------------------------------------
# The COCO writer

def test_nearest_upsampling_is_torchs():
    rng = np.random.default_rng(0)
    masks = rng.random((3, 5, 7)) > 0.5
    for size in ((13, 22), (5, 7), (64, 48)):
        ref = torch.nn.functional.interpolate(torch.from_numpy(masks).float()[None], size=size,
                                              mode="nearest")[0].bool().numpy()
        np.testing.assert_array_equal(upsample_nearest(masks, *size), ref)


def test_object_annotations_at_the_original_size():
    grid = np.stack([_box(4, 4, 0, 2, 0, 2), _box(4, 4, 2, 4, 3, 4), _box(4, 4, 3, 4, 0, 1)])
    cell = objects_cell(grid, [0.9, 0.3, 0.6])
    anns = object_annotations(7, 61, cell, 4, 4, width=40, height=20, min_confidence=0.5)
    assert [a["id"] for a in anns] == [61, 63]  # ids by position in the cell, gaps left
    assert [a["round"] for a in anns] == [0, 2] and anns[0]["score"] == pytest.approx(0.9)
    first = anns[0]
    assert first["segmentation"]["size"] == [20, 40] and first["category_id"] == 1
    decoded = mask_utils.decode(first["segmentation"])
    assert decoded.shape == (20, 40) and decoded[:10, :20].all() and decoded.sum() == 200
    assert first["bbox"] == [0.0, 0.0, 20.0, 10.0] and first["area"] == 200.0
    assert first["iscrowd"] == 0


def _label_part(path, rows: list[dict]) -> None:
    pq.write_table(pa.Table.from_pylist(rows, schema=pseudo_label_schema(objects=True)), path)


def _ok_row(key: str, masks: np.ndarray, conf, *, width=48, height=32, source=None) -> dict:
    gh, gw = masks.shape[1:]
    return {**error_row(key, source or f"/data/images/{key}.png", "x", width=width,
                        height=height),
            "error": None, "error_kind": None, "grid_h": gh, "grid_w": gw,
            "mask": encode_mask(masks.any(0)), "objects": objects_cell(masks, conf)}


def test_export_part_writes_loadable_shards_with_every_row(tmp_path):
    labels, out = tmp_path / "labels", tmp_path / "coco"
    labels.mkdir()
    rows = [_ok_row("a", np.stack([_box(4, 6, 0, 2, 0, 3), _box(4, 6, 2, 4, 4, 6)]), [0.8, 0.4]),
            _ok_row("b", np.zeros((0, 4, 6), bool), []),                      # no objects
            error_row("c", "/data/images/c.png", "model failed", width=10, height=5),
            error_row("d", "/data/images/d.png", "not an image"),             # no size
            _ok_row("e", _box(4, 6, 1, 3, 1, 5)[None], [0.7], source="/data/shard.tar")]
    _label_part(labels / "part-x-0.parquet", rows)
    out.mkdir()
    result = export_part(str(labels / "part-x-0.parquet"), 11, 3, str(out), shard_size=2,
                         min_confidence=None, storage_options=None)
    assert result["files"] == ["instances-00003-0000.json", "instances-00003-0001.json"]
    assert (result["images"], result["annotations"], result["unsized_errors"]) == (4, 3, 1)
    merged = merge_shards(str(out), result["files"], None)
    coco = COCO(merged)
    assert sorted(coco.getImgIds()) == [11, 12, 13, 15]  # ids = first id + row position
    names = {im["id"]: im["file_name"] for im in coco.dataset["images"]}
    assert names[11] == "/data/images/a.png" and names[15] == "/data/shard.tar#e"
    assert coco.getAnnIds(imgIds=[12, 13]) == []
    for ann in coco.dataset["annotations"]:
        im = coco.imgs[ann["image_id"]]
        assert coco.annToMask(ann).shape == (im["height"], im["width"])
    assert coco.loadCats(1)[0]["name"] == "fg"


def test_image_ids_survive_a_resume_that_adds_parts(tmp_path):
    """A resumed pseudo-label run adds parts under a new (random) run id that may sort before
    the first run's: ids follow the manifest's run order, so an export after the resume gives
    every earlier image the id it had."""
    from selfment_dist.pipeline._internal.manifest import MANIFEST_NAME
    from selfment_dist.pipeline.export_coco import _parts_and_offsets

    labels = tmp_path / "labels"
    labels.mkdir()
    one = np.stack([_box(4, 6, 0, 2, 0, 3)])
    _label_part(labels / "part-ff00-000000.parquet", [_ok_row(k, one, [0.9]) for k in "abc"])
    _label_part(labels / "part-ff00-000001.parquet", [_ok_row("d", one, [0.9])])
    (labels / MANIFEST_NAME).write_text(json.dumps({"runs": [{"run_id": "ff00"}]}))
    before = _parts_and_offsets(str(labels), None)
    assert [first for _, first in before] == [1, 4]
    # The resume: a run whose id sorts first, and a stray part of a run nobody recorded.
    _label_part(labels / "part-0a00-000000.parquet", [_ok_row("e", one, [0.9])])
    _label_part(labels / "part-0b00-000000.parquet", [_ok_row("f", one, [0.9])])
    (labels / MANIFEST_NAME).write_text(json.dumps({"runs": [{"run_id": "ff00"},
                                                             {"run_id": "0a00"}]}))
    after = _parts_and_offsets(str(labels), None)
    assert after[:2] == before
    assert [p.rsplit("/", 1)[-1] for p, _ in after[2:]] == ["part-0a00-000000.parquet",
                                                            "part-0b00-000000.parquet"]
    assert [first for _, first in after] == [1, 4, 5, 6]


def _export_peaks(tmp_path, n_rows: int) -> tuple[int, int, int]:
    """(task peak, merge peak, merged file bytes) of Python memory exporting ``n_rows``."""
    labels, out = tmp_path / f"labels{n_rows}", tmp_path / f"coco{n_rows}"
    labels.mkdir()
    out.mkdir()
    rng = np.random.default_rng(0)
    rows = [_ok_row(f"k{i:03d}", rng.random((3, 12, 12)) > 0.5, [0.5, 0.6, 0.7], width=150,
                    height=100) for i in range(n_rows)]
    _label_part(labels / "part-x-0.parquet", rows)
    del rows
    tracemalloc.start()
    result = export_part(str(labels / "part-x-0.parquet"), 1, 0, str(out), shard_size=10,
                         min_confidence=None, storage_options=None)
    _, task_peak = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    merged = merge_shards(str(out), result["files"], None)
    _, merge_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(result["files"]) == n_rows // 10 and result["annotations"] == 3 * n_rows
    assert len(json.loads(open(merged).read())["annotations"]) == 3 * n_rows
    return task_peak, merge_peak, (out / "instances.json").stat().st_size


def test_export_memory_is_bounded_by_the_shard(tmp_path):
    """Streaming: the export task and the merge hold a shard at a time, so their peak Python
    memory does not grow with the part (3x the rows: the same peak, well below the output)."""
    small = _export_peaks(tmp_path, 100)
    large = _export_peaks(tmp_path, 300)
    assert large[2] > 2.9 * small[2]
    assert large[0] < 1.25 * small[0] and large[1] < 1.25 * small[1], (small, large)
    assert large[0] < large[2] / 3 and large[1] < large[2] / 3, large


# ---------------------------------------------------------------------------------------------
# The instance evaluator

def _gt_and_perfect(tmp_path=None):
    masks = {1: [_box(30, 40, 2, 12, 3, 15), _box(30, 40, 15, 28, 20, 38)],
             2: [_box(30, 40, 5, 25, 5, 35)]}
    images = [{"id": i, "file_name": f"images/s{i}.png", "width": 40, "height": 30}
              for i in masks]
    gt_anns, preds = [], []
    for i, ms in masks.items():
        for m in ms:
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            seg = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
            gt_anns.append({"id": len(gt_anns) + 1, "image_id": i, "category_id": 1,
                            "iscrowd": 0, "segmentation": seg,
                            "area": float(mask_utils.area(rle)),
                            "bbox": list(mask_utils.toBbox(rle))})
            # predictions: another id space, matched by file name ending
            preds.append({"id": len(preds) + 1, "image_id": 100 + i, "category_id": 1,
                          "segmentation": seg, "score": 0.9})
    gt = {"images": images, "annotations": gt_anns, "categories": [{"id": 1, "name": "fg"}]}
    pred = {"images": [{"id": 100 + i, "file_name": f"s3://b/data/images/s{i}.png", "width": 40,
                        "height": 30} for i in masks], "annotations": preds}
    return gt, pred


def test_perfect_predictions_score_one():
    gt, pred = _gt_and_perfect()
    metrics = evaluate_instances(pred, gt)
    for iou in ("segm", "bbox"):
        for name in ("AP", "AP50", "AP75", "AR10", "AR100"):
            assert metrics[iou][name] == pytest.approx(1.0), (iou, name)
    assert metrics["counts"]["matched_images"] == 2


def test_misses_and_false_positives_lower_the_scores(tmp_path):
    gt, pred = _gt_and_perfect()
    pred["annotations"] = pred["annotations"][:2]  # image 2's object missed
    wrong = _box(30, 40, 0, 3, 0, 3)
    rle = mask_utils.encode(np.asfortranarray(wrong.astype(np.uint8)))
    pred["annotations"].append({"image_id": 102, "score": 0.95, "segmentation": {
        "size": rle["size"], "counts": rle["counts"].decode("ascii")}})
    metrics = evaluate_instances(pred, gt)
    assert metrics["segm"]["AR100"] == pytest.approx(2 / 3)
    assert metrics["segm"]["AP"] < 0.8
    doc = write_instance_reports(str(tmp_path / "r"), metrics)
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["segm"]["AP"] == \
        metrics["segm"]["AP"]
    table = (tmp_path / "r" / "metrics.md").read_text()
    assert "| segm |" in table and "AP50" in table and doc["files"]["metrics.md"].endswith(".md")


def test_matching_by_id_and_unmatched_images():
    gt, pred = _gt_and_perfect()
    with pytest.raises(ValueError, match="no prediction image matches"):
        evaluate_instances(pred, gt, match_images="id")
    results = [{**a, "image_id": a["image_id"] - 100} for a in pred["annotations"]]
    assert evaluate_instances(results, gt, match_images="id")["segm"]["AP"] == pytest.approx(1.0)
    assert evaluate_instances({"images": pred["images"], "annotations": []}, gt)["segm"]["AP"] == 0


def test_contact_sheet_draws_each_object_in_its_own_colour():
    from selfment_dist.evaluation.contact_sheet import OBJECT_COLOURS, overlay_objects

    image = np.full((40, 40, 3), 0, np.uint8)
    objects = np.stack([_box(4, 4, 0, 2, 0, 2), _box(4, 4, 2, 4, 2, 4)])
    out = overlay_objects(image, objects, size=40).astype(float)
    # inside each object (away from its outline) the tint is half its colour over black
    np.testing.assert_allclose(out[5, 5], OBJECT_COLOURS[0] / 2, atol=1)
    np.testing.assert_allclose(out[30, 30], OBJECT_COLOURS[1] / 2, atol=1)
    assert out[5, 35].sum() == 0  # background untouched


# ---------------------------------------------------------------------------------------------
# End to end: pseudo-label --max-objects 3 → export-coco → evaluate --instances

LABEL_CLI = ["--backbone", "vit_small_patch16_224.dino", "--weights", "random",
             "--image-size", "64", "--batch-size", "4", "--model-workers", "tasks",
             "--no-progress"]
N_SCENES = 6


def _cli(args: list[str], capsys) -> dict:
    from cli_output import printed_summary

    from selfment_dist.cli import main as cli_main

    capsys.readouterr()
    assert cli_main(args) == 0
    return printed_summary(capsys.readouterr().out)


def _scenes(root: str, storage_options=None) -> None:
    from selfment_dist.data.instances import write_instance_scenes
    write_instance_scenes(root, N_SCENES, seed=3, size=(64, 64), storage_options=storage_options)


def _read_table(uri: str, storage_options=None) -> pa.Table:
    fs, root = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    parts = sorted(p for p in fs.ls(root, detail=False) if p.endswith(".parquet"))
    tables = []
    for p in parts:
        with fs.open(p, "rb") as f:
            tables.append(pq.read_table(f))
    return pa.concat_tables(tables).sort_by("key")


def _check_chain(root: str, capsys, storage_options=None) -> dict:
    """The three commands on the scenes at ``root``; checks each output; the metrics."""
    so = [f"--storage-option={k}={v}" for k, v in (storage_options or {}).items()]
    labels, coco, report = f"{root}/labels", f"{root}/coco", f"{root}/report"
    summary = _cli(["pseudo-label", "--input", f"{root}/images", "--output", labels,
                    "--max-objects", "3", *LABEL_CLI, *so], capsys)
    assert summary["images"] == N_SCENES and summary["errors"] == 0
    table = _read_table(labels, storage_options)
    assert table.schema.field("objects").type == pseudo_label_schema(objects=True).field(
        "objects").type
    cells = table.column("objects").to_pylist()
    assert all(len(c) <= 3 for c in cells)
    for cell, gh, gw in zip(cells, table.column("grid_h").to_pylist(),
                            table.column("grid_w").to_pylist()):
        masks, conf, bbox = decode_objects(cell, gh, gw)
        assert ((conf >= 0) & (conf <= 1)).all()
        assert not (masks.sum(0) > 1).any()  # each object excludes earlier objects' patches

    exported = _cli(["export-coco", "--labels", labels, "--output", coco, "--shard-size", "4",
                     "--merge", *so], capsys)
    assert exported["images"] == N_SCENES and len(exported["files"]) == 2
    assert exported["annotations"] == sum(len(c) for c in cells)
    fs, path = fsspec.core.url_to_fs(exported["merged"], **(storage_options or {}))
    with fs.open(path, "r") as f:
        doc = json.load(f)
    coco_api = COCO()
    coco_api.dataset = doc
    coco_api.createIndex()
    assert len(coco_api.imgs) == N_SCENES
    for ann in doc["annotations"]:
        im = coco_api.imgs[ann["image_id"]]
        assert mask_utils.decode(ann["segmentation"]).shape == (im["height"], im["width"])

    metrics = _cli(["evaluate", "--instances", "--predictions", exported["merged"],
                    "--ground-truth", f"{root}/instances.json", "--output", report, *so], capsys)
    assert metrics["counts"]["matched_images"] == N_SCENES
    for iou in ("segm", "bbox"):
        assert 0.0 <= metrics[iou]["AP"] <= 1.0 and 0.0 <= metrics[iou]["AR100"] <= 1.0
    assert fs.exists(fsspec.core.url_to_fs(metrics["files"]["metrics.md"],
                                           **(storage_options or {}))[1])
    return {"table": table, "metrics": metrics}


@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")
def test_chain_on_local_files(tmp_path, capsys):
    root = str(tmp_path)
    _scenes(f"{root}")
    chain = _check_chain(root, capsys)
    # The default (--max-objects 1) output: no objects column, rows as before.
    _cli(["pseudo-label", "--input", f"{root}/images", "--output", f"{root}/single",
          *LABEL_CLI], capsys)
    single = _read_table(f"{root}/single")
    assert single.schema.names == PSEUDO_LABEL_SCHEMA.names
    assert single.equals(chain["table"].drop_columns(["objects"]))
    # inspect draws the objects
    summary = _cli(["inspect", "--labels", f"{root}/labels", "--output", f"{root}/inspect",
                    "--per-sheet", "4"], capsys)
    assert summary["rows"] == N_SCENES


@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")
def test_chain_on_local_s3(s3_bucket, capsys):
    bucket, options = s3_bucket
    root = f"s3://{bucket}/run"
    _scenes(root, options)
    _check_chain(root, capsys, options)
