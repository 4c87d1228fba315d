"""The model stage of ``selfment segment``: backbone + head, one replica per actor."""
from __future__ import annotations

import logging

import numpy as np

from selfment_dist.settings import SegmentSettings
from selfment_dist.pipeline._internal.counters import count_replica_started, count_rows_here
from selfment_dist.pipeline._internal.device import actor_device
from selfment_dist.pipeline._internal.light_transport import label_on_device, rows_to_label
from selfment_dist.pipeline._internal.model_stage import ActorResources

logger = logging.getLogger(__name__)

__all__ = ["SegmentActor"]


class SegmentActor:
    """Ray Data callable class: loads a :class:`~selfment_dist.model.segmenter.Segmenter` once, maps
    decoded batches to patch saliency.

    ``__call__`` keeps the batch's columns but ``image`` and adds ``saliency`` float32
    (n, h, w) (zeros on error rows). A batch that fails in the model is retried image by image,
    so only the failing image gets an ``error``.
    """

    #: Decode tasks ship uint8 at the decoded size; this actor resizes on its device
    #: (``_internal/light_transport.py``).
    device_resize = True

    def __init__(self, *, settings: SegmentSettings, resources: ActorResources, counters=None):
        """``settings``: the run's, resolved (``image_size`` set)."""
        import torch

        from selfment_dist.model.segmenter import Segmenter

        resources.set_torch_threads()
        device = actor_device(resources.device, require_gpu=resources.require_gpu)
        self.segmenter = Segmenter.from_artifact(settings.model, image_size=settings.image_size,
                                                 device=device,
                                                 storage_options=settings.storage_options)
        from selfment_dist.model.preprocess import DeviceResizer

        self.resizer = DeviceResizer(self.segmenter.image_size, self.segmenter.device)
        self.counters = counters
        count_replica_started(counters)
        logger.info("segment actor ready: %r, %d torch threads", self.segmenter,
                    torch.get_num_threads())

    @staticmethod
    def replica_key(*, settings: SegmentSettings, resources: ActorResources) -> dict:
        """What makes a replica (warm workers rebuild one only when this changes)."""
        return {"settings": settings.model_dump(include={"model", "image_size",
                                                         "storage_options"}),
                "resources": vars(resources)}

    def _saliency(self, images: list[np.ndarray]) -> list[np.ndarray | str]:
        """Per image: float32 (h, w) saliency, or an error message (CUDA faults: see .device)."""
        def saliency(batch):
            return {"saliency": self.segmenter.saliency(batch)}

        return [res if isinstance(res, str) else res["saliency"]
                for res in label_on_device(saliency, self.resizer, images,
                                           what="segmentation")]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["key"])
        errors = [str(e) for e in batch["error"]]
        saliency = np.zeros((n, *self.segmenter.grid), dtype=np.float32)
        ok = [i for i in range(n) if not errors[i]]
        if ok:
            images = rows_to_label(batch["image"], ok)  # no host copy of the pixels
            for i, res in zip(ok, self._saliency(images)):
                if isinstance(res, str):
                    errors[i] = res
                else:
                    saliency[i] = res
        out = {k: v for k, v in batch.items() if k != "image"}
        out["error"] = np.array(errors, dtype=object)
        out["saliency"] = saliency
        count_rows_here(self.counters, n)
        return out
