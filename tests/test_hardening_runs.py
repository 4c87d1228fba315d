"""Hardening (issue 14) of whole pseudo-label runs: concurrent runs, failures, retries,
duplicate keys, empty inputs, and resume inside containers. Few images at 64 px: what is tested
here is bookkeeping, not labelling.
"""
from __future__ import annotations

import io
import json
import tarfile
import threading
from types import SimpleNamespace

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cli_output import cli_error_lines
from PIL import Image

from selfment_dist.io.schema import pseudo_label_schema
from selfment_dist.pipeline._internal import lease as _lease
from selfment_dist.pipeline._internal import parts as _parts
from selfment_dist.pipeline import pseudo_label as pl
from selfment_dist.pipeline._internal.parts import OutputBusyError, PartsSink
from selfment_dist.pipeline.pseudo_label import MANIFEST_NAME, run_pseudo_label
from selfment_dist.data.synthetic import make_scene, write_scenes

BACKBONE = "vit_small_patch16_224.dino"
# Model replicas as tasks on warm workers: built once for the module (see pipeline._warm).
RUN = dict(backbone=BACKBONE, weights="random", image_size=64, batch_size=4, progress=False,
           model_workers="tasks")

pytestmark = pytest.mark.usefixtures("ray_local")


def _jpeg(seed) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(make_scene((5, seed), size=(48, 48))[0]).save(buf, "JPEG")
    return buf.getvalue()


def _tar(path, keys) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for key, seed in keys:
            data = _jpeg(seed)
            info = tarfile.TarInfo(f"{key}.jpg")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())


def _fs(output, storage_options=None):
    fs, root = fsspec.core.url_to_fs(output, **(storage_options or {}))
    fs.invalidate_cache()
    return fs, root


def _rows(output, storage_options=None) -> list[dict]:
    fs, root = _fs(output, storage_options)
    rows = []
    for path in _parts.list_parts(fs, root):
        with fs.open(path, "rb") as f:
            rows += pq.read_table(f, columns=["key", "source", "error", "error_kind"]).to_pylist()
    return rows


def _manifest(output, storage_options=None) -> dict:
    fs, root = _fs(output, storage_options)
    with fs.open(f"{root}/{MANIFEST_NAME}", "rt") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("h")
    keys = write_scenes(str(root / "data"), 6, size=(48, 48))
    return str(root / "data" / "images"), set(keys)


