"""Resource planning for the model stages, per node (not per cluster).

One pure function, :func:`plan_stage`, turns a list of node shapes and a stage's settings into a
:class:`StagePlan`. The pipeline feeds it the alive nodes (:func:`plan_resources`); ``selfment
plan`` feeds it the shapes a user types, so the plan printed before a cluster is paid for is the
plan a run makes on that shape.

A Ray Data actor pool has one size of actor; Ray places each actor on one node. Sizing from the
cluster's totals asks for actors no node can hold (a head without CPUs and two 2-CPU workers make
"4 CPUs", and one 3-CPU actor then waits forever). So the plan looks at the nodes:

- GPU plan (``num_gpus_per_actor > 0``, asked for, the cluster has GPUs now, or GPUs are
  required: ``require_gpu`` / a cluster config with GPU node types): one CPU per actor, an
  elastic pool (1 .. ``actors``, starting with the GPUs present) so that Ray Data asks the
  autoscaler for GPU nodes and uses them as they arrive; ``actors`` is ``num_actors`` or
  unbounded (the cluster's own limits bound it), never the GPUs present at start-up.
- CPU plan: actors sized for the largest CPU node (at most :data:`CPUS_PER_CPU_ACTOR` threads,
  one actor per that many CPUs of each node); each asks for its threads less one CPU and less
  :data:`LIGHT_TASK_CPUS` twice, and less again where needed so that a node holding as many of
  them as fit still has room for two decode/write tasks.
- Decode tasks: elastic. Each asks for :data:`LIGHT_TASK_CPUS`, and no start-time cap is set
  (``decode_max`` None): Ray Data runs as many as the CPUs the cluster has *now* allow,
  including nodes that join later, and its object-store back-pressure stops them from running
  ahead of the model actors. A cap computed from a start-up snapshot gave a cold autoscaling
  cluster (head with 0 CPUs) one decode task for the whole run. The plan still reports how
  many CPUs the given nodes leave for decoding, and the throughput that implies.

A model actor that no node can hold is waited for at most ``actor_wait_s`` (an autoscaler may
add the node); then the run fails with a message that names the missing resource.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from selfment_dist.errors import SelfmentUserError
from selfment_dist.pipeline._internal.rates import ASSUMED_RATES, speed_factor

logger = logging.getLogger(__name__)

#: CPU threads of one CPU model actor: few actors with many intra-op threads beat many
#: single-threaded ones.
CPUS_PER_CPU_ACTOR = 8
#: CPUs that a decode or write task asks for.
LIGHT_TASK_CPUS = 0.25
#: Images per model call when the settings leave it open (the pipeline's defaults).
DEFAULT_BATCH_SIZE = {"cuda": 32, "cpu": 8}
#: Seconds to wait for the first model actor when no node can hold one now (an autoscaler may add
#: one) or when the cluster is busy; then fail with a clear message.
DEFAULT_ACTOR_WAIT_S = 600.0


class UnschedulableError(SelfmentUserError, RuntimeError):
    """The model actors cannot start on this cluster (message names the missing resource)."""


@dataclass(frozen=True)
class StagePlan:
    """What a model stage runs with on a given set of nodes.

    The pipeline's code reads it as ``plan["num_gpus"]`` too (:meth:`__getitem__`): the plan was
    a dict before it was typed, and the stages index it in many places.
    """
    stage: str
    device: str | None              # "cuda" / "cpu"; None: GPU actors that may fall back to CPU
    actors: int | None              # most model replicas; None: unbounded (grows with GPU nodes)
    min_actors: int
    initial_actors: int
    num_gpus: float                 # per actor
    num_cpus: float                 # per actor
    cpu_threads: int | None         # intra-op threads of a CPU actor (None on GPU)
    require_gpu: bool               # GPU actors refuse to run on CPU
    batch_size: int
    precision: str
    decode_task_cpus: float
    decode_min: int
    decode_max: int | None          # None: elastic (Ray Data sizes it to the CPUs there are)
    decode_cpus_now: float          # CPUs the given nodes leave for decode tasks
    fits_now: bool                  # some given node can hold a model actor
    need: dict[str, float]          # what one model actor asks for
    actors_now: int                 # model actors the given nodes hold
    rates: dict[str, float]         # the rates assumed (or given) for the figures below
    model_images_per_s: float
    decode_images_per_s: float
    images_per_s: float
    bound_by: str                   # "model" / "decode" / "no model actor fits these nodes"
    nodes: list[dict[str, float]] = field(default_factory=list)

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default)

    def record(self) -> dict[str, Any]:
        """JSON-safe: what ``selfment plan`` prints and a run's summary keeps under ``plan``."""
        out = dataclasses.asdict(self)
        out["decode_concurrency"] = {"min": out.pop("decode_min"), "max": out.pop("decode_max")}
        out["model_actors"] = {"min": self.min_actors, "max": self.actors,
                               "initial": self.initial_actors, "now": self.actors_now}
        for key in ("min_actors", "actors", "initial_actors", "actors_now"):
            out.pop(key)
        out["decode_tasks_now"] = int(self.decode_cpus_now // self.decode_task_cpus)
        return out


def parse_node_shape(text: str) -> dict[str, float]:
    """``'CPU=16,GPU=1'`` → ``{"CPU": 16.0, "GPU": 1.0}`` (any Ray resource name)."""
    shape: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        name, sep, value = part.partition("=")
        try:
            amount = float(value)
        except ValueError:
            amount = -1.0
        if not sep or not name.strip() or amount < 0:
            raise ValueError(f"node shape {text!r}: expected NAME=AMOUNT[,NAME=AMOUNT…] with "
                             f"amounts >= 0, e.g. 'CPU=16,GPU=1'")
        shape[name.strip()] = amount
    if not shape:
        raise ValueError(f"node shape {text!r} is empty: e.g. 'CPU=16,GPU=1'")
    return shape


def check_gpus_per_actor(num_gpus_per_actor: float | None) -> None:
    """Per-actor GPUs must be in [0, 1]: a model replica uses one device (fractions share one)."""
    if num_gpus_per_actor is None:
        return
    g = float(num_gpus_per_actor)
    if not 0 <= g <= 1:
        raise ValueError(f"num_gpus_per_actor must be between 0 and 1 (a model replica uses one "
                         f"GPU, or a share of one), got {num_gpus_per_actor}")


def plan_stage(nodes: Sequence[Mapping[str, float]], *, num_actors: int | None = None,
               num_gpus_per_actor: float | None = None, allow_cpu_fallback: bool = False,
               image_size: int | None = None, batch_size: int | None = None,
               precision: str | None = "auto", require_gpu: bool = False,
               stage: str = "model stage", rates: Mapping[str, float] | None = None,
               backbone: str | None = None) -> StagePlan:
    """The plan of a model stage on ``nodes`` (each node's total resources). Pure: no Ray.

    Args:
        nodes: e.g. ``[{"CPU": 0}, {"CPU": 16, "GPU": 1}]`` (a head without CPUs, one worker).
        num_actors: most model replicas; None: as many as the nodes hold (GPU plan: unbounded,
            the pool grows with the GPU nodes the autoscaler adds).
        num_gpus_per_actor: GPUs per replica (0 to 1); None: 1 when a node has a GPU (or GPUs
            are required), else 0 (CPU plan).
        allow_cpu_fallback: GPU actors may run on CPU when CUDA is missing (else they refuse).
        image_size: the model's input size; with ``backbone`` (a timm name; None: ViT-S/16)
            and ``stage`` it scales the actors' rates, stated for the reference model
            (:func:`.rates.speed_factor`).
        batch_size: images per model call; None: :data:`DEFAULT_BATCH_SIZE` of the device.
        precision: the backbone's numerics (auto = fp32): picks the assumed GPU rate.
        require_gpu: never plan CPU actors; with no GPU among ``nodes`` the plan asks for one
            (and the run waits for it, at most ``actor_wait_s``).
        rates: overrides of :data:`ASSUMED_RATES` (measured figures).
    """
    check_gpus_per_actor(num_gpus_per_actor)
    if num_actors is not None and int(num_actors) < 1:
        raise ValueError(f"num_actors must be >= 1, got {num_actors}")
    if require_gpu and num_gpus_per_actor is not None and float(num_gpus_per_actor) == 0:
        raise ValueError("require_gpu contradicts num_gpus_per_actor=0 (CPU actors)")
    rates = _rates(rates)
    precision = "fp32" if precision in (None, "auto") else str(precision)
    nodes = [{k: float(v) for k, v in n.items()} for n in nodes]
    gpus_now = sum(n.get("GPU", 0.0) for n in nodes)
    if num_gpus_per_actor is None:
        num_gpus_per_actor = 1.0 if gpus_now >= 1 or require_gpu else min(gpus_now, 1.0)
    if float(num_gpus_per_actor) > 0:
        pool = _gpu_pool(nodes, float(num_gpus_per_actor), num_actors, allow_cpu_fallback)
        key = f"gpu_actor_images_per_s_{precision}"
        if key not in rates:
            raise ValueError(f"no GPU rate for precision {precision!r} (known: "
                             f"{', '.join(k for k in rates if k.startswith('gpu_actor'))})")
        per_actor = rates[key]
    else:
        pool = _cpu_pool(nodes, num_actors)
        per_actor = pool["cpu_threads"] * rates["cpu_actor_images_per_s_per_thread"]
    # The rates are the reference model's (rates.py): scaled to this backbone, size and stage.
    per_actor *= speed_factor(backbone, image_size, precision=precision,
                              gpu=pool["num_gpus"] > 0, ncut=stage == "pseudo-label")
    total_cpus = sum(n.get("CPU", 0.0) for n in nodes)
    decode_cpus = max(0.0, total_cpus - pool["actors_now"] * pool["num_cpus"])
    model_rate = pool["actors_now"] * per_actor
    # Decode tasks decode only: every model actor resizes on its device (light transport).
    decode_rate = decode_cpus * rates["decode_images_per_s_per_cpu"]
    if pool["actors_now"] == 0:
        bound = "no model actor fits these nodes (the run waits for an autoscaler to add one)"
    else:
        bound = "decode" if decode_rate < model_rate else "model"
    device_kind = "cuda" if pool["num_gpus"] else "cpu"
    return StagePlan(
        stage=stage, batch_size=int(batch_size or DEFAULT_BATCH_SIZE[device_kind]),
        precision=precision, decode_task_cpus=LIGHT_TASK_CPUS, decode_min=1, decode_max=None,
        decode_cpus_now=decode_cpus, rates=rates, model_images_per_s=round(model_rate, 3),
        decode_images_per_s=round(decode_rate, 3),
        images_per_s=round(min(model_rate, decode_rate), 3), bound_by=bound, nodes=nodes,
        **pool)


def _rates(given: Mapping[str, float] | None) -> dict[str, float]:
    unknown = sorted(set(given or {}) - set(ASSUMED_RATES))
    if unknown:
        raise ValueError(f"unknown rate(s) {', '.join(unknown)}; known: "
                         f"{', '.join(ASSUMED_RATES)}")
    return {**ASSUMED_RATES, **{k: float(v) for k, v in (given or {}).items()}}


def _gpu_pool(nodes: list[dict[str, float]], g: float, num_actors: int | None,
              allow_cpu_fallback: bool) -> dict[str, Any]:
    """An elastic pool of 1-CPU GPU actors: starts with the GPUs present, grows as the
    autoscaler adds GPU nodes, up to ``num_actors`` (or without bound)."""
    fits = [n for n in nodes if n.get("GPU", 0) >= g and n.get("CPU", 0) >= 1]
    held = sum(min(int(n["GPU"] // g), int(n["CPU"])) for n in fits)
    actors = int(num_actors) if num_actors else None
    now = min(held, actors) if actors else held
    return {"actors": actors, "min_actors": 1, "initial_actors": max(1, now),
            "actors_now": now, "num_gpus": g, "num_cpus": 1.0, "cpu_threads": None,
            "device": None if allow_cpu_fallback else "cuda",
            "require_gpu": not allow_cpu_fallback, "fits_now": bool(fits),
            "need": {"CPU": 1.0, "GPU": g}}


def _cpu_pool(nodes: list[dict[str, float]], num_actors: int | None) -> dict[str, Any]:
    """CPU actors sized for the largest node, all started at once (the nodes exist now)."""
    cpu_nodes = [n.get("CPU", 0.0) for n in nodes if n.get("CPU", 0.0) >= 1]
    threads = int(min(max(cpu_nodes), CPUS_PER_CPU_ACTOR)) if cpu_nodes else 1
    held = sum(int(c // threads) for c in cpu_nodes)
    actors = int(num_actors) if num_actors else max(1, held)
    actor_cpus = _cpu_actor_size(threads, cpu_nodes, actors)
    return {"actors": actors, "min_actors": actors, "initial_actors": actors,
            "actors_now": min(actors, held), "num_gpus": 0.0, "num_cpus": actor_cpus,
            "cpu_threads": threads, "device": "cpu", "require_gpu": False,
            "fits_now": any(c >= actor_cpus for c in cpu_nodes), "need": {"CPU": actor_cpus}}


def _cpu_actor_size(threads: int, cpu_nodes: list[float], actors: int) -> float:
    """CPUs a CPU actor asks for: at most its threads less one CPU and two light tasks, and
    small enough that however many of the ``actors`` Ray packs onto one node (restarts after a
    node loss land on the survivors), two light tasks still fit beside them."""
    size = max(2 * LIGHT_TASK_CPUS, threads - 1 - 2 * LIGHT_TASK_CPUS)
    while size > 2 * LIGHT_TASK_CPUS:
        if all(c - min(actors, int(c // size)) * size >= 2 * LIGHT_TASK_CPUS for c in cpu_nodes):
            break
        size = round(size - 0.05, 2)
    return max(size, 2 * LIGHT_TASK_CPUS)


# ---------------------------------------------------------------------------------------------
# The live cluster

def alive_nodes() -> list[dict[str, float]]:
    """Total resources (``CPU``, ``GPU``, …) of each alive node of the connected cluster."""
    import ray

    return [dict(n.get("Resources") or {}) for n in ray.nodes() if n.get("Alive")]


#: Where the cluster launcher leaves the autoscaler's config on the head (`ray start
#: --autoscaling-config=~/ray_bootstrap_config.yaml`), where a Ray Jobs driver runs.
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"


def cluster_asks_for_gpus() -> bool:
    """Whether the connected cluster's autoscaler config has node types with GPUs (its GPU
    nodes may all be scaled down right now): the cluster config in the GCS (autoscaler v2,
    KubeRay), else the cluster launcher's bootstrap config on this node. Unknown: False (use
    ``require_gpu`` or ``num_gpus_per_actor``)."""
    try:
        from ray._private.state import state

        most = state.get_max_resources_from_cluster_config() or {}
        if float(most.get("GPU", 0) or 0) > 0:
            return True
    except Exception:  # no autoscaler config (a local Ray), or an older GCS: nothing is known
        logger.debug("no cluster config in the GCS", exc_info=True)
    return _bootstrap_config_has_gpus(os.path.expanduser(BOOTSTRAP_CONFIG))


def _bootstrap_config_has_gpus(path: str) -> bool:
    try:
        import yaml

        with open(path) as f:
            types = (yaml.safe_load(f) or {}).get("available_node_types") or {}
    except Exception:  # missing or unreadable: nothing is known
        return False
    return any(float((t.get("resources") or {}).get("GPU", 0) or 0) > 0
               for t in types.values() if isinstance(t, dict))


def connected_to_remote_cluster() -> bool:
    """Whether this process joined a Ray it did not start (``ray.init(address=...)``)."""
    import ray._private.worker as worker

    node = getattr(worker, "_global_node", None)
    return node is not None and not getattr(node, "head", True)


def plan_resources(num_actors: int | None, num_gpus_per_actor: float | None, *,
                   nodes: list[dict[str, float]] | None = None,
                   allow_cpu_fallback: bool = False, image_size: int | None = None,
                   require_gpu: bool = False, **options: Any) -> StagePlan:
    """:func:`plan_stage` on the connected cluster's alive nodes (or on ``nodes``).

    With no GPU setting, a cluster whose config has GPU node types gets a GPU plan even while
    no GPU node is alive (they leave after their idle timeout): its stage waits for one, at
    most ``actor_wait_s``, rather than quietly running the model on CPUs. A CPU plan on a
    remote cluster is logged at WARNING (and the stages record the plan in their summary).
    """
    live = nodes is None
    nodes = alive_nodes() if live else nodes
    if live and not require_gpu and num_gpus_per_actor is None and cluster_asks_for_gpus():
        logger.info("the cluster's config has GPU node types: planning GPU model actors")
        require_gpu = True
    plan = plan_stage(nodes, num_actors=num_actors, num_gpus_per_actor=num_gpus_per_actor,
                      allow_cpu_fallback=allow_cpu_fallback, image_size=image_size,
                      require_gpu=require_gpu, **options)
    if live and not plan.num_gpus and connected_to_remote_cluster():
        logger.warning("%s: CPU model actors on a remote cluster (no GPU alive, none asked "
                       "for); pass --num-gpus-per-actor 1 or --require-gpu to wait for GPU "
                       "nodes. Nodes: %s", plan.stage, _describe(nodes))
    logger.info("resource plan: %s (nodes: %s)", plan.record(), _describe(nodes))
    return plan


def _describe(nodes: list[dict[str, float]]) -> str:
    return ", ".join("{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(n.items())
                                     if k in ("CPU", "GPU")) + "}" for n in nodes) or "none"


def _describe_need(need: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in need.items()) + "}"


def unschedulable_message(plan: dict, wait_s: float | None, stage: str) -> str:
    """One line saying which resource the model actors lack (for a timed-out start; with
    ``wait_s`` None, for replicas that no node holds now)."""
    import ray

    need = _describe_need(plan["need"])
    try:
        nodes = _describe(alive_nodes()) if ray.is_initialized() else "unknown"
    except Exception:  # the message must not fail
        nodes = "unknown"
    when = ("no model replica can start now" if wait_s is None
            else f"no model actor could start within {wait_s:.0f} s")
    return (f"{stage}: {when}: each needs "
            f"{need} on one node, and the alive nodes have {nodes}. Add such a node (or "
            f"let an autoscaler add one), or lower num_gpus_per_actor/num_actors")


def workers_that_fit(need: dict[str, float], nodes: list[dict[str, float]]) -> int:
    """How many workers asking ``need`` each the ``nodes`` (their total resources) can hold."""
    need = {k: float(v) for k, v in need.items() if v}
    if not need:
        return 1 << 30
    return sum(min(int(n.get(k, 0) // v) for k, v in need.items()) for n in nodes)


def wait_for_worker_nodes(need: dict[str, float], workers: int, wait_s: float | None,
                          stage: str = "train", poll_s: float = 2.0) -> None:
    """Return once the cluster's nodes can hold ``workers`` workers of ``need`` each (busy or
    not: Ray then schedules them as resources free up); wait at most ``wait_s`` (default
    :data:`DEFAULT_ACTOR_WAIT_S`) for an autoscaler to add such nodes, then raise
    :class:`UnschedulableError` naming the resource. Ray Train alone retries its worker group's
    start for as long as it is left running."""
    import time

    wait_s = DEFAULT_ACTOR_WAIT_S if wait_s is None else float(wait_s)
    deadline = time.monotonic() + wait_s
    warned = False
    while True:
        nodes = alive_nodes()
        if workers_that_fit(need, nodes) >= workers:
            return
        if time.monotonic() >= deadline:
            raise UnschedulableError(
                f"{stage}: the cluster cannot hold {workers} worker(s) within {wait_s:.0f} s: "
                f"each needs {_describe_need(need)} on one node, and the alive nodes have "
                f"{_describe(nodes)}. Add such nodes (or let an autoscaler add them), or lower "
                f"workers/resources_per_worker")
        if not warned:
            logger.warning("%s: the nodes cannot hold %d worker(s) of %s now; waiting at most "
                           "%.0f s for more (an autoscaler may add them)", stage, workers, need,
                           wait_s)
            warned = True
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
