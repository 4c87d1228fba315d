"""``selfment pseudo-label`` killed mid-run, its stale writers alive, then re-run (issue 17,
items 6 and 10; issue 14, item 8).

The killed run is a CLI process (``python -m selfment_dist.cli``) in a session of its own with
its own local Ray (``ensure_ray`` starts one with ``address="local"``), its write tasks pausing
between writing a part and its fencing check (``SELFMENT_TEST_PUBLISH_DELAY_S``). Once it has
published a part, every process of its session is frozen (SIGSTOP) and the driver's process
group (driver, GCS, raylet) is SIGKILLed; the frozen Ray workers, in process groups of their
own, stay. The re-run goes in-process on the suite's Ray; once it has listed what is done, the
frozen workers are resumed (SIGCONT): a write task of theirs that was waiting reaches its fencing
check while the re-run redoes its keys. On local disk and on S3 (where an unpublished part is an
aborted upload) the result holds every key exactly once, with no duplicates to resolve, and the
manifest records the killed run as interrupted.

The S3 run also carries ``--log-level DEBUG``, a fake session token and secret key, and a Ray
temp dir of its own: neither credential may appear in its output or in any of its Ray session's
logs. (One killed run checks both: a fresh CLI process with its own Ray costs tens of seconds on
two cores.)

Should the killed run finish before it can be frozen (a fast machine), the test still checks
the result; it does not fail. (On this Ray, resumed workers whose raylet is gone tend to exit
before their write reaches publishing; the fencing check itself is pinned by
``test_hardening_runs.py::test_a_fenced_writer_does_not_publish``.)
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import fsspec
import psutil
import pyarrow.parquet as pq
import pytest
from kill_helpers import name, session_members, start_cli

from selfment_dist.pipeline._internal import faults
from selfment_dist.pipeline._internal import parts as _parts
from selfment_dist.pipeline.pseudo_label import MANIFEST_NAME, run_pseudo_label
from selfment_dist.data.synthetic import write_scenes

pytestmark = pytest.mark.slow  # killed CLI runs, local and S3

BACKBONE = "vit_small_patch16_224.dino"
N_IMAGES = 12
IMAGE_SIZE = 64
ARGS = dict(backbone=BACKBONE, weights="random", image_size=IMAGE_SIZE, batch_size=2,
            rows_per_file=2)  # one part per batch: parts appear one by one
CLI = ["--backbone", BACKBONE, "--weights", "random", "--image-size", str(IMAGE_SIZE),
       "--batch-size", "2", "--rows-per-file", "2", "--no-progress"]
PUBLISH_DELAY_S = 2.0
DEADLINE_S = 240.0
TOKEN = "FAKETOKENc0ffee5ecre7da7a0123456789abcdef"
SECRET = "FAKESECRETba5eba11deadbeef0123456789"


def _signal(procs, sig) -> None:
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.Error:
            pass


def _kill_all(sid: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while (left := session_members(sid)) and time.monotonic() < deadline:
        _signal(left, signal.SIGCONT)
        _signal(left, signal.SIGKILL)
        psutil.wait_procs(left, timeout=2)


def _parts_and_keys(output: str, storage: dict | None) -> tuple[list[str], list[str]]:
    fs, root = fsspec.core.url_to_fs(output, **(storage or {}))
    fs.invalidate_cache()
    parts = _parts.list_parts(fs, root)
    keys = []
    for path in parts:
        with fs.open(path, "rb") as f:
            keys += pq.read_table(f, columns=["key"]).column("key").to_pylist()
    return parts, keys


def _rows(output: str, storage: dict | None) -> list[dict]:
    fs, root = fsspec.core.url_to_fs(output, **(storage or {}))
    rows = []
    for path in _parts.list_parts(fs, root):
        with fs.open(path, "rb") as f:
            rows += pq.read_table(f, columns=["key", "mask", "grid_h", "grid_w",
                                              "error"]).to_pylist()
    return rows


def _manifest(output: str, storage: dict | None) -> dict:
    fs, root = fsspec.core.url_to_fs(output, **(storage or {}))
    fs.invalidate_cache()
    with fs.open(f"{root}/{MANIFEST_NAME}", "rt") as f:
        return json.load(f)


def _leaks(texts: dict[str, str]) -> list[str]:
    return [where for where, text in texts.items() if TOKEN in text or SECRET in text]


def _ray_logs(temp_dir: str) -> dict[str, str]:
    logs = {}
    for path in Path(temp_dir).rglob("*"):
        if path.is_file() and not path.is_symlink() and "sockets" not in path.parts:
            try:
                logs[str(path)] = path.read_bytes().decode("utf-8", "replace")
            except OSError:
                continue
    return logs


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_killed_run_with_stale_writers_is_finished_by_its_rerun(tmp_path, where, request):
    expected = set(write_scenes(str(tmp_path / "data"), N_IMAGES, size=(48, 64)))
    images = tmp_path / "data" / "images"
    storage, output, extra = None, str(tmp_path / "out"), []
    # Ray's unix sockets need a short path: not under tmp_path.
    ray_tmp = tempfile.mkdtemp(prefix="rk", dir="/tmp")
    env = {"RAY_TMPDIR": ray_tmp, faults.PUBLISH_DELAY_ENV: str(PUBLISH_DELAY_S)}
    if where == "s3":
        bucket, storage = request.getfixturevalue("s3_bucket")
        output = f"s3://{bucket}/out"
        storage = {**storage, "secret": SECRET, "token": TOKEN}  # moto takes any
        extra = ["--log-level", "DEBUG",
                 *(f"--storage-option={k}={v}" for k, v in storage.items())]
    log = tmp_path / "killed.log"
    proc = start_cli([*extra[:2], "pseudo-label", "--input", str(images), "--output", output,
                      *CLI, *extra[2:]], log, env)
    frozen: list[psutil.Process] = []
    running: set[str] = set()
    try:
        deadline = time.monotonic() + DEADLINE_S
        while proc.poll() is None and not _parts_and_keys(output, storage)[0]:
            if time.monotonic() > deadline:
                pytest.fail("no part published in time:\n" + log.read_text()[-3000:])
            time.sleep(0.1)
        finished = proc.poll() is not None
        if not finished:
            members = session_members(proc.pid)
            running = {name(p) for p in members}
            _signal(members, signal.SIGSTOP)  # everything freezes where it is
            os.killpg(proc.pid, signal.SIGKILL)  # the driver, the GCS, the raylet
            proc.wait(timeout=30)
            time.sleep(0.5)
            frozen = session_members(proc.pid)  # Ray workers: process groups of their own
        else:
            assert proc.returncode == 0, log.read_text()[-3000:]
        text = log.read_text(errors="replace")
        # Its own Ray: it says it started one, and (when caught alive) a GCS and a raylet ran
        # in its session.
        assert "Started a local Ray instance" in text, text[-3000:]
        assert finished or {"gcs_server", "raylet"} <= running, running

        # What the kill left: published parts of the killed run only, an unfinished manifest.
        before_parts, before = _parts_and_keys(output, storage)
        assert before, "no keys in the parts published before the kill"
        assert len(before) == len(set(before)) and set(before) <= expected
        killed = _manifest(output, storage)
        killed_id = killed["runs"][0]["run_id"]
        if not finished:
            assert killed["status"] == "running"
            assert [r["status"] for r in killed["runs"]] == ["running"]
        assert all(p.rsplit("/", 1)[-1].startswith(f"part-{killed_id}-") for p in before_parts)

        # The re-run; the frozen workers go on once it has listed what is done.
        request.getfixturevalue("ray_local")
        result: dict = {}
        listed = threading.Event()
        real_existing = _parts.existing_keys

        def spy(fs, root):
            done = real_existing(fs, root)
            listed.set()
            return done
        monkeypatch = request.getfixturevalue("monkeypatch")
        monkeypatch.setattr("selfment_dist.pipeline.pseudo_label.existing_keys", spy)

        def rerun():
            try:
                # The killed run had actors (the CLI's default); the re-run's replicas are
                # tasks on the shared Ray's warm workers (what it resumes is the same).
                result["summary"] = run_pseudo_label(str(images), output, storage_options=storage,
                                                     progress=False, model_workers="tasks",
                                                     **ARGS)
            except Exception as exc:  # noqa: BLE001
                result["error"] = exc
        thread = threading.Thread(target=rerun)
        thread.start()
        assert listed.wait(timeout=DEADLINE_S)
        _signal(frozen, signal.SIGCONT)
        thread.join(timeout=DEADLINE_S)
        # Give a stale writer that outlived the re-run its chance to publish, too.
        time.sleep(PUBLISH_DELAY_S + 1.0)
    finally:
        _kill_all(proc.pid)
    try:
        if where == "s3":
            # DEBUG logging was on (the package's loggers did log), and no credential leaked:
            # not in the run's output, not in any log of its Ray session.
            assert "INFO selfment_dist" in text or "DEBUG selfment_dist" in text, text[-2000:]
            logs = {"output": log.read_text(errors="replace"), **_ray_logs(ray_tmp)}
            assert any("/logs/" in where_ for where_ in logs), sorted(logs)[:10]
            assert not _leaks(logs), _leaks(logs)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)

    assert "error" not in result, result.get("error")
    summary = result["summary"]
    parts, keys = _parts_and_keys(output, storage)
    assert len(keys) == len(set(keys)), "duplicate keys"
    assert set(keys) == expected, "missing keys"
    assert summary["duplicates"] == 0  # nothing was published that needed resolving
    assert summary["skipped"] == len(before) and summary["images"] == N_IMAGES - len(before)
    assert summary["rows_total"] == N_IMAGES
    # The killed run's parts are kept as they were; the re-run adds its own.
    assert set(before_parts) <= set(parts)
    assert all(p.rsplit("/", 1)[-1].startswith((f"part-{killed_id}-",
                                                 f"part-{summary['run_id']}-")) for p in parts)
    if where == "local":
        assert not (Path(output) / _parts.TMP_DIR).exists()
    for row in _rows(output, storage):
        assert row["error"] is None and row["mask"], row["key"]
        assert row["grid_h"] == row["grid_w"] == IMAGE_SIZE // 16, row["key"]
    manifest = _manifest(output, storage)
    assert manifest["status"] == "complete" and "duplicates" not in manifest
    assert manifest["counts"]["rows"] == N_IMAGES
    assert [(r["run_id"], r["status"]) for r in manifest["runs"]] == [
        (killed_id, "complete" if finished else "interrupted"), (summary["run_id"], "complete")]
    print(f"{where}: {len(frozen)} frozen workers, {len(before)} keys before the re-run")