# -- 1: two runs into one output ----------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_runs_at_once_never_lose_rows(images, tmp_path, where, request):
    folder, keys = images
    storage = None
    output = str(tmp_path / "out")
    if where == "s3":
        bucket, storage = request.getfixturevalue("s3_bucket")
        output = f"s3://{bucket}/out"
    outcomes: dict[str, object] = {}
    barrier = threading.Barrier(2)

    def run(name):
        barrier.wait()
        try:
            outcomes[name] = run_pseudo_label(folder, output, storage_options=storage, **RUN)
        except Exception as exc:  # noqa: BLE001 (the outcome is what is tested)
            outcomes[name] = exc

    threads = [threading.Thread(target=run, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    successes = [o for o in outcomes.values() if isinstance(o, dict)]
    failures = [o for o in outcomes.values() if not isinstance(o, dict)]
    assert len(successes) >= 1, outcomes
    for exc in failures:  # refused at start (or, at worst, fenced): never a silent success
        assert isinstance(exc, (OutputBusyError, _lease.FencedError)), repr(exc)
        if isinstance(exc, OutputBusyError):
            assert "is in use by run" in str(exc) or "was taken by run" in str(exc)
    rows = _rows(output, storage)
    assert sorted(r["key"] for r in rows) == sorted(keys)  # every key once
    manifest = _manifest(output, storage)
    assert manifest["status"] == "complete" and manifest["counts"]["rows"] == len(keys)
    assert manifest["lease"].get("released")
    # The output is free again: a third run resumes with nothing to do.
    third = run_pseudo_label(folder, output, storage_options=storage, **RUN)
    assert third["skipped"] == len(keys) and third["images"] == 0


@pytest.mark.slow
def test_a_live_run_refuses_a_second_one_and_a_dead_lease_does_not(images, tmp_path,
                                                                   monkeypatch):
    folder, keys = images
    output = tmp_path / "out"
    output.mkdir()
    lease = _lease.new_lease("0123456789ab")
    (output / MANIFEST_NAME).write_text(json.dumps({"lease": lease, "runs": [
        {"run_id": "0123456789ab", "status": "running"}]}))
    with pytest.raises(OutputBusyError, match="in use by run 0123456789ab"):
        run_pseudo_label(folder, str(output), **RUN)
    # The same lease from a driver that is gone (killed): taken over at once.
    lease["pid"] = 2**22 + 12345
    (output / MANIFEST_NAME).write_text(json.dumps({"lease": lease, "runs": [
        {"run_id": "0123456789ab", "status": "running"}]}))
    monkeypatch.setattr(_lease, "FENCE_GRACE_S", 0.0)
    summary = run_pseudo_label(folder, str(output), **RUN)
    assert summary["rows_total"] == len(keys)
    assert [r["status"] for r in _manifest(output)["runs"]] == ["interrupted", "complete"]


def test_a_fenced_writer_does_not_publish(tmp_path):
    """The write task of a run that lost the lease drops its part (no Ray needed)."""
    output = tmp_path / "out"
    output.mkdir()
    (output / MANIFEST_NAME).write_text(json.dumps({"lease": _lease.new_lease("bbbbbbbbbbbb")}))
    schema = pseudo_label_schema()
    row = {n: None for n in schema.names}
    row.update(key="k", source="s", error="x", error_kind="permanent")
    table = pa.Table.from_pylist([row], schema=schema)
    sink = PartsSink(str(output), schema, "aaaaaaaaaaaa", 10, None, manifest=MANIFEST_NAME)
    result = sink.write([table], SimpleNamespace(task_idx=0))
    assert result["file"] is None and result["fenced"]
    assert not list(output.glob("part-*"))
    sink = PartsSink(str(output), schema, "bbbbbbbbbbbb", 10, None, manifest=MANIFEST_NAME)
    assert sink.write([table], SimpleNamespace(task_idx=0))["file"]


# -- 11 and 2: failures leave a failed manifest and lock no settings ----------------------------

def test_failure_marks_the_manifest_failed_and_locks_nothing(images, tmp_path, monkeypatch):
    folder, keys = images
    output = str(tmp_path / "out")

    def boom(*a, **kw):
        raise RuntimeError("boom")
    monkeypatch.setattr(pl, "_label_missing", boom)
    with pytest.raises(RuntimeError, match="boom"):
        run_pseudo_label(folder, output, eps=1e-5, **RUN)
    manifest = _manifest(output)
    assert manifest["status"] == "failed"
    assert manifest["runs"][-1]["status"] == "failed" and "boom" in manifest["runs"][-1]["reason"]
    monkeypatch.undo()
    # No row was written: other settings are welcome, and the failed run's lease is released.
    summary = run_pseudo_label(folder, output, eps=1e-4, **RUN)
    assert summary["rows_total"] == len(keys)
    assert _manifest(output)["status"] == "complete"
    # Rows now exist: a different max_pixels (a resume key) is refused before anything runs.
    with pytest.raises(ValueError, match="max_pixels"):
        run_pseudo_label(folder, output, eps=1e-4, max_pixels=1000, **RUN)


# -- 3: transient errors are retried, permanent ones kept ---------------------------------------

@pytest.mark.slow
def test_rerun_retries_transient_error_rows_only(images, tmp_path):
    folder, keys = images
    output = tmp_path / "out"
    run_pseudo_label(folder, str(output), **RUN)
    transient, permanent = sorted(keys)[:2]
    # Turn two good rows into error rows as a network blip and a bad file would have left them.
    for path in _parts.list_parts(*_fs(str(output))):
        table = pq.read_table(path)
        rows = table.to_pylist()
        for r in rows:
            if r["key"] in (transient, permanent):
                r.update(mask=None, grid_h=None, grid_w=None, fg_fraction=None,
                         error="cannot read file: ReadTimeoutError",
                         error_kind="transient" if r["key"] == transient else "permanent")
        pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)
    summary = run_pseudo_label(folder, str(output), **RUN)
    assert summary["images"] == 1 and summary["skipped"] == len(keys) - 1
    rows = {r["key"]: r for r in _rows(str(output))}
    assert len(_rows(str(output))) == len(keys) == len(rows)
    assert rows[transient]["error"] is None and rows[transient]["error_kind"] is None
    assert rows[permanent]["error_kind"] == "permanent"


# -- 5 and issue 17: duplicate keys across containers, resume inside containers -----------------

def test_duplicate_keys_across_shards_and_resume_inside_containers(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    _tar(inputs / "a.tar", [("s000", 0), ("s001", 1), ("s002", 2)])
    _tar(inputs / "b.tar", [("s002", 12), ("s003", 13)])  # s002 again, another image
    pq.write_table(pa.table({"key": [f"p{i}" for i in range(4)],
                             "jpg": pa.array([_jpeg(20 + i) for i in range(4)], pa.binary())}),
                   inputs / "c.parquet", row_group_size=2)
    output = tmp_path / "out"
    run = dict(RUN, batch_size=2, rows_per_file=2)
    summary = run_pseudo_label(str(inputs), str(output), **run)
    expected = {"s000", "s001", "s002", "s003", "p0", "p1", "p2", "p3"}
    rows = _rows(str(output))
    assert sorted(r["key"] for r in rows) == sorted(expected)  # s002 once
    assert summary["duplicates"] == 1
    (dup,) = _manifest(output)["duplicates"]
    assert dup["key"] == "s002" and dup["kept"].endswith("a.tar")
    assert [s.rsplit("/", 1)[-1] for s in dup["removed"]] == ["b.tar"]
    assert next(r for r in rows if r["key"] == "s002")["source"].endswith("a.tar")

    # Half-done containers: drop some rows of each container, as a killed run leaves them.
    dropped = {"s001", "s003", "p1", "p2"}
    for path in _parts.list_parts(*_fs(str(output))):
        table = pq.read_table(path)
        keep = [k not in dropped for k in table.column("key").to_pylist()]
        kept = table.filter(pa.array(keep))
        if kept.num_rows:
            pq.write_table(kept, path)
        else:
            (output / path.rsplit("/", 1)[-1]).unlink()
    again = run_pseudo_label(str(inputs), str(output), **run)
    assert again["images"] == len(dropped) and again["skipped"] == len(expected) - len(dropped)
    rows = _rows(str(output))
    assert sorted(r["key"] for r in rows) == sorted(expected)
    assert all(r["error"] is None for r in rows)
    assert next(r for r in rows if r["key"] == "s002")["source"].endswith("a.tar")


# -- 12: empty input ----------------------------------------------------------------------------

def test_empty_input_is_an_error_unless_allowed(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    output = tmp_path / "out"
    with pytest.raises(ValueError, match="no images found .*allow_empty"):
        run_pseudo_label(str(empty), str(output), **RUN)
    assert not output.exists()
    summary = run_pseudo_label(str(empty), str(output), allow_empty=True, **RUN)
    assert summary["rows_total"] == 0
    assert _manifest(output)["status"] == "complete"


# -- issue 17: segment's parquet resume; segment refuses a busy output --------------------------

@pytest.mark.slow
def test_segment_parquet_resumes_and_refuses_a_busy_output(images, tmp_path):
    from selfment_dist.model.artifact import save_artifact
    from selfment_dist.model.head import PatchHead
    from selfment_dist.pipeline.segment import MANIFEST_NAME as SEGMENT_MANIFEST
    from selfment_dist.pipeline.segment import run_segment

    folder, keys = images
    model = str(tmp_path / "model")
    save_artifact(model, PatchHead(384), {"backbone": BACKBONE, "weights": "random",
                                          "image_size": 64})
    output = tmp_path / "seg"
    run = dict(output_format="parquet", batch_size=2, progress=False, model_workers="tasks")
    first = run_segment(model, folder, str(output), **run)
    assert first["rows_total"] == len(keys)
    dropped = set(sorted(keys)[::2])
    for path in _parts.list_parts(*_fs(str(output))):
        table = pq.read_table(path)
        kept = table.filter(pa.array([k not in dropped for k in table.column("key").to_pylist()]))
        pq.write_table(kept, path)
    again = run_segment(model, folder, str(output), **run)
    assert again["images"] == len(dropped) and again["skipped"] == len(keys) - len(dropped)
    got = [k for p in _parts.list_parts(*_fs(str(output)))
           for k in pq.read_table(p, columns=["key"]).column("key").to_pylist()]
    assert sorted(got) == sorted(keys)
    manifest = json.loads((output / SEGMENT_MANIFEST).read_text())
    assert manifest["status"] == "complete"
    manifest["lease"] = _lease.new_lease("feedfeedfeed")  # a live run of this process
    (output / SEGMENT_MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(OutputBusyError, match="in use by run feedfeedfeed"):
        run_segment(model, folder, str(output), **run)


# -- issue 30: an unwritable output, a full disk, a missing bucket (whole runs) -----------------



def _argv(folder, output, *extra) -> list[str]:
    return ["pseudo-label", "--input", folder, "--output", str(output), "--backbone", BACKBONE,
            "--weights", "random", "--image-size", "64", "--batch-size", "4", "--no-progress",
            "--model-workers", "tasks", *extra]


def test_an_unwritable_output_is_one_line_and_exit_2(images, tmp_path, capsys):
    """A real read-only mount (skipped without mount rights), and an output under a file."""
    from mounts import read_only_bind

    folder, _keys = images
    (tmp_path / "file").write_text("x")
    code, err = cli_error_lines(_argv(folder, tmp_path / "file" / "out"), capsys)
    assert code == 2 and len(err) == 1 and "cannot write to the output" in err[0], err
    (tmp_path / "src" / "out").mkdir(parents=True)
    with read_only_bind(tmp_path / "src", tmp_path / "ro") as ro:
        for output in (ro / "out", ro / "new"):  # an existing folder, one to be made
            code, err = cli_error_lines(_argv(folder, output), capsys)
            assert code == 2 and err == [f"selfment: error: cannot write to the output {output}: "
                                         "read-only file system"], err
    assert not list((tmp_path / "src").rglob("*.*"))


@pytest.mark.slow
def test_a_full_disk_is_one_line_a_failed_manifest_and_no_temp_file(images, tmp_path, capsys,
                                                                     monkeypatch):
    """A real full disk (a 2 MB tmpfs, filled once the run has registered; skipped without
    mount rights): the part writes fail ENOSPC in the Ray workers."""
    from mounts import fill, small_tmpfs

    folder, keys = images
    real_run = pl._label_missing  # the run proper, once the output is held
    filler = []

    def run_on_a_full_disk(*args, **kwargs):
        filler.append(fill(disk))
        return real_run(*args, **kwargs)
    with small_tmpfs(tmp_path / "disk", "2m") as disk:
        output = disk / "out"
        stale = output / f"{MANIFEST_NAME}.tmp-0ld0ld00"  # a killed run's leftover
        output.mkdir()
        stale.write_text("")
        import os
        os.utime(stale, (0, 0))
        monkeypatch.setattr(pl, "_label_missing", run_on_a_full_disk)
        code, err = cli_error_lines(_argv(folder, output), capsys)
        assert code == 2 and len(err) == 1, err
        assert err[0].startswith(f"selfment: error: cannot write to the output {output}: no "
                                 "space left on device"), err
        manifest = _manifest(str(output))
        assert manifest["status"] == "failed" and manifest["runs"][-1]["status"] == "failed"
        assert "no space left on device" in manifest["runs"][-1]["reason"]
        assert not [p.name for p in output.iterdir() if ".tmp-" in p.name]
        monkeypatch.undo()
        filler[0].unlink()  # space again: the re-run completes, leaving no temp file either
        summary = run_pseudo_label(folder, str(output), **RUN)
        assert summary["rows_total"] == len(keys)
        assert _manifest(str(output))["status"] == "complete"
        assert not [p.name for p in output.rglob("*") if ".tmp-" in p.name or p.name == "_tmp"]


def test_a_missing_output_bucket_is_refused_unless_asked_for(images, s3_bucket):
    from selfment_dist.io.output_access import MissingBucketError

    folder, keys = images
    bucket, storage = s3_bucket
    output = f"s3://{bucket}-typo/labels"
    with pytest.raises(MissingBucketError, match="does not exist.*--create-bucket"):
        run_pseudo_label(folder, output, storage_options=storage, **RUN)
    fs, _root = _fs(f"s3://{bucket}", storage)
    assert not fs.exists(f"{bucket}-typo")
    summary = run_pseudo_label(folder, output, storage_options=storage, create_bucket=True,
                               **RUN)
    assert summary["rows_total"] == len(keys)
