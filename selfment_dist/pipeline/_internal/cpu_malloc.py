"""glibc malloc settings for the processes that run a model on CPU (model actors, warm model
workers, CPU training workers), passed to them as environment variables in their runtime env.

Why: a ViT forward at 768 px allocates activation buffers far above glibc's mmap threshold
(ViT-S/16, a batch of 8: the MLP's hidden activations are 113 MB), and glibc maps each one
fresh and unmaps it on free. Every forward then page-faults through gigabytes of new, zeroed
pages. In a Ray actor the model runs on a worker thread, whose malloc arena hands large blocks to
mmap whatever the thresholds say. On a 2-core machine this measured 2.3-2.7 million minor faults
and 3-4 s of system CPU per 16 images, and 12-17% fewer images/s than the same forward without
the faults (``benchmarks/pseudo_label.py`` and ``docs/benchmarks.md``).

The settings: one arena (every thread allocates from the main, brk-grown heap), no mmap for
large blocks, and no trimming of the heap's free top. The process keeps its peak heap (the
forward's own peak, reached again by every batch) instead of returning it to the kernel and
faulting it back in. PyTorch's CPU tuning guide suggests jemalloc or tcmalloc for the same
reason; these three variables get the same effect from the C library that is already loaded.
A C library other than glibc ignores them.
"""
from __future__ import annotations

from selfment_dist.pipeline._internal import faults

__all__ = ["CPU_MODEL_MALLOC_ENV", "model_process_env"]

#: glibc's names (``mallopt(3)``): the arena limit, the most mmap'd blocks, the trim threshold.
CPU_MODEL_MALLOC_ENV: dict[str, str] = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1),
}


def model_process_env(*, on_gpu: bool) -> dict[str, str]:
    """The variables a process that holds a model (a replica, a warm model worker, a training
    rank) starts with: :data:`CPU_MODEL_MALLOC_ENV` on CPU (a GPU process allocates little on
    the host), and the test fault variables the driver forwards (:func:`faults.worker_env`)."""
    return {**({} if on_gpu else CPU_MODEL_MALLOC_ENV), **faults.worker_env()}
