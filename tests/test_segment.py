"""Segmenter and the Ray Data segmentation pipeline, on a dozen synthetic images.

The model is a random DINO backbone (``weights="random"``, 64 px: a 4x4 patch grid) and a
random PatchHead whose logits are rescaled so that saliency spans [0, 1]. Every map the
pipeline writes is compared with :meth:`Segmenter.predict` run directly on the same file.
"""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from types import SimpleNamespace

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest

from calibrated_head import calibrated_head
import torch
from PIL import Image

from selfment_dist.model.artifact import save_artifact
from selfment_dist.model.backbone import build_backbone, resize_square
from selfment_dist.io import decode_image
from selfment_dist.io.sources import enumerate_units
from selfment_dist.pipeline._internal.inputs import outside_output
from selfment_dist.pipeline._internal.decode import read_and_decode
from selfment_dist.pipeline._internal.model_stage import ActorResources
from selfment_dist.pipeline._internal.saliency_output import PngSink, TableSink
from selfment_dist.pipeline.segment import (MANIFEST_NAME, OVERLAY_DIR, SEGMENT_SCHEMA,
                                            SegmentActor, render_table, run_segment)
from selfment_dist.settings import SegmentSettings
from selfment_dist.model.segmenter import Segmenter, resolve_image_size, to_png_bytes, upsample
from selfment_dist.data.synthetic import make_scene, write_scenes

BACKBONE = "vit_small_patch16_224.dino"
TRAIN_SIZE = 64      # 4x4 grid
LARGE_SIZE = 96      # 6x6 grid: inference above the training size
# The model runs as tasks on warm workers (one replica for the module); the actor pool's path of
# segment is the multi-node, kill, demo and Jobs tests'.
RUN = dict(batch_size=4, progress=False, model_workers="tasks")


def _encode(array: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt, **kw)
    return buf.getvalue()


