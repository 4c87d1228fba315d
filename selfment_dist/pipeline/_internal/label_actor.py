"""The model stage of ``selfment pseudo-label``: backbone + NCut + IPO, one replica per actor."""
from __future__ import annotations

import functools
import logging

import numpy as np
import pyarrow as pa

from selfment_dist.io.masks import encode_mask
from selfment_dist.io.objects import objects_cell
from selfment_dist.io.schema import (PERMANENT, QUALITY_COLUMNS, TRANSIENT, encode_features,
                                     pseudo_label_schema)
from selfment_dist.settings import PseudoLabelSettings
from selfment_dist.pipeline._internal import faults
from selfment_dist.pipeline._internal.counters import count_replica_started, count_rows_here
from selfment_dist.pipeline._internal.device import actor_device
from selfment_dist.pipeline._internal.light_transport import label_on_device, rows_to_label
from selfment_dist.pipeline._internal.model_stage import ActorResources
from selfment_dist.pipeline._internal.objects import labeler_object_options

logger = logging.getLogger(__name__)

__all__ = ["LabelActor"]

#: The settings that make a replica: the model, the algorithm and the columns it fills.
REPLICA_FIELDS = ("backbone", "weights", "image_size", "precision", "tau", "eps", "binary_graph",
                  "n_iter", "sample_size", "no_object_threshold", "save_ncut", "save_features",
                  "storage_options", "max_objects", "min_object_confidence", "object_ipo")


class LabelActor:
    """Ray Data callable class: loads the backbone once, labels batches of decoded images.

    ``__call__`` maps the decode stage's batch to a ``pyarrow.Table`` of the contract. Rows that
    arrive with an error pass through as error rows; an exception while labelling a batch is
    retried image by image so that only the failing image becomes an error row. CUDA faults
    follow :mod:`.device` (OOM: smaller batches; others: the actor exits and Ray restarts it).
    With ``require_gpu`` the actor refuses to start without its GPU.
    """

    #: Decode tasks ship uint8 at the decoded size; this actor resizes on its device.
    device_resize = True

    def __init__(self, *, settings: PseudoLabelSettings, resources: ActorResources,
                 counters=None):
        """``settings``: the run's, resolved (``precision`` no longer ``auto``)."""
        import torch

        from selfment_dist.algorithm.labeler import PseudoLabeler
        from selfment_dist.model.backbone import build_backbone

        s = settings
        resources.set_torch_threads()
        device = actor_device(resources.device, require_gpu=resources.require_gpu)
        self.backbone = build_backbone(s.backbone, weights=str(s.weights),
                                       image_size=s.image_size, device=device,
                                       storage_options=s.storage_options, precision=s.precision)
        self.labeler = PseudoLabeler(self.backbone, tau=s.tau, eps=s.eps,
                                     binary_graph=s.binary_graph, n_iter=s.n_iter,
                                     sample_size=s.sample_size,
                                     no_object_threshold=float(s.no_object_threshold),
                                     **labeler_object_options(s))
        from selfment_dist.model.preprocess import DeviceResizer

        self.resizer = DeviceResizer(s.image_size, self.backbone.device)
        self.save_ncut = s.save_ncut
        self.save_features = s.save_features
        self.objects = s.max_objects > 1
        self.schema = pseudo_label_schema(ncut_mask=s.save_ncut, features=s.save_features,
                                          objects=self.objects)
        self.counters = counters
        count_replica_started(counters)
        self.batches = 0
        logger.info("label actor ready: %r, %d torch threads", self.backbone,
                    torch.get_num_threads())

    @staticmethod
    def replica_key(*, settings: PseudoLabelSettings, resources: ActorResources) -> dict:
        """What makes a replica (warm workers rebuild one only when this changes)."""
        return {"settings": settings.model_dump(include=set(REPLICA_FIELDS)),
                "resources": vars(resources)}

    def _label(self, images: list[np.ndarray]) -> list[dict | str]:
        """Per image: the result dict, or an error message."""
        from selfment_dist.algorithm.ncut import take_dense_fallbacks, take_lanczos_steps
        kw = {"return_ncut": self.save_ncut, "return_features": self.save_features}

        results = label_on_device(functools.partial(self.labeler, **kw), self.resizer, images)
        fallbacks = take_dense_fallbacks()
        if fallbacks and self.counters is not None:
            self.counters.add.remote("dense_eigh_fallbacks", fallbacks)
        steps = take_lanczos_steps()
        if steps and self.counters is not None:
            self.counters.add.remote("lanczos_steps", steps)
        return results

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        faults.label_batch(self.batches)  # tests only: see _internal/faults.py
        self.batches += 1
        n = len(batch["key"])
        errors = [str(e) or None for e in batch["error"]]
        kinds = [str(k) or PERMANENT for k in batch.get("error_kind", [""] * n)]
        ok = [i for i in range(n) if errors[i] is None]
        results: dict[int, dict | str] = {}
        if ok:
            images = rows_to_label(batch["image"], ok)  # no host copy of the pixels
            results = dict(zip(ok, self._label(images)))

        cols: dict[str, list] = {name: [] for name in self.schema.names}
        for i in range(n):
            res = results.get(i, errors[i])
            width, height = int(batch["width"][i]), int(batch["height"][i])
            cols["key"].append(str(batch["key"][i]))
            cols["source"].append(str(batch["source"][i]))
            cols["width"].append(width if width >= 0 else None)
            cols["height"].append(height if height >= 0 else None)
            if isinstance(res, dict):
                mask = np.asarray(res["mask"], dtype=bool)
                cols["grid_h"].append(mask.shape[0])
                cols["grid_w"].append(mask.shape[1])
                cols["mask"].append(encode_mask(mask))
                cols["fg_fraction"].append(float(mask.mean()))
                cols["error"].append(None)
                cols["error_kind"].append(None)
                for name in QUALITY_COLUMNS:
                    cols[name].append(res[name].item())
                if self.save_ncut:
                    cols["ncut_mask"].append(encode_mask(res["ncut_mask"]))
                if self.save_features:
                    cols["features"].append(encode_features(res["features"]))
                if self.objects:
                    cols["objects"].append(objects_cell(res["objects_mask"],
                                                        res["objects_confidence"],
                                                        res["objects_present"]))
            else:
                for name in ("grid_h", "grid_w", "mask", "fg_fraction", *QUALITY_COLUMNS):
                    cols[name].append(None)
                cols["error"].append(res)
                # A failure inside the model (not in the input) may not recur: retried.
                cols["error_kind"].append(kinds[i] if errors[i] is not None else TRANSIENT)
                if self.save_ncut:
                    cols["ncut_mask"].append(None)
                if self.save_features:
                    cols["features"].append(None)
                if self.objects:
                    cols["objects"].append(None)
        count_rows_here(self.counters, n)
        return pa.Table.from_pydict(cols, schema=self.schema)
