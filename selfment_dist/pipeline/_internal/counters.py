"""Per-run counters that model actors report to the driver (rows per node, dense-eigh
fallbacks): a small named actor on the head node.

Kept apart from :mod:`._ray` so that this actor's worker imports Ray core only (not Ray Data,
torch or timm): every run starts one, and each import is paid again per run."""
from __future__ import annotations

import logging

import ray

logger = logging.getLogger(__name__)

NODE_ROWS_PREFIX = "rows_on_node:"
REPLICAS_STARTED = "replicas_started"
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


def count_replica_started(counters) -> None:
    """Report one model replica started (an actor, or a warm worker's first build)."""
    if counters is not None:
        counters.add.remote(REPLICAS_STARTED, 1)


def split_counters(counts: dict[str, int]) -> tuple[dict[str, int], dict[str, int]]:
    """(rows per node id, the other counts)."""
    per_node = {k[len(NODE_ROWS_PREFIX):]: v for k, v in counts.items()
                if k.startswith(NODE_ROWS_PREFIX)}
    return per_node, {k: v for k, v in counts.items() if not k.startswith(NODE_ROWS_PREFIX)}


def stop_counters(counters) -> None:
    """End a run's counter actor (read it first): a named actor outlives its handle, so a
    driver running many pipelines (a notebook, a test session) would keep one per run."""
    try:
        ray.kill(counters, no_restart=True)
    except Exception as exc:  # already gone with its node, or Ray is shutting down
        logger.debug("run counters not stopped: %s", exc)


def read_counters(counters) -> dict[str, int]:
    """The counts so far ({} when the counter actor is gone)."""
    try:
        return ray.get(counters.get.remote(), timeout=30)
    except Exception as exc:  # counts are a report, never a reason to fail the run
        logger.warning("run counters unavailable: %s", exc)
        return {}
