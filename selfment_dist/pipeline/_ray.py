"""Ray plumbing shared by the pipelines: start-up, retry limits, resource planning, progress."""
from __future__ import annotations

import contextlib
import logging
import os

import ray
from ray.data import DataContext

logger = logging.getLogger(__name__)

# Fault tolerance: enough for preempted nodes and the odd crash, bounded so that an input that
# kills its worker every time fails the job instead of looping forever.
MAX_ACTOR_RESTARTS = 8
MAX_TASK_RETRIES = 8
MAX_RETRIES = 4


def ensure_ray(address: str | None = None, *, num_cpus: int | None = None) -> bool:
    """Make sure this process is connected to Ray.

    - Already connected (``ray.is_initialized()``, e.g. a test fixture or a caller's own
      ``ray.init``): nothing changes; ``address`` and ``num_cpus`` are ignored.
    - ``address`` given (``"auto"``, ``"HOST:PORT"``, ``"ray://HOST:10001"``), or ``RAY_ADDRESS``
      set in the environment (how Ray Jobs entrypoints find their cluster): connect to that cluster;
      ``num_cpus`` is ignored (the cluster owns its resources).
    - Otherwise: start a local Ray inside this process (``address="local"``, so a stray
      ``ray start`` on the same machine is never attached silently), with ``num_cpus`` CPUs
      (default: all) and no dashboard. Workers' output reaches the driver's terminal.

    Returns:
        True when this call started or connected Ray, False when it was already connected.
    """
    if ray.is_initialized():
        if address is not None:
            logger.debug("Ray already initialised; ignoring address=%r", address)
        return False
    target = address or os.environ.get("RAY_ADDRESS") or None
    if target:
        if num_cpus is not None:
            logger.warning("num_cpus=%s ignored: connecting to an existing Ray cluster at %s",
                           num_cpus, target)
        logger.info("Connecting to Ray at %s", target)
        ray.init(address=target, log_to_driver=True)
    else:
        logger.info("Starting a local Ray (num_cpus=%s)", num_cpus if num_cpus else "all")
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
    return True


def plan_resources(num_actors: int | None, num_gpus_per_actor: float | None) -> dict:
    """Actor count, GPUs and CPUs per actor, torch threads per actor for this cluster."""
    res = ray.cluster_resources()
    cpus = int(res.get("CPU", 1))
    gpus = float(res.get("GPU", 0))
    if num_gpus_per_actor is None:
        num_gpus_per_actor = 1.0 if gpus >= 1 else (gpus if gpus > 0 else 0.0)
    if num_gpus_per_actor > 0:
        if gpus == 0:
            logger.warning("num_gpus_per_actor=%s but the cluster has no GPU now: the model "
                           "actors wait until an autoscaler adds one", num_gpus_per_actor)
        actors = num_actors or max(1, int(gpus // num_gpus_per_actor))
        return {"actors": actors, "num_gpus": num_gpus_per_actor, "num_cpus": 1,
                "cpu_threads": None, "device": None}
    # CPU only: few actors with many intra-op threads beat many single-threaded ones; reserve
    # all but one of each actor's threads so decode/write tasks keep a CPU to run on.
    actors = num_actors or max(1, cpus // 8)
    threads = max(1, cpus // actors)
    return {"actors": actors, "num_gpus": 0, "num_cpus": max(1, threads - 1),
            "cpu_threads": threads, "device": "cpu"}


@contextlib.contextmanager
def progress_bars(enabled: bool):
    """Ray Data's progress bars on or off for datasets created inside (they copy the context)."""
    ctx = DataContext.get_current()
    saved = ctx.enable_progress_bars
    ctx.enable_progress_bars = bool(enabled)
    try:
        yield
    finally:
        ctx.enable_progress_bars = saved
