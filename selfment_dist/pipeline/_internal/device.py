"""Model actors and their device: refuse a silent CPU fallback, and handle CUDA faults.

- A GPU actor checks in ``__init__`` that Ray gave it a GPU and that torch sees CUDA, and then
  places everything on ``cuda``; it runs on CPU only when the run asked for that fallback.
- Out of memory: free the cache and run the batch again in halves (down to single images).
- Any other CUDA error (illegal address, ECC, launch failure …) leaves the CUDA context broken
  for good: the actor process exits, Ray restarts it (``max_restarts``) and retries the batch
  (``max_task_retries``). Turning the error into error rows would fill the rest of the run with
  them while reporting it complete.
"""
from __future__ import annotations

from selfment_dist.errors import SelfmentUserError

import logging
import os
from typing import Callable, Sequence

logger = logging.getLogger(__name__)


class GpuUnavailableError(SelfmentUserError, RuntimeError):
    """A GPU actor found no usable GPU (and no CPU fallback was asked for)."""


def actor_device(device: str | None, *, require_gpu: bool) -> str | None:
    """The device a model actor runs on, after checking that a GPU actor really has its GPU.

    Args:
        device: the plan's device (``cuda``, ``cpu``, or None: the backbone's default).
        require_gpu: the actor was given GPUs and must use one.
    Raises:
        GpuUnavailableError: ``require_gpu`` and Ray assigned no GPU or torch sees no CUDA.
    """
    if not require_gpu:
        return device
    import ray
    import torch

    gpu_ids = ray.get_gpu_ids() if ray.is_initialized() else []
    if not gpu_ids:
        raise GpuUnavailableError("this model actor was scheduled without a GPU "
                                  "(ray.get_gpu_ids() is empty); refusing to run on CPU")
    if not torch.cuda.is_available():
        raise GpuUnavailableError(
            f"Ray assigned GPU {gpu_ids} to this model actor but torch {torch.__version__} "
            f"(CUDA build {torch.version.cuda}) cannot use it: check the NVIDIA driver against "
            f"the torch CUDA build (see cluster/README.md); refusing to run on CPU. "
            f"Pass cpu_fallback=True (--cpu-fallback) to run on CPU anyway")
    return "cuda"


def is_cuda_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or "CUDA out of memory" in str(exc)


def is_cuda_fault(exc: BaseException) -> bool:
    """A CUDA error other than out-of-memory: the context is unusable from now on."""
    if is_cuda_oom(exc):
        return False
    text = f"{type(exc).__name__}: {exc}"
    return any(s in text for s in ("CUDA error", "CUDNN_STATUS", "cuDNN error", "CUBLAS_STATUS",
                                   "AcceleratorError", "device-side assert"))


def exit_for_restart(exc: BaseException) -> None:
    """Exit this actor process at once so that Ray restarts it with a fresh CUDA context."""
    logger.error("CUDA fault in a model actor (%s: %s): exiting so that Ray restarts the actor "
                 "and retries its batch", type(exc).__name__, exc)
    logging.shutdown()
    os._exit(1)


# The largest batch that ran after an out-of-memory error, per ``what``, in this process: a model
# actor (or warm worker) is one process holding one replica, so this is the actor's memory of
# its device's limit. Without it every batch would first fail at full size again.
_OOM_LIMITS: dict[str, int] = {}


def oom_limit(what: str) -> int | None:
    """The batch size this process falls back to for ``what`` after an OOM (None: no OOM yet)."""
    return _OOM_LIMITS.get(what)


def forget_oom_limits() -> None:
    """Forget every remembered OOM batch size (tests; a new model in the same process)."""
    _OOM_LIMITS.clear()


def run_guarded(fn: Callable[[Sequence], list], items: Sequence, *, what: str) -> list:
    """``fn(items)`` → one result per item, with the fault rules of this module.

    After an OOM the rest of ``items`` goes through ``fn`` in chunks of half the size that
    failed (down to single items), and later calls for the same ``what`` in this process
    start at that size. An exception that is neither an OOM nor a CUDA fault is retried item
    by item, so only the failing item becomes an error (a ``str`` result
    ``"<what> failed: <Type>: <message>"``).
    """
    out: list = []
    limit, start = min(len(items), _OOM_LIMITS.get(what, len(items))), 0
    while start < len(items):
        chunk = items[start:start + limit]
        try:
            out.extend(fn(chunk))
        except Exception as exc:
            if is_cuda_fault(exc):
                exit_for_restart(exc)
            if is_cuda_oom(exc):
                _empty_cache()
                if len(chunk) > 1:
                    limit = len(chunk) // 2
                    _OOM_LIMITS[what] = min(limit, _OOM_LIMITS.get(what, limit))
                    logger.warning("CUDA out of memory on a batch of %d; going on (and starting "
                                   "later batches) in batches of %d", len(chunk), limit)
                    continue
            if len(chunk) == 1:
                out.append(f"{what} failed: {type(exc).__name__}: {exc}")
            else:
                logger.warning("batch of %d failed (%s); retrying one by one", len(chunk), exc)
                for i in range(len(chunk)):
                    out.extend(run_guarded(fn, chunk[i:i + 1], what=what))
        start += len(chunk)
    return out


def _empty_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
