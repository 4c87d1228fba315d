"""A real kill: ``selfment pseudo-label`` is SIGKILLed mid-run, then resumed in-process.

The killed run is a separate process (``python -m selfment_dist.cli``) in its own session, with
its own local Ray (``ensure_ray`` starts Ray with ``address="local"``, so it never attaches to
another one). As soon as it has published its first part, the whole session is SIGKILLed: the
driver, GCS and raylet share the driver's process group, but Ray's workers each run in a process
group of their own and outlive ``killpg`` for up to tens of seconds, so they are found by
session id and killed too. Only then is the output inspected and the run resumed, with the
module's in-process Ray (``ray_local``), started only after the kill so that the two Rays never
compete for the CPUs.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from kill_helpers import kill_session as _kill_session
from kill_helpers import name as _name
from kill_helpers import session_members as _session_members
from kill_helpers import tail as _tail

from selfment_dist.pipeline.pseudo_label import MANIFEST_NAME, run_pseudo_label
from selfment_dist.synthetic import write_scenes

BACKBONE = "vit_small_patch16_224.dino"
IMAGE_SIZE = 64
BATCH_SIZE = 2       # 30 model calls for 60 images
ROWS_PER_FILE = 2    # one part per batch: parts appear one by one, ~0.3 s apart on 2 CPUs
N_IMAGES = 60
FIRST_PART_DEADLINE_S = 180.0
POLL_S = 0.05
RUN = dict(backbone=BACKBONE, weights="random", image_size=IMAGE_SIZE, batch_size=BATCH_SIZE,
           rows_per_file=ROWS_PER_FILE, progress=False)
CLI = ["--backbone", BACKBONE, "--weights", "random", "--image-size", str(IMAGE_SIZE),
       "--batch-size", str(BATCH_SIZE), "--rows-per-file", str(ROWS_PER_FILE), "--no-progress"]


def _published_parts(output: Path) -> list[Path]:
    """Parts at the top of ``output`` (published); ``_tmp/`` holds unpublished ones."""
    try:
        return sorted(output / e.name for e in os.scandir(output)
                      if e.name.startswith("part-") and e.name.endswith(".parquet"))
    except FileNotFoundError:
        return []


def _keys(output: Path) -> list[str]:
    keys: list[str] = []
    for part in _published_parts(output):
        keys += pq.read_table(part, columns=["key"]).column("key").to_pylist()
    return keys


def _manifest(output: Path) -> dict:
    return json.loads((output / MANIFEST_NAME).read_text())


def test_resume_after_a_real_sigkill(tmp_path, request):
    expected = set(write_scenes(str(tmp_path / "data"), N_IMAGES, size=(64, 80)))
    images = tmp_path / "data" / "images"
    output = tmp_path / "out"
    log = tmp_path / "killed-run.log"

    # 1. The run to kill: its own session, its own local Ray.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0")
    cmd = [sys.executable, "-m", "selfment_dist.cli", "pseudo-label", "--input", str(images),
           "--output", str(output), *CLI]
    start = time.monotonic()
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=log_file,
                                stderr=subprocess.STDOUT, start_new_session=True)
    running: set[str] = set()
    survivors: list[str] = []
    try:
        deadline = time.monotonic() + FIRST_PART_DEADLINE_S
        while not _published_parts(output):
            if proc.poll() is not None:
                pytest.fail(f"the run exited (rc {proc.returncode}) before publishing a part:\n"
                            + _tail(log))
            if time.monotonic() > deadline:
                pytest.fail(f"no part within {FIRST_PART_DEADLINE_S:.0f} s:\n" + _tail(log))
            time.sleep(POLL_S)
        running = {_name(p) for p in _session_members(proc.pid)}
        survivors = _kill_session(proc)
    finally:
        if proc.poll() is None or _session_members(proc.pid):
            _kill_session(proc)
    # Its own Ray: a GCS and a raylet ran in its session, and it says it started them.
    assert {"gcs_server", "raylet"} <= running, running
    assert "Started a local Ray instance" in _tail(log, 10**6)
    print(f"killed after {time.monotonic() - start:.1f} s with {len(running)} processes; "
          f"alive after killpg: {sorted(survivors)}; left in _tmp: "
          f"{sorted(os.listdir(output / '_tmp')) if (output / '_tmp').exists() else None}")

    # 2. What the kill left: some published parts, an unfinished manifest.
    assert not _session_members(proc.pid)
    before = _keys(output)
    # A fast machine may finish before the kill lands: then the resume has nothing to do.
    finished = len(before) >= N_IMAGES
    assert before, "no keys in the parts published before the kill"
    assert len(before) == len(set(before)) and set(before) <= expected
    killed = _manifest(output)
    if not finished:
        assert killed["status"] == "running"
        assert [r["status"] for r in killed["runs"]] == ["running"]
    killed_id = killed["runs"][0]["run_id"]
    killed_parts = {p.name for p in _published_parts(output)}
    assert all(name.startswith(f"part-{killed_id}-") for name in killed_parts)

    # 3. Resume in-process on the module's Ray (started only now).
    request.getfixturevalue("ray_local")
    summary = run_pseudo_label(str(images), str(output), **RUN)
    print(f"resumed: {summary}")
    missing = N_IMAGES - len(before)
    assert summary["skipped"] == len(before)
    assert summary["images"] == missing
    assert summary["rows_total"] == N_IMAGES
    assert not (output / "_tmp").exists()

    # 4. Every key exactly once; the killed run's parts kept as they were.
    parts = _published_parts(output)
    assert killed_parts <= {p.name for p in parts}
    assert all(p.name.startswith((f"part-{killed_id}-", f"part-{summary['run_id']}-"))
               for p in parts)
    rows = [row for p in parts for row in pq.read_table(p).to_pylist()]
    keys = [row["key"] for row in rows]
    assert len(keys) == len(set(keys)), "duplicate keys"
    assert set(keys) == expected
    for row in rows:
        if row["error"] is None:
            assert row["mask"] and row["grid_h"] == row["grid_w"] == IMAGE_SIZE // 16, row["key"]
    manifest = _manifest(output)
    assert manifest["status"] == "complete"
    assert manifest["counts"]["rows"] == N_IMAGES
    assert [(r["run_id"], r["status"]) for r in manifest["runs"]] == [
        (killed_id, "complete" if finished else "interrupted"), (summary["run_id"], "complete")]

