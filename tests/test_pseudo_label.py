"""The Ray Data pseudo-labelling pipeline end to end, on ~60 synthetic images.

Inputs: a folder, an img2dataset parquet file, a WebDataset tar and an S3 bucket (moto), each
with bad inputs of every kind mixed in. Every row is checked against the contract and against
``PseudoLabeler`` run directly on the same image. Pipeline runs are shared through module
fixtures to keep the file's runtime modest.
"""
from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from cli_output import printed_summary
from PIL import Image

from selfment_dist.model.backbone import build_backbone, resize_square
from selfment_dist.cli import main as cli_main
from selfment_dist.io import (PSEUDO_LABEL_SCHEMA, decode_features, decode_image, decode_mask,
                              pseudo_label_schema)
from selfment_dist.algorithm.labeler import PseudoLabeler
from selfment_dist.pipeline._internal import faults
from selfment_dist.pipeline._internal.model_stage import ActorResources
from selfment_dist.pipeline.pseudo_label import LabelActor, run_pseudo_label
from selfment_dist.settings import PseudoLabelSettings
from selfment_dist.data.synthetic import make_scene

BACKBONE = "vit_small_patch16_224.dino"
IMAGE_SIZE = 64                       # 4x4 patch grid: fast, still a real NCut + IPO
GRID = (IMAGE_SIZE // 16, IMAGE_SIZE // 16)
MAX_PIXELS = 1_000_000                # the synthetic "bomb" below is 2 MP
RUN = dict(backbone=BACKBONE, weights="random", image_size=IMAGE_SIZE, batch_size=8,
           max_pixels=MAX_PIXELS, progress=False)
# The module's main run (folder_run) runs an actor pool, the default; the others run the model
# as tasks on warm workers (the replica built once for the module).
WARM = {**RUN, "model_workers": "tasks"}
CLI = ["--backbone", BACKBONE, "--weights", "random", "--image-size", str(IMAGE_SIZE),
       "--batch-size", "8", "--max-pixels", str(MAX_PIXELS), "--model-workers", "tasks"]

pytestmark = pytest.mark.usefixtures("ray_local")


def _encode(image, fmt: str, **kw) -> bytes:
    im = image if isinstance(image, Image.Image) else Image.fromarray(image)
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _scene_jpg(i: int) -> bytes:
    return _encode(make_scene((7, i), size=(64, 80))[0], "JPEG", quality=90)


def _bad_inputs() -> dict[str, tuple[bytes, str]]:
    """name → (bytes, expected error fragment): one of every kind the issue lists."""
    jpg = _scene_jpg(999)
    return {
        "empty.jpg": (b"", "empty file (0 bytes)"),
        "truncated.jpg": (jpg[: len(jpg) // 2], "truncated or corrupt JPEG data"),
        "text.jpg": (b"just some text, named .jpg\n", "not an image: unrecognised format"),
        "float.tif": (_encode(np.zeros((16, 16), np.float32), "TIFF"), "unsupported image mode 'F'"),
        "bomb.png": (_encode(Image.new("1", (2000, 1000)), "PNG"),
                     "too many pixels: 2000x1000 = 2,000,000 > max_pixels 1,000,000"),
    }


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Inputs of every kind. ``good[key] = jpeg bytes``; ``bad[key] = error fragment``."""
    root = tmp_path_factory.mktemp("corpus")
    bad_inputs = _bad_inputs()
    sets = {"folder": range(0, 24), "parquet": range(24, 36), "tar": range(36, 48),
            "s3": range(48, 60)}
    c = {"root": root, "good": {}, "bad": {}, "folder_keys": set(), "container_keys": set(),
         "s3_files": {}, "s3_keys": set()}

    # A folder, with a subfolder, an EXIF-rotated image and every kind of bad file.
    folder = root / "folder"
    for i in sets["folder"]:
        key = f"scene_{i:03d}" if i % 3 else f"sub/scene_{i:03d}"
        (folder / key).parent.mkdir(parents=True, exist_ok=True)
        (folder / f"{key}.jpg").write_bytes(_scene_jpg(i))
        c["good"][key] = _scene_jpg(i)
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = _encode(make_scene((7, 500), size=(64, 80))[0], "JPEG", exif=exif)
    (folder / "sub" / "rotated.jpg").write_bytes(rotated)
    c["good"]["sub/rotated"] = rotated
    for name, (data, message) in bad_inputs.items():
        (folder / "bad" / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / "bad" / name).write_bytes(data)
        c["bad"][f"bad/{name.rsplit('.', 1)[0]}"] = message
    c["folder"] = str(folder)
    c["folder_keys"] = set(c["good"]) | set(c["bad"])

    # img2dataset-style parquet: key + jpg (+ failed downloads and broken bytes).
    keys = [f"p{i:05d}" for i in sets["parquet"]]
    images = [_scene_jpg(i) for i in sets["parquet"]]
    c["good"].update(zip(keys, images))
    keys += ["p_failed", "p_truncated", "p_text"]
    images += [None, bad_inputs["truncated.jpg"][0], bad_inputs["text.jpg"][0]]
    c["bad"].update({"p_failed": "no image bytes in this row (status=failed_to_download",
                     "p_truncated": "truncated or corrupt JPEG data",
                     "p_text": "not an image"})
    table = pa.table({"key": keys, "jpg": pa.array(images, pa.binary()),
                      "status": ["success"] * (len(keys) - 3) + ["failed_to_download",
                                                                 "success", "success"],
                      "error_message": [None] * (len(keys) - 3) + ["HTTP 404", None, None]})
    c["parquet"] = str(root / "img2dataset" / "00000.parquet")
    (root / "img2dataset").mkdir()
    pq.write_table(table, c["parquet"], row_group_size=5)

    # WebDataset shard: jpg + json samples, a caption-only sample, a bomb and an empty image.
    members = []
    for i in sets["tar"]:
        members += [(f"w{i:05d}.jpg", _scene_jpg(i)), (f"w{i:05d}.json", b"{}")]
        c["good"][f"w{i:05d}"] = _scene_jpg(i)
    members += [("w_nocaption.txt", b"no image here"), ("w_bomb.png", bad_inputs["bomb.png"][0]),
                ("w_empty.jpg", b"")]
    c["bad"].update({"w_nocaption": "WebDataset sample has no image member (found .txt)",
                     "w_bomb": "too many pixels", "w_empty": "empty file (0 bytes)"})
    c["tar"] = str(root / "wds" / "shard-000000.tar")
    (root / "wds").mkdir()
    (root / "wds" / "shard-000000.tar").write_bytes(_tar(members))
    c["container_keys"] = ({f"p{i:05d}" for i in sets["parquet"]} | {"p_failed", "p_truncated",
                                                                      "p_text"}
                           | {f"w{i:05d}" for i in sets["tar"]}
                           | {"w_nocaption", "w_bomb", "w_empty"})

    # Files for the S3 bucket (uploaded by the test: the bucket fixture is per test).
    for i in sets["s3"]:
        c["s3_files"][f"in/img/s{i:05d}.jpg"] = _scene_jpg(i)
        c["good"][f"img/s{i:05d}"] = _scene_jpg(i)
    c["s3_files"]["in/img/broken.jpg"] = bad_inputs["text.jpg"][0]
    c["bad"]["img/broken"] = "not an image"
    c["s3_keys"] = {f"img/s{i:05d}" for i in sets["s3"]} | {"img/broken"}
    return c


@pytest.fixture(scope="module")
def reference(corpus):
    """What the core library gives for each good image, computed directly (no Ray)."""
    backbone = build_backbone(BACKBONE, weights="random", image_size=IMAGE_SIZE, device="cpu")
    labeler = PseudoLabeler(backbone)
    keys = sorted(corpus["good"])
    sizes, arrays = {}, []
    for key in keys:
        pil = decode_image(corpus["good"][key])
        sizes[key] = pil.size
        arrays.append(resize_square(pil, IMAGE_SIZE))
    out = labeler(np.stack(arrays), return_ncut=True, return_features=True)
    return {key: {"size": sizes[key], "mask": out["mask"][i], "ncut": out["ncut_mask"][i],
                  "features": out["features"][i]} for i, key in enumerate(keys)}


def _read_output(output: str, storage_options: dict | None = None) -> pa.Table:
    fs, root = fsspec.core.url_to_fs(output, **(storage_options or {}))
    parts = sorted(p for p in fs.ls(root, detail=False) if p.endswith(".parquet"))
    tables = []
    for p in parts:
        with fs.open(p, "rb") as f:
            tables.append(pq.read_table(f))
    return pa.concat_tables(tables)


def _manifest(output: str, storage_options: dict | None = None) -> dict:
    fs, root = fsspec.core.url_to_fs(output, **(storage_options or {}))
    with fs.open(f"{root}/_selfment.json", "rt") as f:
        return json.load(f)


def check_output(output: str, expected_keys: set[str], corpus: dict, reference: dict, *,
                 storage_options: dict | None = None, optional: bool = False) -> pa.Table:
    """Every row: schema, unique keys, one per input, masks == the library's, clear errors."""
    table = _read_output(output, storage_options)
    schema = pseudo_label_schema(ncut_mask=optional, features=optional)
    for field in schema:
        assert table.schema.field(field.name).type == field.type, field.name
    assert table.schema.names == schema.names
    keys = table.column("key").to_pylist()
    assert len(keys) == len(set(keys)), "duplicate keys"
    assert set(keys) == expected_keys

    for row in table.to_pylist():
        key = row["key"]
        if key in corpus["bad"]:
            assert row["error"] and corpus["bad"][key] in row["error"], (key, row["error"])
            assert row["mask"] is None and row["grid_h"] is None and row["fg_fraction"] is None
            continue
        ref = reference[key]
        assert row["error"] is None, (key, row["error"])
        assert (row["width"], row["height"]) == ref["size"]
        assert (row["grid_h"], row["grid_w"]) == GRID
        mask = decode_mask(row["mask"], row["grid_h"], row["grid_w"])
        np.testing.assert_array_equal(mask, ref["mask"], err_msg=key)
        assert row["fg_fraction"] == pytest.approx(mask.mean())
        if optional:
            np.testing.assert_array_equal(decode_mask(row["ncut_mask"], *GRID), ref["ncut"])
            feats = decode_features(row["features"], *GRID)
            np.testing.assert_allclose(feats.astype(np.float32),
                                       ref["features"].astype(np.float32), atol=2e-3)

    manifest = _manifest(output, storage_options)
    n_errors = sum(k in corpus["bad"] for k in expected_keys)
    assert manifest["status"] == "complete"
    assert manifest["counts"]["rows"] == len(expected_keys)
    assert manifest["counts"]["errors"] == n_errors
    assert manifest["config"]["backbone"] == BACKBONE
    assert {"selfment_dist", "torch", "timm", "ray"} <= set(manifest["versions"])
    return table


@pytest.fixture(scope="module")
def folder_run(corpus, tmp_path_factory):
    output = str(tmp_path_factory.mktemp("out") / "folder")
    summary = run_pseudo_label(corpus["folder"], output, rows_per_file=8, **RUN)
    return output, summary


def test_folder(folder_run, corpus, reference):
    output, summary = folder_run
    n, n_bad = len(corpus["folder_keys"]), sum(k in corpus["bad"] for k in corpus["folder_keys"])
    assert summary["images"] == n and summary["errors"] == n_bad and summary["skipped"] == 0
    assert summary["rows_total"] == n and summary["errors_total"] == n_bad
    assert summary["images_per_s"] > 0 and summary["wall_s"] > 0
    assert summary["files_total"] >= 2  # rows_per_file=8: several parts
    table = check_output(output, corpus["folder_keys"], corpus, reference)
    (rotated,) = [r for r in table.to_pylist() if r["key"] == "sub/rotated"]
    assert (rotated["width"], rotated["height"]) == (64, 80)  # after EXIF orientation


def _cli(args: list[str], capsys) -> dict:
    """``selfment pseudo-label ...`` in-process (local mode: the module's Ray); its summary."""
    capsys.readouterr()
    assert cli_main(["pseudo-label", *args, *CLI]) == 0
    return printed_summary(capsys.readouterr().out)


@pytest.mark.slow
def test_parquet_and_webdataset_with_optional_columns(corpus, reference, tmp_path, capsys):
    output = str(tmp_path / "out")
    summary = _cli(["--input", corpus["parquet"], corpus["tar"], "--output", output,
                    "--save-ncut", "--save-features"], capsys)
    assert summary["images"] == len(corpus["container_keys"])
    check_output(output, corpus["container_keys"], corpus, reference, optional=True)
    assert _manifest(output)["feature_dim"] == 384


@pytest.mark.slow
def test_s3_in_and_out(s3_bucket, corpus, reference, capsys):
    bucket, options = s3_bucket
    fs = fsspec.filesystem("s3", **options)
    fs.pipe({f"{bucket}/{k}": v for k, v in corpus["s3_files"].items()})
    output = f"s3://{bucket}/in/labels"  # inside the input: must not be read as an input
    summary = _cli(["--input", f"s3://{bucket}/in", "--output", output,
                    *[f"--storage-option={k}={v}" for k, v in options.items()]], capsys)
    assert summary["images"] == len(corpus["s3_keys"]) and summary["errors"] == 1
    table = check_output(output, corpus["s3_keys"], corpus, reference, storage_options=options)
    assert all(s.startswith(f"s3://{bucket}/in/img/") for s in table.column("source").to_pylist())
    # Resume against the object store (whose listings fsspec caches): nothing left to do.
    again = run_pseudo_label(f"s3://{bucket}/in", output, storage_options=options, **RUN)
    assert again["images"] == 0 and again["skipped"] == len(corpus["s3_keys"])
    assert again["rows_total"] == len(corpus["s3_keys"])


@pytest.mark.slow
def test_tasks_on_warm_workers_label_as_actors_do_and_keep_their_model(folder_run, corpus,
                                                                       tmp_path):
    """``model_workers="tasks"``: the rows are the actor pool's, byte for byte; a second run
    of the same driver finds the replica built (no replica started), another model is built."""
    actor_output, actor_summary = folder_run
    assert actor_summary["replicas_started"] >= 1
    first = run_pseudo_label(corpus["folder"], str(tmp_path / "a"), rows_per_file=8, **WARM)
    second = run_pseudo_label(corpus["folder"], str(tmp_path / "b"), rows_per_file=8, **WARM)
    assert second["replicas_started"] == 0, (first, second)
    by_key = {}
    for output in (actor_output, str(tmp_path / "a"), str(tmp_path / "b")):
        table = _read_output(output).sort_by("key")
        by_key[output] = table.to_pylist()
    runs = list(by_key.values())
    assert runs[0] == runs[1] == runs[2]
    other = run_pseudo_label(corpus["folder"], str(tmp_path / "c"), rows_per_file=8,
                             **{**WARM, "image_size": 32})
    assert other["replicas_started"] >= 1 and other["images"] == first["images"]


def test_tasks_refuse_gpus_before_anything_is_written(corpus, tmp_path):
    output = tmp_path / "gpu"
    with pytest.raises(ValueError, match="model_workers='tasks' runs on CPUs only"):
        run_pseudo_label(corpus["folder"], str(output), num_gpus_per_actor=1, cpu_fallback=True,
                         **WARM)
    assert not output.exists()


def test_resume_is_a_noop_when_complete(folder_run, corpus):
    output, first = folder_run
    parts = sorted(p.name for p in Path(output).glob("*.parquet"))
    # The fixture's output is shared: compare with its history as this test finds it.
    history = [(r["run_id"], r["status"]) for r in _manifest(output)["runs"]]
    summary = run_pseudo_label(corpus["folder"], output, rows_per_file=8, **RUN)
    assert summary["images"] == 0 and summary["skipped"] == first["images"]
    assert summary["rows_total"] == first["rows_total"]
    assert sorted(p.name for p in Path(output).glob("*.parquet")) == parts
    assert [(r["run_id"], r["status"]) for r in _manifest(output)["runs"]] == [
        *history, (summary["run_id"], "complete")]


def test_no_run_leaves_its_counter_actor_behind(folder_run):
    """Each run's counters are a named actor, which outlives its handle: the run ends it (a
    driver that runs many pipelines, as this test session does, kept one process per run)."""
    import ray

    from selfment_dist.pipeline._internal.ray_runtime import COUNTERS_PREFIX

    left = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(COUNTERS_PREFIX)]
    assert not left, left


@pytest.mark.slow
def test_resume_after_a_killed_run(folder_run, corpus, reference, tmp_path):
    """What a kill leaves behind: parts missing, a part cut short (e.g. copied in from a
    store without atomic uploads), an unpublished temp file. The re-run fills exactly the gap."""
    source, _ = folder_run
    output = tmp_path / "partial"
    shutil.copytree(source, output)
    parts = sorted(output.glob("part-*.parquet"))
    lost = sum(pq.read_metadata(p).num_rows for p in parts[:2])
    for p in parts[:2]:
        p.unlink()
    cut = parts[2].read_bytes()
    lost += pq.read_metadata(parts[2]).num_rows
    parts[2].write_bytes(cut[: len(cut) // 2])  # no footer: not a complete part
    (output / "_tmp").mkdir(exist_ok=True)
    (output / "_tmp" / "part-0000000000aa-000001.parquet").write_bytes(b"PAR1 half-written")

    summary = run_pseudo_label(corpus["folder"], str(output), rows_per_file=8, **WARM)
    assert summary["images"] == lost
    assert summary["skipped"] == len(corpus["folder_keys"]) - lost
    check_output(str(output), corpus["folder_keys"], corpus, reference)
    assert not (output / "_tmp").exists()


@pytest.mark.slow
def test_a_replica_dying_mid_run_loses_nothing(corpus, reference, tmp_path, monkeypatch):
    """A model replica's process exits hard after its first batch: Ray retries its task on
    another worker; nothing is lost. (Model tasks on warm workers. Model actors that die are
    restarted, with their tasks retried: test_multinode.py loses a node, and the actors on it,
    in the middle of a pseudo-label run and of a segment run, and checks every key once.)"""
    output, marker = str(tmp_path / "faulty"), tmp_path / "fault-marker"
    monkeypatch.setenv(faults.LABEL_EXIT_AFTER_ENV, "1")
    monkeypatch.setenv(faults.MARKER_ENV, str(marker))
    summary = run_pseudo_label(corpus["folder"], output, **WARM)
    assert marker.exists()  # the replica did exit after its first batch
    assert summary["images"] == len(corpus["folder_keys"])
    check_output(output, corpus["folder_keys"], corpus, reference)


def test_resume_with_other_settings_is_refused(folder_run, corpus):
    output, _ = folder_run
    with pytest.raises(ValueError, match="image_size: 64 there, 32 now"):
        run_pseudo_label(corpus["folder"], output, **{**RUN, "image_size": 32})
    with pytest.raises(ValueError, match="precision: 'fp32' there, 'bf16' now"):
        run_pseudo_label(corpus["folder"], output, **{**RUN, "precision": "bf16"})
    assert _manifest(output)["config"]["precision"] == "fp32"  # auto, resolved for CPU actors


def test_model_failure_becomes_an_error_row(corpus):
    """Inside the model stage, an exception costs only the image that raised it."""
    settings = PseudoLabelSettings(inputs=["unused"], output="unused", backbone=BACKBONE,
                                   weights="random", image_size=IMAGE_SIZE, precision="fp32")
    actor = LabelActor(settings=settings, resources=ActorResources(device="cpu"))
    real = actor.labeler
    poison = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), 7, np.uint8)

    def flaky(images, **kw):
        if any((im == 7).all() for im in images):
            raise RuntimeError("NaN in features")
        return real(images, **kw)

    actor.labeler = flaky
    good = resize_square(decode_image(corpus["good"]["scene_001"]), IMAGE_SIZE)
    batch = {"key": np.array(["a", "b", "c", "d"], dtype=object),
             "source": np.array(["sa", "sb", "sc", "sd"], dtype=object),
             "width": np.array([80, 80, -1, 80], np.int32),
             "height": np.array([64, 64, -1, 64], np.int32),
             "error": np.array(["", "", "empty file (0 bytes)", ""], dtype=object),
             "image": np.stack([good, poison, np.zeros_like(good), good])}
    table = actor(batch)
    assert table.schema == PSEUDO_LABEL_SCHEMA
    rows = table.to_pylist()
    assert [r["key"] for r in rows] == ["a", "b", "c", "d"]
    assert rows[0]["error"] is None and rows[3]["error"] is None and rows[0]["mask"]
    assert rows[1]["error"] == "labelling failed: RuntimeError: NaN in features"
    assert rows[1]["width"] == 80 and rows[1]["mask"] is None
    assert rows[2]["error"] == "empty file (0 bytes)" and rows[2]["width"] is None


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "s3"])
def test_writes_of_a_superseded_run_are_fenced(where, tmp_path, request):
    """A write task whose run is no longer the manifest's latest (a killed run's leftover
    worker, after a re-run registered) publishes nothing; the latest run's task publishes."""
    from types import SimpleNamespace

    from selfment_dist.pipeline._internal.parts import MANIFEST_NAME, PartsSink

    options = None
    output = str(tmp_path / "fenced")
    if where == "s3":
        bucket, options = request.getfixturevalue("s3_bucket")
        output = f"s3://{bucket}/fenced"
    fs = fsspec.filesystem("s3", **options) if options else fsspec.filesystem("file")
    fs.makedirs(output.removeprefix("s3://"), exist_ok=True)
    schema = pseudo_label_schema()
    rows = pa.Table.from_pylist([{"key": "k", "source": "s", "error": "e"}], schema=schema)
    fs.pipe(f"{output.removeprefix('s3://')}/{MANIFEST_NAME}",
            json.dumps({"runs": [{"run_id": "0000000000aa"}, {"run_id": "0000000000bb"}]}).encode())

    old = PartsSink(output, schema, "0000000000aa", 8, options, manifest=MANIFEST_NAME)
    assert old.write([rows], SimpleNamespace(task_idx=3)) == {
        "file": None, "rows": 0, "errors": 0, "feature_dim": None,
        "fenced": "part-0000000000aa-000003.parquet"}
    new = PartsSink(output, schema, "0000000000bb", 8, options, manifest=MANIFEST_NAME)
    published = new.write([rows], SimpleNamespace(task_idx=3))
    assert published["file"] == "part-0000000000bb-000003.parquet"
    fs.invalidate_cache()
    parts = [p.rsplit("/", 1)[-1] for p in fs.find(output.removeprefix("s3://"))
             if p.endswith(".parquet")]
    assert parts == ["part-0000000000bb-000003.parquet"]


