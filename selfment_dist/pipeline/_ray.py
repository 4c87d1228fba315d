"""Ray plumbing shared by the pipelines: start-up, retry limits, actor pools, progress.

Resource planning itself lives in :mod:`._plan` (re-exported here)."""
from __future__ import annotations

import contextlib
import logging
import math
import os

import ray
from ray.data import DataContext

from ._plan import (DEFAULT_ACTOR_WAIT_S, LIGHT_TASK_CPUS, UnschedulableError, plan_resources,
                    unschedulable_message)

__all__ = ["MAX_ACTOR_RESTARTS", "MAX_TASK_RETRIES", "MAX_RETRIES", "ensure_ray",
           "plan_resources", "decode_pool", "model_pool_args", "progress_bars",
           "bounded_actor_start", "COUNTERS_PREFIX", "start_counters", "read_counters",
           "count_rows_here", "split_counters", "call_as_driver", "DEFAULT_ACTOR_WAIT_S",
           "LIGHT_TASK_CPUS", "UnschedulableError"]

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


def decode_pool(plan: dict):
    """Decode tasks at most ``plan["decode_concurrency"]`` at a time (enough to feed the model
    actors, see :mod:`._plan`)."""
    return ray.data.TaskPoolStrategy(size=plan["decode_concurrency"])


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


@contextlib.contextmanager
def bounded_actor_start(plan: dict, wait_s: float | None, stage: str):
    """Datasets created inside wait at most ``wait_s`` (default :data:`DEFAULT_ACTOR_WAIT_S`)
    for their first model actor, then fail with :class:`UnschedulableError` naming the missing
    resource (Ray Data alone would wait forever)."""
    wait_s = DEFAULT_ACTOR_WAIT_S if wait_s is None else float(wait_s)
    if wait_s <= 0:
        raise ValueError(f"actor_wait_s must be > 0, got {wait_s}")
    if not plan.get("fits_now", True):
        logger.warning("%s: no alive node can hold a model actor %s now; waiting at most %.0f s "
                       "for one (an autoscaler may add it)", stage, plan.get("need"), wait_s)
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


NODE_ROWS_PREFIX = "rows_on_node:"
#: The resource Ray gives the head node only.
HEAD_RESOURCE = "node:__internal_head__"


@ray.remote(num_cpus=0, max_restarts=0)
class RunCounters:
    """Counts that model actors report to the driver (e.g. dense-eigh fallbacks): rows carry
    only the data contract, so side counts travel here, fire-and-forget."""

    def __init__(self):
        self.counts: dict[str, int] = {}

    def add(self, name: str, n: int) -> None:
        self.counts[name] = self.counts.get(name, 0) + int(n)

    def get(self) -> dict[str, int]:
        return dict(self.counts)


#: Name of a run's :class:`RunCounters` actor (``COUNTERS_PREFIX + run id``), in the driver's
#: namespace: a monitor (or a test) can find it with ``ray.util.list_named_actors`` and read
#: the rows each node has labelled so far.
COUNTERS_PREFIX = "selfment-counters-"


def start_counters(run_id: str | None = None):
    """A :class:`RunCounters` on the head node (which lives as long as the cluster; a worker
    node, even the driver's, may be lost mid-run), named for ``run_id`` when given."""
    options: dict = {"resources": {HEAD_RESOURCE: 0.001}}
    if run_id:
        options["name"] = COUNTERS_PREFIX + run_id
    return RunCounters.options(**options).remote()


def count_rows_here(counters, rows: int) -> None:
    """Report ``rows`` processed by this worker's node (``rows_on_node:<node id>``)."""
    if counters is not None and rows:
        counters.add.remote(NODE_ROWS_PREFIX + ray.get_runtime_context().get_node_id(), rows)


def split_counters(counts: dict[str, int]) -> tuple[dict[str, int], dict[str, int]]:
    """(rows per node id, the other counts)."""
    per_node = {k[len(NODE_ROWS_PREFIX):]: v for k, v in counts.items()
                if k.startswith(NODE_ROWS_PREFIX)}
    return per_node, {k: v for k, v in counts.items() if not k.startswith(NODE_ROWS_PREFIX)}


def read_counters(counters) -> dict[str, int]:
    """The counts so far ({} when the counter actor is gone)."""
    try:
        return ray.get(counters.get.remote(), timeout=30)
    except Exception as exc:  # counts are a report, never a reason to fail the run
        logger.warning("run counters unavailable: %s", exc)
        return {}


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
