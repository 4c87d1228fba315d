"""The two-stage dataset every model stage runs: read + decode (CPU tasks) → a model class.

A stage's model class (``LabelActor``, ``SegmentActor``) is built from two typed objects, passed
whole: the stage's settings (pydantic, picklable) and :class:`ActorResources`, the part of the
resource plan a replica needs. Nothing is re-packed into dicts of loose keys on the way.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

from selfment_dist.pipeline._internal.decode import read_and_decode
from selfment_dist.pipeline._internal.light_transport import two_calls_in_flight
from selfment_dist.pipeline._internal.ray_runtime import (LIGHT_TASK_CPUS, MAX_RETRIES,
                                                          decode_pool, model_stage_args)


@dataclass(frozen=True)
class ActorResources:
    """Where a model replica runs: ``device`` (None: its GPU if Ray gave it one, else CPU),
    ``cpu_threads`` (torch threads; None: torch's default) and ``require_gpu`` (refuse to start
    without the GPU the plan asked for)."""

    device: str | None = None
    cpu_threads: int | None = None
    require_gpu: bool = False

    @classmethod
    def from_plan(cls, plan: dict) -> "ActorResources":
        return cls(device=plan["device"], cpu_threads=plan["cpu_threads"],
                   require_gpu=bool(plan["require_gpu"]))

    def set_torch_threads(self) -> None:
        """Cap torch's threads at ``cpu_threads`` (and at the CPUs this process may use)."""
        if not self.cpu_threads:
            return
        import torch

        try:
            available = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            available = os.cpu_count() or 1
        torch.set_num_threads(max(1, min(int(self.cpu_threads), available)))


def decode_args(run, skip_ref, **extra) -> dict:
    """:func:`read_and_decode`'s keyword arguments from a model stage's settings ``run`` (image
    size, limits, storage, batch), the resume's ``skip_ref`` and the stage's ``extra`` ones."""
    return {"image_size": run.image_size, "max_pixels": run.max_pixels,
            "max_bytes": run.max_bytes, "storage_options": run.storage_options,
            "skip_ref": skip_ref, "rows_per_batch": run.batch_size, **extra}


def model_dataset(units: list[dict], *, n_containers: int, decode: dict, model_class,
                  model_args: dict, plan: dict, model_workers: str = "actors"):
    """units → :func:`read_and_decode` (CPU tasks, ``decode`` its keyword arguments) →
    ``model_class(**model_args)`` (elastic actor pool, or tasks on warm workers), lazily.

    About one batch of image files goes to each read task; each container (parquet, tar) gets
    its own."""
    import ray

    batch_size = decode["rows_per_batch"]
    n_blocks = max(1, min(len(units), n_containers + math.ceil(
        (len(units) - n_containers) / batch_size)))
    ds = ray.data.from_items(units, override_num_blocks=n_blocks)
    # A model class that resizes on its device takes uint8 at the decoded size, with two calls
    # in flight per actor (_internal/light_transport.py).
    device_resize = getattr(model_class, "device_resize", False)
    ds = ds.map_batches(read_and_decode, batch_size=None, zero_copy_batch=True,
                        fn_kwargs={**decode, "device_resize": device_resize},
                        num_cpus=LIGHT_TASK_CPUS, compute=decode_pool(plan),
                        max_retries=MAX_RETRIES)
    stage = model_stage_args(model_class, model_args, plan, model_workers)
    return ds.map_batches(batch_size=batch_size, batch_format="numpy",
                          udf_modifying_row_count=False,
                          **(two_calls_in_flight(stage) if device_resize else stage))
