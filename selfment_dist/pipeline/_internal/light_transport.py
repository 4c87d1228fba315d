"""The pipeline side of the light transport (``model/preprocess.py``): what a decode task ships,
how a model actor takes it, and two model calls in flight per actor.

- Decode tasks ship each image as uint8 (H, W, 3) at its decoded size
  (:mod:`selfment_dist.io.pixels`) instead of float32 (S, S, 3): ~8x fewer object-store bytes
  for a 640x480 JPEG at S = 768, and no resize on the decode CPUs.
- The model actor takes the rows it labels without a per-batch host copy when every row
  decoded (:func:`rows_to_label`), and resizes them on its device in the model call's chunks,
  so that an OOM back-off (``_internal/device.run_guarded``) also shrinks the resize
  (:func:`label_on_device`).
- Two calls in flight per actor (:func:`two_calls_in_flight`): Ray Data runs up to two
  ``__call__`` of an actor at once in threads; the copy + resize of one batch overlaps the
  model's compute on the other, and :attr:`DeviceResizer.model_lock` keeps the model calls
  themselves one at a time.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from selfment_dist.io.pixels import as_image_list
from selfment_dist.pipeline._internal.device import run_guarded

__all__ = ["MODEL_CALLS_IN_FLIGHT", "rows_to_label", "label_on_device", "two_calls_in_flight"]

#: ``__call__`` of one model actor running at once (preparation of one overlaps compute of
#: the other; more would only hold more batches in device memory).
MODEL_CALLS_IN_FLIGHT = 2


def rows_to_label(column, ok: Sequence[int]) -> list[np.ndarray]:
    """The images of rows ``ok`` of a batch's ``image`` column, as a list of arrays: no pixel
    is copied on the host (all rows, or a subset: views and references only)."""
    return as_image_list(column, None if len(ok) == len(column) else ok)


def label_on_device(model: Callable, resizer, images: Sequence[np.ndarray], *,
                    what: str = "labelling") -> list:
    """Per image of ``images`` (uint8 at any size, or float32 at S): ``model(batch)`` rows,
    or an error message, with :func:`run_guarded`'s fault rules.

    Args:
        model: maps a float32 (B, S, S, 3) batch on the device to a dict of per-image arrays
            (``PseudoLabeler.__call__`` with its keyword arguments bound).
        resizer: a :class:`selfment_dist.model.preprocess.DeviceResizer` of the actor.
    """
    def run(part: Sequence[np.ndarray]) -> list[dict]:
        batch = resizer(list(part))  # copy + resize: may overlap the other call's compute
        with resizer.model_lock:
            out = model(batch)
        return [{k: v[i] for k, v in out.items()} for i in range(len(part))]

    return run_guarded(run, list(images), what=what)


def two_calls_in_flight(pool_args: dict) -> dict:
    """``map_batches`` arguments of a model stage (``ray_runtime.model_pool_args``) with
    :data:`MODEL_CALLS_IN_FLIGHT` calls per actor running at once (Ray 2.60's
    ``ActorPoolStrategy(max_concurrent_calls_per_actor=…, enable_true_multi_threading=True)``;
    without the second flag Ray only overlaps the batching, not the UDF)."""
    import ray.data

    pool = pool_args["compute"]
    if not isinstance(pool, ray.data.ActorPoolStrategy):
        return pool_args  # tasks on warm workers: one call per worker
    max_size = None if pool.max_size is None or math.isinf(pool.max_size) else pool.max_size
    compute = ray.data.ActorPoolStrategy(
        min_size=pool.min_size, max_size=max_size, initial_size=pool.initial_size,
        max_tasks_in_flight_per_actor=max(MODEL_CALLS_IN_FLIGHT,
                                          pool.max_tasks_in_flight_per_actor or 0),
        max_concurrent_calls_per_actor=MODEL_CALLS_IN_FLIGHT,
        enable_true_multi_threading=True)
    return {**pool_args, "compute": compute}
