"""Ray plumbing shared by the pipelines: start-up, retry limits, actor pools, progress.

Resource planning itself lives in :mod:`.plan` (re-exported here)."""
from __future__ import annotations

import contextlib
import logging
import math
import os

import ray
from ray.data import DataContext

# Re-exported. The counters live in a module that imports Ray core only: the actor each run
# starts then does not import Ray Data.
from selfment_dist.pipeline._internal.counters import (COUNTERS_PREFIX, HEAD_RESOURCE, NODE_ROWS_PREFIX,  # noqa: F401
                        RunCounters, count_replica_started, count_rows_here, read_counters,
                        split_counters, start_counters, stop_counters)
from selfment_dist.defaults import MODEL_WORKERS
from selfment_dist.pipeline._internal.cpu_malloc import model_process_env
from selfment_dist.pipeline._internal.ray_auth import match_cluster_auth
from selfment_dist.pipeline._internal.plan import (DEFAULT_ACTOR_WAIT_S, LIGHT_TASK_CPUS, UnschedulableError, plan_resources,
                    unschedulable_message)
from selfment_dist.errors import UserValueError

__all__ = ["MAX_ACTOR_RESTARTS", "MAX_TASK_RETRIES", "MAX_RETRIES", "ensure_ray",
           "plan_resources", "decode_pool", "model_pool_args", "model_stage_args",
           "MODEL_WORKERS", "check_model_workers", "progress_bars",
           "bounded_actor_start", "COUNTERS_PREFIX", "start_counters", "read_counters",
           "count_rows_here", "count_replica_started", "split_counters", "stop_counters",
           "call_as_driver",
           "DEFAULT_ACTOR_WAIT_S", "LIGHT_TASK_CPUS", "UnschedulableError"]

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
      ``num_cpus`` is ignored (the cluster owns its resources). The connection takes the
      cluster's token-auth mode (:mod:`.ray_auth`: a token-auth driver on a cluster without
      it would lose every actor at start).
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
        # A token-auth driver on a cluster without token auth loses every actor at start.
        match_cluster_auth(str(target))
        ray.init(address=target, log_to_driver=True)
    else:
        logger.info("Starting a local Ray (num_cpus=%s)", num_cpus if num_cpus else "all")
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
    return True


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


def decode_pool(plan) -> "ray.data.TaskPoolStrategy":
    """Decode tasks: elastic unless the plan caps them (``plan["decode_max"]``, None in every
    plan :mod:`.plan` makes). With no cap, Ray Data runs as many as the cluster's CPUs allow at
    each moment (its resource manager reads the cluster's current resources, so nodes that join
    later add decode tasks) and its object-store back-pressure keeps them from running ahead of
    the model actors. A start-time cap gave a cold autoscaling cluster one task per run."""
    return ray.data.TaskPoolStrategy(size=plan["decode_max"])


def model_pool_args(plan: dict) -> dict:
    """``map_batches`` arguments of a model stage: an elastic actor pool (Ray Data grows it
    towards ``plan["actors"]``, or without bound, and asks the autoscaler for the nodes), the
    per-actor resources, and bounded restarts."""
    return {"compute": ray.data.ActorPoolStrategy(min_size=plan["min_actors"],
                                                  max_size=plan["actors"],
                                                  initial_size=plan["initial_actors"]),
            "num_cpus": plan["num_cpus"], "num_gpus": plan["num_gpus"] or None,
            # One replica per node while there is room: work spreads over the nodes.
            "scheduling_strategy": "SPREAD",
            "max_restarts": MAX_ACTOR_RESTARTS, "max_task_retries": MAX_TASK_RETRIES}


# Model tasks ask for this (the job's runtime env plus one variable): Ray keeps workers apart by
# runtime env, so only these workers hold a model, and decode or write tasks never take (or
# evict) a warm one.
MODEL_WORKER_ENV = {"env_vars": {"SELFMENT_MODEL_WORKER": "1"}}


def check_model_workers(model_workers: str, plan: dict, stage: str) -> None:
    """``model_workers="tasks"`` runs on CPUs only, and on nodes that hold a replica now (a
    task that no node can hold would wait forever, with no actor start to time out)."""
    if model_workers not in MODEL_WORKERS:
        raise ValueError(f"model_workers must be one of {', '.join(MODEL_WORKERS)}, "
                         f"got {model_workers!r}")
    if model_workers != "tasks":
        return
    if plan["num_gpus"]:
        raise UserValueError(f"{stage}: model_workers='tasks' runs on CPUs only (Ray assigns GPUs "
                         "per task, a warm worker's model stays on its first one); use "
                         "model_workers='actors' with GPUs")
    if not plan.get("fits_now", True):
        raise UnschedulableError(unschedulable_message(plan, None, stage))