def _tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(artifact URI, Segmenter at the training size). The artifact holds a PatchHead calibrated on the random backbone's features: logits of fg - bg spread over
    about ±4, so maps use the whole 0-255 range."""
    backbone = build_backbone(BACKBONE, weights="random", image_size=TRAIN_SIZE, device="cpu")
    images = np.stack([resize_square(Image.fromarray(make_scene((3, i), size=(48, 64))[0]),
                                     TRAIN_SIZE) for i in range(6)])
    head = calibrated_head(backbone, images)
    uri = str(tmp_path_factory.mktemp("model") / "artifact")
    # Inference recorded at the training size (the default would be twice it) to keep the
    # Ray tests small; tests/test_official_semantics.py checks the default.
    meta = save_artifact(uri, head, {"backbone": BACKBONE, "weights": "random",
                                     "image_size": TRAIN_SIZE, "inference_image_size": TRAIN_SIZE,
                                     "training": {"epochs": 0}})
    return uri, Segmenter(backbone, head, meta=meta)


@pytest.fixture(scope="module")
def artifact(model) -> str:
    return model[0]


@pytest.fixture(scope="module")
def segmenters(model) -> dict[int, Segmenter]:
    """Segmenters by image size, built on first use."""
    return {TRAIN_SIZE: model[1]}


def _segmenter(segmenters: dict, artifact: str, size: int) -> Segmenter:
    if size not in segmenters:
        segmenters[size] = Segmenter.from_artifact(artifact, image_size=size, device="cpu")
    return segmenters[size]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """``images/``: 8 synthetic JPEGs, odd sizes in subfolders, an EXIF-rotated JPEG, a tar
    shard of two, and a file that is not an image. Returns (folder, {key: bytes}, bad key)."""
    root = tmp_path_factory.mktemp("corpus")
    keys = write_scenes(str(root), 8, seed=1, size=(48, 64))
    folder = root / "images"
    good = {k: (folder / f"{k}.jpg").read_bytes() for k in keys}
    extra = {
        "sub/odd_a.png": _encode(make_scene((2, 0), size=(37, 53))[0], "PNG"),
        "sub/deeper/odd_b.jpg": _encode(make_scene((2, 1), size=(70, 29))[0], "JPEG"),
    }
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display: stored 60x40 (WxH), shown 40x60
    buf = io.BytesIO()
    Image.fromarray(make_scene((2, 2), size=(40, 60))[0]).save(buf, "JPEG", exif=exif)
    extra["rotated.jpg"] = buf.getvalue()
    for name, data in extra.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
        good[name.rsplit(".", 1)[0]] = data
    shard = {"wds/t0.jpg": _encode(make_scene((2, 3), size=(50, 34))[0], "JPEG"),
             "wds/t1.png": _encode(make_scene((2, 4), size=(33, 47))[0], "PNG")}
    # macOS litter, skipped on purpose and counted (a folder's and a tar shard's)
    (folder / "shard-000.tar").write_bytes(_tar({**shard, "wds/._t0.jpg": b"fork"}))
    good.update({name.rsplit(".", 1)[0]: data for name, data in shard.items()})
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (folder / "broken.jpg").write_bytes(b"this is not a JPEG\n")
    return folder, good, "broken"


def _check_maps(read, good: dict[str, bytes], segmenter: Segmenter) -> None:
    """Every map: at the original (EXIF-oriented) size, equal to Segmenter.predict ±1 level."""
    for key, data in good.items():
        image = decode_image(data)
        got = np.asarray(Image.open(io.BytesIO(read(key))))
        assert got.dtype == np.uint8 and got.shape == (image.height, image.width), key
        want = segmenter.predict([image])[0]
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1, key


# ---------------------------------------------------------------------------------------------
# Segmenter (no Ray)

def test_segmenter_saliency_matches_backbone_and_head(artifact, segmenters):
    seg = _segmenter(segmenters, artifact, TRAIN_SIZE)
    assert seg.grid == (4, 4) and seg.image_size == TRAIN_SIZE
    images = np.stack([resize_square(Image.fromarray(make_scene((5, i), size=(48, 64))[0]),
                                     TRAIN_SIZE) for i in range(3)])
    sal = seg.saliency(images)
    assert sal.shape == (3, 4, 4) and sal.dtype == np.float32
    assert 0.0 <= sal.min() and sal.max() <= 1.0 and sal.max() - sal.min() > 0.3
    direct = seg.head.saliency(seg.backbone(images)).numpy()
    np.testing.assert_allclose(sal, direct, atol=1e-6)

    full = upsample(sal, (37, 53))
    assert full.shape == (3, 37, 53) and full.dtype == np.float32
    np.testing.assert_allclose(upsample(sal[1], (37, 53)), full[1], atol=1e-6)
    maps = seg.predict([Image.fromarray(make_scene((5, i), size=(48, 64))[0]) for i in range(3)])
    assert [m.shape for m in maps] == [(48, 64)] * 3


def test_upsample_is_bilinear_without_corner_alignment():
    out = upsample(np.array([[0.0, 1.0]], np.float32), (1, 4))
    np.testing.assert_allclose(out, [[0.0, 0.25, 0.75, 1.0]], atol=1e-6)
    out = upsample(torch.full((2, 3, 3), 0.4), (5, 7))
    assert out.shape == (2, 5, 7) and np.allclose(out, 0.4)
    with pytest.raises(ValueError, match=r"\(h, w\) or \(B, h, w\)"):
        upsample(np.zeros(4), (2, 2))


def test_to_png_bytes_is_8bit_floored():
    """Floor, as the official inference.py writes maps (``(p * 255).astype(uint8)``)."""
    sal = np.array([[0.0, 0.5, 1.0], [0.2, 0.002, 0.998]], np.float32)
    got = Image.open(io.BytesIO(to_png_bytes(sal)))
    assert got.mode == "L" and got.size == (3, 2)
    np.testing.assert_array_equal(np.asarray(got), (sal * 255).astype(np.uint8))
    levels = np.arange(6, dtype=np.uint8).reshape(2, 3)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(to_png_bytes(levels)))), levels)


def test_image_size_override_and_its_validation(artifact, segmenters):
    seg = _segmenter(segmenters, artifact, LARGE_SIZE)
    assert seg.grid == (6, 6)
    assert seg.saliency(np.zeros((1, LARGE_SIZE, LARGE_SIZE, 3), np.uint8)).shape == (1, 6, 6)
    with pytest.raises(ValueError, match=r"not a positive multiple of .*patch size 16; use 48 or 64"):
        Segmenter.from_artifact(artifact, image_size=50)
    with pytest.raises(FileNotFoundError, match="model.json"):
        Segmenter.from_artifact(str(Path(artifact).parent / "missing"))


# ---------------------------------------------------------------------------------------------
# Pipeline stages, in this process (the code Ray runs in its workers)

def test_stages_in_process(model, corpus, tmp_path, monkeypatch):
    """decode → actor → PNG sink and parquet rows, with a model failure on one image (retried
    image by image) and a key that would leave the output folder."""
    from ray.data.block import BlockAccessor

    artifact, seg = model
    folder, good, bad = corpus
    (tmp_path / "black.png").write_bytes(_encode(np.zeros((20, 30, 3), np.uint8), "PNG"))
    units = enumerate_units([str(folder), str(tmp_path / "black.png")])
    columns = {k: np.array([u[k] for u in units], dtype=object) for k in ("kind", "uri", "key")}
    def decode(device_resize):
        return list(read_and_decode(columns, image_size=TRAIN_SIZE, max_pixels=None,
                                    storage_options=None, skip_ref=None, rows_per_batch=5,
                                    keep_data=True, device_resize=device_resize))

    batches = decode(SegmentActor.device_resize)  # uint8 at the decoded size
    assert [len(b["key"]) for b in batches] == [5, 5, 5]
    float_batches = decode(False)  # float32, resized on the decode CPUs (the old transport)

    monkeypatch.setattr(Segmenter, "from_artifact", classmethod(lambda cls, *a, **kw: seg))
    settings = SegmentSettings(model=artifact, inputs=["unused"], output="unused",
                               image_size=TRAIN_SIZE)
    actor = SegmentActor(settings=settings, resources=ActorResources(device="cpu", cpu_threads=1))
    real = seg.saliency

    def flaky(images):  # fails on any batch holding the all-black image
        if any(float(im.max()) == 0 for im in images):  # float pixels in [0, 1]
            raise RuntimeError("injected failure")
        return real(images)

    # The light transport changes where the resize runs, not one bit of the saliency.
    for light, heavy in zip(batches, float_batches):
        assert np.array_equal(actor(light)["saliency"], actor(heavy)["saliency"])

    monkeypatch.setattr(seg, "saliency", flaky)
    outputs = [actor(b) for b in batches]
    merged = {k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]}
    merged["key"][list(merged["key"]).index("scene_00001")] = "../escape"
    errors = dict(zip(merged["key"], merged["error"]))
    assert errors["black"] == "segmentation failed: RuntimeError: injected failure"
    assert "not an image" in errors[bad]
    assert merged["saliency"].shape == (15, 4, 4) and "image" not in merged

    sink = PngSink(str(tmp_path / "out"), overlays=True, max_pixels=None, storage_options=None)
    empty = BlockAccessor.batch_to_block({"key": np.array([], dtype=object)})
    result = sink.write([empty, BlockAccessor.batch_to_block(merged)], ctx=None)
    assert result["images"] == len(good) - 1
    assert {f["key"]: f["error"] for f in result["failed"]} == {
        "black": "segmentation failed: RuntimeError: injected failure", bad: errors[bad],
        "../escape": "cannot write map: ValueError: key '../escape' cannot be a file name "
                     "under the output"}
    assert not (tmp_path / "escape.png").exists()
    assert (tmp_path / "out" / OVERLAY_DIR / "rotated.jpg").is_file()
    assert not list((tmp_path / "out").rglob(".*"))  # no temporary files left

    table = render_table(merged)
    assert table.schema.equals(SEGMENT_SCHEMA) and table.num_rows == 15
    assert table.column("error").null_count == 13  # a parquet row needs no safe file name
    # Resuming can leave a write task only empty, column-less blocks.
    parts = TableSink(str(tmp_path / "table"), SEGMENT_SCHEMA, "r1", 1024, None)
    assert parts.write([empty], SimpleNamespace(task_idx=0))["rows"] == 0
    written = parts.write([empty, table], SimpleNamespace(task_idx=1))
    assert (written["rows"], written["errors"]) == (15, 2)
    assert pq.read_table(tmp_path / "table" / written["file"]).equals(table)


def test_maps_inside_an_input_folder_are_not_inputs(tmp_path):
    for name in ("a.jpg", "maps/a.png", "maps/_overlays/a.jpg", "mapsx/b.jpg"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    units = enumerate_units(str(tmp_path))
    fs = fsspec.filesystem("file")
    kept = outside_output(units, fs, str(tmp_path / "maps"))
    assert sorted(u["key"] for u in kept) == ["a", "mapsx/b"]


def test_artifact_metadata_resolution():
    meta = {"backbone": {"name": BACKBONE, "weights": "random", "image_size": 64}}
    # No recorded inference size: twice the training size (the official 768 -> 1536 rule).
    assert resolve_image_size(meta) == 128 and resolve_image_size(meta, 48) == 48
    assert resolve_image_size({**meta, "inference_image_size": 96}) == 96
    assert resolve_image_size({**meta, "inference_image_size": 96}, 64) == 64
    with pytest.raises(ValueError, match="no image_size"):
        resolve_image_size({"backbone": BACKBONE})
    with pytest.raises(ValueError, match="names no backbone"):
        resolve_image_size({"image_size": 64})
    with pytest.raises(ValueError, match="unsupported backbone"):
        resolve_image_size({"backbone": "resnet50", "image_size": 64})


# ---------------------------------------------------------------------------------------------
# Pipeline (Ray)

def test_run_segment_rejects_bad_arguments(artifact, tmp_path):
    with pytest.raises(ValueError, match="output_format"):
        run_segment(artifact, str(tmp_path), str(tmp_path / "o"), output_format="tiff")
    with pytest.raises(ValueError, match="patch size 16"):
        run_segment(artifact, str(tmp_path), str(tmp_path / "o"), image_size=100)
    with pytest.raises(ValueError, match="overlays"):
        run_segment(artifact, str(tmp_path), str(tmp_path / "o"), output_format="parquet",
                    overlays=True)


def test_segment_folder_to_png_reports_errors_and_resumes(ray_local, artifact, segmenters,
                                                          corpus, tmp_path):
    folder, good, bad = corpus
    out = tmp_path / "maps"
    summary = run_segment(artifact, str(folder), str(out), **RUN)
    assert (summary["images"], summary["errors"], summary["skipped"]) == (len(good), 1, 0)
    assert summary["maps_total"] == len(good) and summary["images_per_s"] > 0
    assert summary["image_size"] == TRAIN_SIZE
    assert (out / "sub" / "deeper" / "odd_b.png").is_file()  # keys with "/" make subfolders
    assert (out / "wds" / "t0.png").is_file()                # tar members too
    _check_maps(lambda k: (out / f"{k}.png").read_bytes(), good,
                _segmenter(segmenters, artifact, TRAIN_SIZE))

    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["errors"] == 1
    skipped = {"total": 1, "by_reason": {"hidden": 1}, "examples": [".DS_Store"],
               "tar_members": 1}
    assert summary["inputs_skipped"] == manifest["inputs_skipped"] == skipped
    [failed] = manifest["errors"]
    assert failed["key"] == bad and "not an image" in failed["error"]
    assert failed["source"].endswith("broken.jpg")

    # Re-run after losing two maps (an image file's and a tar member's): those are redone, the
    # rest skipped, and the failed input is tried (and reported) again.
    before = {k: (out / f"{k}.png").stat().st_mtime_ns for k in good}
    for key in ("scene_00003", "wds/t1"):
        (out / f"{key}.png").unlink()
    again = run_segment(artifact, str(folder), str(out), **RUN)
    assert (again["images"], again["errors"], again["skipped"]) == (2, 1, len(good) - 2)
    assert again["maps_total"] == len(good)
    changed = {k for k in good if (out / f"{k}.png").stat().st_mtime_ns != before[k]}
    assert changed == {"scene_00003", "wds/t1"}
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert [r["status"] for r in manifest["runs"]] == ["complete", "complete"]
    assert [e["key"] for e in manifest["errors"]] == [bad]

    # Other settings into the same output are refused.
    with pytest.raises(ValueError, match="image_size"):
        run_segment(artifact, str(folder), str(out), image_size=LARGE_SIZE, **RUN)


@pytest.mark.slow
def test_segment_s3_larger_size_with_overlays(ray_local, artifact, segmenters, corpus,
                                              s3_bucket):
    bucket, options = s3_bucket
    folder, good, bad = corpus
    fs = fsspec.filesystem("s3", **options)
    fs.put(str(folder), f"{bucket}/in", recursive=True)
    fs.put(artifact, f"{bucket}/model", recursive=True)

    summary = run_segment(f"s3://{bucket}/model", [f"s3://{bucket}/in"],
                          f"s3://{bucket}/out", image_size=LARGE_SIZE, overlays=True,
                          storage_options=options, **RUN)
    assert (summary["images"], summary["errors"]) == (len(good), 1)
    assert summary["image_size"] == LARGE_SIZE
    assert summary["manifest"] == f"s3://{bucket}/out/{MANIFEST_NAME}"
    _check_maps(lambda k: fs.cat_file(f"{bucket}/out/{k}.png"), good,
                _segmenter(segmenters, artifact, LARGE_SIZE))
    for key in ("rotated", "sub/odd_a", "wds/t1"):
        overlay = Image.open(io.BytesIO(fs.cat_file(f"{bucket}/out/{OVERLAY_DIR}/{key}.jpg")))
        assert overlay.format == "JPEG" and overlay.size == decode_image(good[key]).size
    manifest = json.loads(fs.cat_file(f"{bucket}/out/{MANIFEST_NAME}"))
    assert [e["key"] for e in manifest["errors"]] == [bad]
    assert manifest["config"]["image_size"] == LARGE_SIZE
    assert manifest["config"]["trained_image_size"] == TRAIN_SIZE


def test_segment_to_parquet(ray_local, artifact, segmenters, corpus, tmp_path):
    folder, good, bad = corpus
    out = tmp_path / "table"
    summary = run_segment(artifact, str(folder), str(out), output_format="parquet", **RUN)
    assert (summary["images"], summary["errors"]) == (len(good), 1)
    assert (summary["rows_total"], summary["errors_total"]) == (len(good) + 1, 1)
    rows = {r["key"]: r for r in pq.read_table(out).to_pylist()}
    assert set(rows) == set(good) | {bad}
    assert rows[bad]["png"] is None and "not an image" in rows[bad]["error"]
    assert rows["rotated"]["width"] == 40 and rows["rotated"]["height"] == 60
    _check_maps(lambda k: rows[k]["png"], good, _segmenter(segmenters, artifact, TRAIN_SIZE))
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert [e["key"] for e in manifest["errors"]] == [bad]
