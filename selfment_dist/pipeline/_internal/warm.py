"""Model stages as Ray tasks on warm workers (``model_workers="tasks"``, CPU only).

A Ray task worker outlives its task: Ray hands it the next task of the same job. Each worker
process here keeps the one model replica it built last, so the next run of the same driver
(a notebook's second call, a test module's next case, the later batches of a run) finds the
model ready instead of paying a process start, the torch/timm imports and the build (seconds
on a CPU, which dominate small runs). Actors, the default, start fresh replicas per run.

Not for GPUs: Ray assigns a GPU per task lease, while a cached model stays on the device it
was built on.
"""
from __future__ import annotations

import gc
import json
import logging

logger = logging.getLogger(__name__)

# Per run, not part of what the replica is: set on the cached replica before each batch.
PER_RUN = ("counters",)

_WARM: dict = {}  # this worker process's replica: {"key": str, "udf": object}


def _key(udf_class, kwargs: dict) -> str:
    fixed = {k: v for k, v in kwargs.items() if k not in PER_RUN}
    # A class built from whole settings objects names what of them makes its replica (the
    # rest, such as the output, changes from run to run and must not rebuild the model).
    if hasattr(udf_class, "replica_key"):
        fixed = udf_class.replica_key(**fixed)
    return json.dumps([udf_class.__module__, udf_class.__qualname__, fixed], sort_keys=True,
                      default=repr)


def run_on_warm_worker(batch, *, udf_class, kwargs: dict):
    """``udf_class(**kwargs)(batch)``, with the replica built once per worker process and
    settings (the cache holds one: another model replaces it)."""
    key = _key(udf_class, kwargs)
    if _WARM.get("key") != key:
        _WARM.clear()
        gc.collect()  # the previous replica's memory goes before the new one is built
        _WARM["udf"] = udf_class(**kwargs)
        _WARM["key"] = key
        logger.info("model replica built in this worker (kept for the next tasks)")
    udf = _WARM["udf"]
    for name in PER_RUN:
        if name in kwargs:
            setattr(udf, name, kwargs[name])
    return udf(batch)


def forget() -> None:
    """Drop this process's replica (tests)."""
    _WARM.clear()
