"""A killed run whose workers live on and try to publish during the re-run (issue 17, item 6).

``selfment pseudo-label`` runs in its own session with its own Ray, its write tasks pausing
between writing a part and its fencing check (``SELFMENT_TEST_PUBLISH_DELAY_S``). Once it has
published a part, every process of its session is frozen (SIGSTOP), then the driver's process
group (driver, GCS, raylet) is SIGKILLed; the frozen Ray workers, in process groups of their
own, stay. The re-run starts in-process; after it has listed what is done, the frozen workers
are resumed (SIGCONT): any write task of theirs that was waiting now reaches its fencing check
while the re-run redoes its keys. The result must hold every key exactly once, with no
duplicates to resolve, on local disk and on S3 (where an unpublished part is an aborted upload).

Should the killed run finish before it can be frozen (a fast machine), the test still checks
the resumed output; it does not fail. (On this Ray, resumed workers whose raylet is gone tend to
exit before their write reaches publishing; the fencing check itself is pinned by
``test_hardening_runs.py::test_a_fenced_writer_does_not_publish``.)
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import fsspec
import psutil
import pyarrow.parquet as pq
import pytest
from kill_helpers import session_members

from selfment_dist.pipeline import _parts
from selfment_dist.pipeline.pseudo_label import MANIFEST_NAME, run_pseudo_label
from selfment_dist.synthetic import write_scenes

BACKBONE = "vit_small_patch16_224.dino"
N_IMAGES = 10
ARGS = dict(backbone=BACKBONE, weights="random", image_size=64, batch_size=2, rows_per_file=2)
CLI = ["--backbone", BACKBONE, "--weights", "random", "--image-size", "64", "--batch-size", "2",
       "--rows-per-file", "2", "--no-progress"]
PUBLISH_DELAY_S = 2.0
DEADLINE_S = 240.0


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


def _manifest(output: str, storage: dict | None) -> dict:
    fs, root = fsspec.core.url_to_fs(output, **(storage or {}))
    fs.invalidate_cache()
    with fs.open(f"{root}/{MANIFEST_NAME}", "rt") as f:
        return json.load(f)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_stale_writers_of_a_killed_run_cannot_publish_into_its_rerun(tmp_path, where, request):
    expected = set(write_scenes(str(tmp_path / "data"), N_IMAGES, size=(48, 48)))
    images = tmp_path / "data" / "images"
    storage, output, extra = None, str(tmp_path / "out"), []
    if where == "s3":
        bucket, storage = request.getfixturevalue("s3_bucket")
        output = f"s3://{bucket}/out"
        extra = [f"--storage-option={k}={v}" for k, v in storage.items()]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0",
               **{_parts.PUBLISH_DELAY_ENV: str(PUBLISH_DELAY_S)})
    log = tmp_path / "killed.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "selfment_dist.cli", "pseudo-label", "--input", str(images),
             "--output", output, *CLI, *extra], env=env, stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True)
    frozen: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + DEADLINE_S
        while proc.poll() is None and not _parts_and_keys(output, storage)[0]:
            if time.monotonic() > deadline:
                pytest.fail("no part published in time:\n" + log.read_text()[-3000:])
            time.sleep(0.1)
        if proc.poll() is None:
            members = session_members(proc.pid)
            _signal(members, signal.SIGSTOP)  # everything freezes where it is
            os.killpg(proc.pid, signal.SIGKILL)  # the driver, the GCS, the raylet
            proc.wait(timeout=30)
            time.sleep(0.5)
            frozen = session_members(proc.pid)  # Ray workers: process groups of their own
        else:
            assert proc.returncode == 0, log.read_text()[-3000:]
        before_parts, before = _parts_and_keys(output, storage)
        assert len(before) == len(set(before))

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
                result["summary"] = run_pseudo_label(str(images), output, storage_options=storage,
                                                     progress=False, **ARGS)
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
    assert "error" not in result, result.get("error")
    summary = result["summary"]
    parts, keys = _parts_and_keys(output, storage)
    assert len(keys) == len(set(keys)), "duplicate keys"
    assert set(keys) == expected, "missing keys"
    assert summary["duplicates"] == 0  # nothing was published that needed resolving
    assert summary["skipped"] == len(before) and summary["rows_total"] == N_IMAGES
    assert set(before_parts) <= set(parts)
    manifest = _manifest(output, storage)
    assert manifest["status"] == "complete" and "duplicates" not in manifest
    print(f"{where}: {len(frozen)} frozen workers, {len(before)} keys before the re-run")