def test_camera_folder_gives_one_row_per_image(tmp_path, capsys):
    """Issue 30: camera names (``_DSC0001.JPG``, ``_selects/``) are images, each with its row;
    what is skipped on purpose (macOS litter) is counted in the summary and the manifest."""
    folder = tmp_path / "card"
    for i, rel in enumerate(("_DSC0001.JPG", "DSC0002.JPG", "_selects/DSC0003.JPG")):
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(_scene_jpg(i))
    (folder / "._DSC0002.JPG").write_bytes(b"AppleDouble resource fork")
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    with tarfile.open(folder / "card2.tar", "w") as tar:  # a shard with its macOS litter
        for name, data in (("DSC0009.jpg", _scene_jpg(9)), ("._DSC0009.jpg", b"fork")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    output = str(tmp_path / "out")
    summary = _cli(["--input", str(folder), "--output", output], capsys)
    rows = pq.read_table(output, columns=["key", "error"]).to_pylist()
    assert sorted(r["key"] for r in rows) == ["DSC0002", "DSC0009", "_DSC0001", "_selects/DSC0003"]
    assert all(r["error"] is None for r in rows)
    assert summary["images"] == 4 and summary["errors"] == 0
    expected = {"total": 2, "by_reason": {"hidden": 2}, "examples": [".DS_Store", "._DSC0002.JPG"],
                "tar_members": 1}
    assert summary["inputs_skipped"] == expected
    assert _manifest(output)["inputs_skipped"] == expected


def test_mask_columns_are_the_public_functions_of_the_features_column(tmp_path):
    """Issue 30 #14 through the pipeline: each row's ``mask`` is :func:`pseudo_label` and its
    ``ncut_mask`` :func:`ncut_bipartition` of its own ``features`` column (decoded with
    :func:`decode_features`), computed here, apart from the labeller. At 128 px (8x8 patches)
    IPO moves patches of some of these scenes, so swapped masks would fail."""
    from selfment_dist import ncut_bipartition, pseudo_label

    folder = tmp_path / "scenes"
    folder.mkdir()
    for i in range(12):  # PNG: the pixels as drawn
        Image.fromarray(make_scene((7, i), size=(64, 80))[0]).save(folder / f"s{i:02d}.png")
    output = str(tmp_path / "out")
    run_pseudo_label(str(folder), output, save_ncut=True, save_features=True,
                     **{**WARM, "image_size": 128})
    table = _read_output(output)
    moved = 0
    for row in table.to_pylist():
        assert row["error"] is None, row
        grid = (row["grid_h"], row["grid_w"])
        assert grid == (8, 8)
        feats = torch.from_numpy(decode_features(row["features"], *grid).copy())[None]
        mask, ncut = decode_mask(row["mask"], *grid), decode_mask(row["ncut_mask"], *grid)
        np.testing.assert_array_equal(mask, pseudo_label(feats)[0].numpy(), err_msg=row["key"])
        np.testing.assert_array_equal(ncut, ncut_bipartition(feats)[0].numpy(),
                                      err_msg=row["key"])
        moved += bool((mask != ncut).any())
    assert moved, "IPO changed no mask: the test could not tell the masks apart"
