"""Fault injection and step dumps for tests: every test seam of the library, in one place.

Everything here is off unless an environment variable below is set (tests set them with
``monkeypatch.setenv``; nothing in the settings or the CLI reaches them). The driver forwards
the ones that are set to the processes it starts (:func:`worker_env`: model actors and tasks,
Ray Train workers), so a test's variable reaches workers of a Ray that was started before it.

- :data:`PUBLISH_DELAY_ENV` (seconds): a write task sleeps between writing a part and its
  fencing check, so that a kill test can freeze a writer there.
- :data:`LABEL_EXIT_AFTER_ENV` (batches) with :data:`MARKER_ENV` (a local file path): one model
  replica of ``pseudo-label`` exits hard once after that many batches; the marker file, created
  when it does, keeps the retry from failing again (and tells the test it happened).
- :data:`TRAIN_EXIT_AT_STEP_ENV` (global step) with :data:`MARKER_ENV`: the last Ray Train rank
  exits hard once at that step, after Ray Train committed the checkpoints reported so far.
- :data:`STEP_DUMP_ENV` (a local folder): every training rank writes its head weights and batch
  keys after every step (``rank<r>-step<s>.safetensors`` / ``.json``).
"""
from __future__ import annotations

import json
import logging
import os
import time

logger = logging.getLogger(__name__)

PUBLISH_DELAY_ENV = "SELFMENT_TEST_PUBLISH_DELAY_S"
LABEL_EXIT_AFTER_ENV = "SELFMENT_TEST_LABEL_EXIT_AFTER"
TRAIN_EXIT_AT_STEP_ENV = "SELFMENT_TEST_TRAIN_EXIT_AT_STEP"
MARKER_ENV = "SELFMENT_TEST_FAULT_MARKER"
STEP_DUMP_ENV = "SELFMENT_TEST_STEP_DUMP_DIR"
ALL_ENV = (PUBLISH_DELAY_ENV, LABEL_EXIT_AFTER_ENV, TRAIN_EXIT_AT_STEP_ENV, MARKER_ENV,
           STEP_DUMP_ENV)


def worker_env() -> dict[str, str]:
    """The fault variables set in this (driver) process, for a worker's ``runtime_env``."""
    return {k: os.environ[k] for k in ALL_ENV if os.environ.get(k)}


def publish_pause() -> None:
    """Write tasks: sleep :data:`PUBLISH_DELAY_ENV` seconds before the fencing check."""
    delay = os.environ.get(PUBLISH_DELAY_ENV)
    if delay:
        time.sleep(float(delay))


def _first_time() -> bool:
    """Create the marker file; False when it exists already (the fault happened once)."""
    try:
        fd = os.open(os.environ[MARKER_ENV], os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def label_batch(batches_done: int) -> None:
    """Label actors, before each batch: exit hard once after :data:`LABEL_EXIT_AFTER_ENV`."""
    after = os.environ.get(LABEL_EXIT_AFTER_ENV)
    if after is None or batches_done < int(after) or not _first_time():
        return
    logger.warning("fault injection: label worker exits after %d batches", batches_done)
    os._exit(1)


def train_step(rank: int, world: int, step: int, head, keys) -> None:
    """Ray Train ranks, after each step: the step dump, then the fault at
    :data:`TRAIN_EXIT_AT_STEP_ENV` (last rank only)."""
    folder = os.environ.get(STEP_DUMP_ENV)
    if folder:
        _dump(folder, rank, step, head, keys)
    at = os.environ.get(TRAIN_EXIT_AT_STEP_ENV)
    if at is None or step != int(at) or rank != world - 1 or not _first_time():
        return
    import ray.train
    from ray.train import CheckpointConsistencyMode

    # Let Ray Train commit the checkpoints reported so far, so the resume point is known.
    ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED,
                                           timeout_s=60)
    logger.warning("fault injection: rank %d exits at step %d", rank, step)
    os._exit(1)


def _dump(directory: str, rank: int, step: int, head, keys) -> None:
    """This rank's head weights and batch keys after ``step``."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    stem = os.path.join(directory, f"rank{rank}-step{step}")
    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()},
              stem + ".safetensors")
    with open(stem + ".json", "w", encoding="utf-8") as f:
        json.dump([str(k) for k in keys], f)
