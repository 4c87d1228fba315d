"""Real kills of ``selfment train`` and ``selfment segment``, then a re-run with the same settings.

Each killed run is a CLI process in a session of its own with its own local Ray
(:mod:`kill_helpers`); it is SIGKILLed, with every Ray worker of its session, once it has
published something (a training checkpoint; the first maps), by polling the
output, never by a timer. The re-run then goes in-process on the suite's shared Ray
(``ray_local``). Should a fast machine finish a run before it is killed, the training test makes
the run longer and tries again; the segment test still checks the result. The CLI runs also show
that ``selfment train`` and ``selfment segment`` reach their stages (the dispatch of evaluate is
test_pipeline_strength.py's).
"""
from __future__ import annotations

import json
import os

import pytest
from kill_helpers import kill_session, session_members, start_cli, tail, wait_until
from PIL import Image
from test_train import _feature_rows, write_labels

from selfment_dist.model.artifact import load_artifact, save_artifact
from selfment_dist.model.head import PatchHead
from selfment_dist.pipeline.segment import MANIFEST_NAME as SEGMENT_MANIFEST
from selfment_dist.pipeline.segment import run_segment
from selfment_dist.pipeline.train import CONFIG_NAME, RUN_NAME, run_train
from selfment_dist.data.synthetic import write_scenes

pytestmark = pytest.mark.slow  # SIGKILL + re-runs of the CLI

DEADLINE_S = 300.0
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train V2's record of the run's checkpoints



def _kill(proc) -> None:
    kill_session(proc)
    assert not session_members(proc.pid)


# ---------------------------------------------------------------------------------------------
# train

N_LABELS, BATCH, CHECKPOINT_EVERY = 24, 2, 3  # 12 steps per epoch, a checkpoint every 3 steps


def _latest_checkpoint(output) -> str | None:
    """The latest checkpoint Ray Train has recorded in its snapshot (what a re-run restores)."""
    try:
        snapshot = json.loads((output / RUN_NAME / SNAPSHOT).read_text())
    except (OSError, ValueError):  # not there yet, or being rewritten
        return None
    latest = snapshot.get("latest_checkpoint_result")
    return latest and latest.get("checkpoint_dir_name")


def _step(checkpoint_dir: str) -> int:
    return int(checkpoint_dir.rsplit("step", 1)[1])


def test_train_resumes_after_its_driver_is_killed(tmp_path, request):
    labels = write_labels(tmp_path / "labels", _feature_rows(N_LABELS), image_size=128,
                          features=True)
    settings = dict(workers=1, batch_size=BATCH, checkpoint_every=CHECKPOINT_EVERY,
                    min_confidence=0.0)
    epochs = 6
    for attempt in range(3):  # finished before the kill: a longer run, never a failure
        output = tmp_path / f"model-{attempt}"
        log = tmp_path / f"train-{attempt}.log"
        proc = start_cli(["train", "--labels", labels, "--output", str(output), "--workers", "1",
                          "--epochs", str(epochs), "--batch-size", str(BATCH),
                          "--checkpoint-every", str(CHECKPOINT_EVERY), "--min-confidence", "0"],
                         log)
        try:
            caught = wait_until(lambda: _latest_checkpoint(output) is not None, proc, log,
                                DEADLINE_S)
            if caught and proc.poll() is None:
                break
        finally:
            _kill(proc)
        assert proc.returncode == 0, tail(log)
        epochs *= 4
    else:
        pytest.fail("every training run finished before its first checkpoint was seen")
    assert not (output / "model.json").exists(), "killed, but the artifact is there"
    killed_at = _step(_latest_checkpoint(output))
    config = json.loads((output / CONFIG_NAME).read_text())
    print(f"train killed after its checkpoint of step {killed_at} ({epochs} epochs asked, "
          f"attempt {attempt + 1})")

    request.getfixturevalue("ray_local")
    summary = run_train(labels, str(output), epochs=epochs, **settings)
    steps_per_epoch = N_LABELS // BATCH
    assert summary["status"] == "trained"
    assert summary["resumed_from_steps"] == [killed_at], (summary["resumed_from_steps"],
                                                          tail(log))
    assert summary["steps"] == epochs * steps_per_epoch and summary["epochs"] == epochs
    assert len(summary["history"]) == epochs  # no epoch counted twice
    assert all(h["images"] == N_LABELS for h in summary["history"])
    head, meta = load_artifact(str(output))
    assert meta["training"]["resumed_from_steps"] == [killed_at]
    assert meta["feature_dim"] == 384 and sum(p.numel() for p in head.parameters()) > 0
    # One config, one artifact; the re-run's config is the killed run's.
    assert json.loads((output / CONFIG_NAME).read_text()) == config
    names = sorted(os.listdir(output))
    assert names.count(CONFIG_NAME) == 1 and names.count("model.json") == 1, names
    # The same settings again: nothing to do.
    again = run_train(labels, str(output), epochs=epochs, **settings)
    assert again["status"] == "already_done" and again["steps"] == summary["steps"]


