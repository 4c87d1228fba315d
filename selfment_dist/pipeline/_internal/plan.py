"""Resource planning for the model stages, per node (not per cluster).

A Ray Data actor pool has one size of actor; Ray places each actor on one node. Sizing from the
cluster's totals asks for actors no node can hold (a head without CPUs and two 2-CPU workers make
"4 CPUs", and one 3-CPU actor then waits forever). So the plan looks at the nodes that exist:

- GPU plan (``num_gpus_per_actor > 0``, asked for, or the cluster has GPUs now): one CPU per
  actor, an elastic pool (1 .. ``actors``, starting with the GPUs present) so that Ray Data
  asks the autoscaler for GPU nodes and uses them as they arrive; ``actors`` is ``num_actors``
  or unbounded (the cluster's own limits bound it), never the GPUs present at start-up.
- CPU plan: actors sized for the largest CPU node (at most :data:`CPUS_PER_CPU_ACTOR` threads,
  one actor per that many CPUs of each node); each asks for its threads less one CPU and less
  :data:`LIGHT_TASK_CPUS` twice, and less again where needed so that a node holding as many of
  them as fit still has room for two decode/write tasks.
- Decode and write tasks ask for :data:`LIGHT_TASK_CPUS` each (they mostly wait on I/O and
  PIL; their concurrency is capped separately). When a node dies, Ray restarts its actors on
  the survivors; a 2-CPU node then holds two 0.5-CPU actors and still has a whole CPU for
  decode and write tasks (with 1-CPU actors it would have none, and the run would stall). A
  restarted actor that fits on no survivor waits for a new node (an autoscaler's).
- Decode tasks: as many as keep the actors fed, from :data:`DECODE_IMAGES_PER_S_PER_CPU` and the
  expected model throughput (the same assumptions as the README's projection), never more than
  the CPUs that the actors leave free.

A model actor that no node can hold is waited for at most ``actor_wait_s`` (an autoscaler may
add the node); then the run fails with a message that names the missing resource.
"""
from __future__ import annotations

from selfment_dist.errors import SelfmentUserError

import logging
import math

logger = logging.getLogger(__name__)

#: CPU threads of one CPU model actor: few actors with many intra-op threads beat many
#: single-threaded ones.
CPUS_PER_CPU_ACTOR = 8
#: CPUs that a decode or write task asks for.
LIGHT_TASK_CPUS = 0.25
#: Assumptions shared with the README's projection (see benchmarks/scale.py): images per second
#: one CPU decodes and resizes (small web JPEGs to 768 px), and images per second one GPU actor
#: labels (ViT-S/16 at 768 px with NCut + IPO on an A10G-class GPU).
DECODE_IMAGES_PER_S_PER_CPU = 60.0
GPU_ACTOR_IMAGES_PER_S = 120.0
CPU_ACTOR_IMAGES_PER_S_PER_THREAD = 1.0
#: The image size those throughputs are stated at.
REFERENCE_IMAGE_SIZE = 768
#: Seconds to wait for the first model actor when no node can hold one now (an autoscaler may add
#: one) or when the cluster is busy; then fail with a clear message.
DEFAULT_ACTOR_WAIT_S = 600.0


class UnschedulableError(SelfmentUserError, RuntimeError):
    """The model actors cannot start on this cluster (message names the missing resource)."""


def alive_nodes() -> list[dict[str, float]]:
    """Total resources (``CPU``, ``GPU``, …) of each alive node of the connected cluster."""
    import ray

    return [dict(n.get("Resources") or {}) for n in ray.nodes() if n.get("Alive")]


def check_gpus_per_actor(num_gpus_per_actor: float | None) -> None:
    """Per-actor GPUs must be in [0, 1]: a model replica uses one device (fractions share one)."""
    if num_gpus_per_actor is None:
        return
    g = float(num_gpus_per_actor)
    if not 0 <= g <= 1:
        raise ValueError(f"num_gpus_per_actor must be between 0 and 1 (a model replica uses one "
                         f"GPU, or a share of one), got {num_gpus_per_actor}")