def model_stage_args(udf_class, kwargs: dict, plan: dict, model_workers: str = "actors") -> dict:
    """``map_batches`` arguments of a model stage: ``udf_class(**kwargs)`` as an actor pool
    (:func:`model_pool_args`), or as tasks on warm workers that keep their replica between
    tasks and runs (:mod:`._warm`; at most ``plan["actors"]`` at a time)."""
    # CPU replicas: glibc malloc settings that stop every forward from faulting its activations
    # in afresh; and a test's fault variables (_internal/cpu_malloc.py).
    env_vars = model_process_env(on_gpu=bool(plan["num_gpus"]))
    if model_workers == "actors":
        extra = {"runtime_env": {"env_vars": env_vars}} if env_vars else {}
        return {"fn": udf_class, "fn_constructor_kwargs": kwargs, **model_pool_args(plan),
                **extra}
    from selfment_dist.pipeline._internal.warm import run_on_warm_worker

    env = {"env_vars": {**MODEL_WORKER_ENV["env_vars"], **env_vars}}
    return {"fn": run_on_warm_worker, "fn_kwargs": {"udf_class": udf_class, "kwargs": kwargs},
            "compute": ray.data.TaskPoolStrategy(size=plan["actors"]),
            "num_cpus": plan["num_cpus"], "scheduling_strategy": "SPREAD",
            "max_retries": MAX_TASK_RETRIES, "runtime_env": env}


@contextlib.contextmanager
def bounded_actor_start(plan: dict, wait_s: float | None, stage: str, *, probe: bool = True):
    """Datasets created inside wait at most ``wait_s`` (default :data:`DEFAULT_ACTOR_WAIT_S`)
    for their first model actor, then fail with :class:`UnschedulableError` naming the missing
    resource (Ray Data alone would wait forever). When no alive node can hold one now, a probe
    actor does that wait before any dataset starts (see :func:`_probe_holds_a_model_actor`;
    ``probe=False`` where an earlier block of the same run has probed)."""
    wait_s = DEFAULT_ACTOR_WAIT_S if wait_s is None else float(wait_s)
    if wait_s <= 0:
        raise ValueError(f"actor_wait_s must be > 0, got {wait_s}")
    if probe and not plan.get("fits_now", True):
        logger.warning("%s: no alive node can hold a model actor %s now; waiting at most %.0f s "
                       "for one (an autoscaler may add it)", stage, plan.get("need"), wait_s)
        if not _probe_holds_a_model_actor(plan, wait_s):
            raise UnschedulableError(unschedulable_message(plan, wait_s, stage))
    ctx = DataContext.get_current()
    saved = ctx.wait_for_min_actors_s
    ctx.wait_for_min_actors_s = max(1, math.ceil(wait_s))
    timed_out = False
    try:
        yield
    except ray.exceptions.GetTimeoutError as exc:
        if "starting actors" not in str(exc):
            raise
        timed_out = True
    finally:
        ctx.wait_for_min_actors_s = saved
    if timed_out:
        # Raised outside the handler: an exception raised inside would keep the timeout (and
        # through its traceback Ray Data's executor with its pending actors) as __context__,
        # so the unschedulable request stayed queued for as long as the error was held.
        raise UnschedulableError(unschedulable_message(plan, wait_s, stage))


@ray.remote(num_cpus=0)
class _ResourceProbe:
    """Runs nothing: it asks for one model actor's resources."""


def _probe_holds_a_model_actor(plan: dict, wait_s: float) -> bool:
    """Whether one model actor's resources become free within ``wait_s``, asked for by a probe
    actor this process kills afterwards either way. The request is what an autoscaler adds
    nodes for; killing it is what withdraws it. Ray Data's own wait cannot be withdrawn: when
    its actor pool times out starting (Ray 2.60), the pending actors stay queued behind their
    readiness calls after every handle is gone, and an autoscaler keeps adding nodes for them
    for as long as the driver lives."""
    probe = _ResourceProbe.options(num_cpus=plan["num_cpus"], num_gpus=plan["num_gpus"] or 0,
                                   scheduling_strategy="SPREAD").remote()
    try:
        ray.get(probe.__ray_ready__.remote(), timeout=wait_s)
        return True
    except ray.exceptions.GetTimeoutError:
        return False
    finally:
        ray.kill(probe)


def _call(func, options: dict):
    return func(**options)


def call_as_driver(func, options: dict):
    """``func(**options)``, for a pipeline entry point (``run_*``) and its options.

    With a Ray Client address (``ray://HOST:PORT``, in ``options["address"]`` or
    ``RAY_ADDRESS``), Ray Data's streaming executor cannot run in the client process (Ray 2.60
    fails with ``'Worker' object has no attribute 'core_worker'``): the call then runs as a task
    on the cluster's head node, which drives the run there; its summary comes back. Inputs and
    outputs must then be paths the cluster can reach (object storage).
    """
    address = options.get("address") or os.environ.get("RAY_ADDRESS") or ""
    if not str(address).startswith("ray://"):
        return func(**options)
    ensure_ray(str(address))
    inner = {k: v for k, v in options.items() if k != "address"}
    task = ray.remote(num_cpus=0, max_retries=0, resources={HEAD_RESOURCE: 0.001})(_call)
    logger.info("Ray Client: %s runs as a task on the cluster's head node",
                getattr(func, "__name__", func))
    return ray.get(task.remote(func, inner))