# ---------------------------------------------------------------------------------------------
# segment

BACKBONE = "vit_small_patch16_224.dino"
N_IMAGES = 24


@pytest.fixture(scope="module")
def model_and_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("segment")
    keys = set(write_scenes(str(root / "data"), N_IMAGES, size=(48, 64)))
    model = str(root / "model")
    save_artifact(model, PatchHead(384), {"backbone": BACKBONE, "weights": "random",
                                          "image_size": 64})
    return model, str(root / "data" / "images"), keys


def _maps(output) -> list[str]:
    try:
        return [e.name[:-4] for e in os.scandir(output) if e.name.endswith(".png")]
    except FileNotFoundError:
        return []


def test_segment_resumes_after_a_real_sigkill(tmp_path, model_and_images, request):
    """PNG maps, one file per key, each written under a temporary name and renamed. (Parquet
    output shares pseudo-label's parts and fencing, killed in test_pseudo_label_kill.py; its
    resume is test_hardening_runs.py::test_segment_parquet_resumes_and_refuses_a_busy_output.)
    The CLI run also shows that ``selfment segment`` reaches the segment stage."""
    model, images, expected = model_and_images
    output = tmp_path / "maps"
    log = tmp_path / "segment.log"
    # Batches of 2: maps appear one batch at a time.
    proc = start_cli(["segment", "--model", model, "--input", images, "--output", str(output),
                      "--image-size", "64", "--batch-size", "2", "--no-progress"], log)
    try:
        wait_until(lambda: bool(_maps(output)), proc, log, DEADLINE_S)
        finished = proc.poll() is not None
    finally:
        _kill(proc)
    before = _maps(output)
    assert before and len(before) == len(set(before)) and set(before) <= expected, tail(log)
    manifest = json.loads((output / SEGMENT_MANIFEST).read_text())
    if not finished:
        assert manifest["status"] == "running", manifest["status"]

    request.getfixturevalue("ray_local")
    summary = run_segment(model, images, str(output), image_size=64, batch_size=2,
                          progress=False, model_workers="tasks")  # warm workers: see pipeline._warm
    assert summary["skipped"] == len(before)
    assert summary["images"] == N_IMAGES - len(before) and summary["errors"] == 0
    after = _maps(output)
    assert len(after) == len(set(after)), "duplicate keys"
    assert set(after) == expected, "missing or extra keys"
    assert summary["maps_total"] == N_IMAGES
    # Nothing else: no temporary files of the killed run's writes.
    assert sorted(os.listdir(output)) == sorted([f"{k}.png" for k in expected]
                                                + [SEGMENT_MANIFEST])
    for key in expected:
        with Image.open(output / f"{key}.png") as im:
            assert im.mode == "L" and im.size == (64, 48)  # the original size
    manifest = json.loads((output / SEGMENT_MANIFEST).read_text())
    assert manifest["status"] == "complete"