def plan_resources(num_actors: int | None, num_gpus_per_actor: float | None, *,
                   nodes: list[dict[str, float]] | None = None,
                   allow_cpu_fallback: bool = False, image_size: int | None = None) -> dict:
    """Actor pool size and per-actor resources for the model stage of a pipeline.

    Args:
        num_actors: model replicas; None: as many as the nodes hold (GPU plan: unbounded, the
            pool grows with the GPU nodes the autoscaler adds).
        num_gpus_per_actor: GPUs per replica (0 to 1); None: 1 when a node has a GPU now,
            else 0 (CPU plan). Set it to ask for GPU nodes that an autoscaler has not started.
        nodes: total resources of each alive node (default: the connected cluster's).
        allow_cpu_fallback: GPU actors may run on CPU when CUDA is missing (else they refuse).
        image_size: the model's input size: the actors' expected throughput (stated at
            :data:`REFERENCE_IMAGE_SIZE`) scales with the number of patches.
    Returns:
        ``actors`` (the most replicas; None = unbounded), ``min_actors``, ``initial_actors``,
        ``num_gpus``,
        ``num_cpus`` (per actor), ``cpu_threads`` (None on GPU), ``device`` (``cuda``/``cpu``),
        ``require_gpu``, ``decode_concurrency`` (most decode tasks at once), ``fits_now``
        (some alive node can hold an actor), ``need`` (the resources one actor asks for).
    """
    check_gpus_per_actor(num_gpus_per_actor)
    if num_actors is not None and int(num_actors) < 1:
        raise ValueError(f"num_actors must be >= 1, got {num_actors}")
    nodes = alive_nodes() if nodes is None else nodes
    cpu_nodes = [float(n.get("CPU", 0)) for n in nodes if n.get("CPU", 0) >= 1]
    gpus_now = sum(float(n.get("GPU", 0)) for n in nodes)
    total_cpus = sum(cpu_nodes)
    if num_gpus_per_actor is None:
        num_gpus_per_actor = 1.0 if gpus_now >= 1 else (gpus_now if gpus_now > 0 else 0.0)
    g = float(num_gpus_per_actor)

    if g > 0:
        need = {"CPU": 1.0, "GPU": g}
        fits = [n for n in nodes if n.get("GPU", 0) >= g and n.get("CPU", 0) >= 1]
        held = sum(min(int(n["GPU"] // g), int(n["CPU"])) for n in fits)
        if not fits:
            logger.warning("num_gpus_per_actor=%s but no node has a GPU now: the model actors "
                           "wait (at most actor_wait_s) for an autoscaler to add one", g)
        actors = int(num_actors) if num_actors else None
        fed = (actors or max(1, held)) * GPU_ACTOR_IMAGES_PER_S
        # Start with the GPUs there are; grow as the autoscaler adds GPU nodes.
        initial = max(1, min(held, actors) if actors else held)
        plan = {"actors": actors, "min_actors": 1, "initial_actors": initial,
                "num_gpus": g, "num_cpus": 1,
                "cpu_threads": None, "device": None if allow_cpu_fallback else "cuda",
                "require_gpu": not allow_cpu_fallback}
        spare = total_cpus - (actors or held)
    else:
        need_threads = 1
        if cpu_nodes:
            largest = max(cpu_nodes)
            need_threads = int(min(largest, CPUS_PER_CPU_ACTOR))
        held = sum(int(c // need_threads) for c in cpu_nodes)
        actors = int(num_actors) if num_actors else max(1, held)
        actor_cpus = _cpu_actor_size(need_threads, cpu_nodes, actors)
        need = {"CPU": float(actor_cpus)}
        fits = [c for c in cpu_nodes if c >= actor_cpus]
        if num_actors and num_actors > held and held:
            logger.warning("num_actors=%d but the nodes hold %d actors of %g CPUs while "
                           "keeping CPUs for decoding; the others wait for free CPUs",
                           num_actors, held, actor_cpus)
        # The nodes exist now: start every actor at once (one per node's share of CPUs).
        plan = {"actors": actors, "min_actors": actors, "initial_actors": actors,
                "num_gpus": 0, "num_cpus": actor_cpus,
                "cpu_threads": need_threads, "device": "cpu", "require_gpu": False}
        fed = actors * need_threads * CPU_ACTOR_IMAGES_PER_S_PER_THREAD
        spare = total_cpus - actors * actor_cpus
    # Decode tasks: enough to feed the actors (at least one per actor), within the free CPUs.
    if image_size:
        fed *= (REFERENCE_IMAGE_SIZE / float(image_size)) ** 2
    wanted = math.ceil(fed / DECODE_IMAGES_PER_S_PER_CPU)
    n_actors = plan["actors"] or max(1, held)
    plan["decode_concurrency"] = max(1, min(max(wanted, n_actors), max(int(spare), n_actors)))
    plan["fits_now"] = bool(fits)
    plan["need"] = need
    logger.info("resource plan: %s (nodes: %s)", plan, _describe(nodes))
    return plan


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
