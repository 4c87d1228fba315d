"""Pseudo-labels: NCut then IPO on patch features; and the batch labeller a Ray actor wraps."""
from __future__ import annotations

import numpy as np
import torch

from selfment_dist.algorithm._tensors import as_unit_features
from selfment_dist.algorithm.ipo import _ipo_unit
from selfment_dist.algorithm.ncut import _ncut_unit
from selfment_dist.algorithm.quality import NO_OBJECT_THRESHOLD, confidence, quality_signals


def pseudo_label(feats, *, tau: float = 0.2, eps: float = 1e-5, binary_graph: bool = True,
                 n_iter: int = 20, sample_size: int = 10, return_quality: bool = False):
    """Selfment pseudo-mask of each image: :func:`ncut_bipartition` refined by :func:`ipo_refine`.

    Args:
        feats: (B, h, w, C) patch features (any float dtype/device, need not be normalised).
        return_quality: also return the quality signals and ``confidence``.
    Returns:
        (B, h, w) bool foreground mask on the features' device; with ``return_quality``
        ``(mask, quality)``, ``quality`` a dict of (B,) float32 tensors (see
        :mod:`selfment_dist.algorithm.quality`, plus ``confidence``).
    """
    x = as_unit_features(feats)  # once: the two stages share the checked, normalised features
    if not return_quality:
        coarse = _ncut_unit(x, tau=tau, eps=eps, binary_graph=binary_graph)
        return _ipo_unit(x, coarse, n_iter=n_iter, sample_size=sample_size)
    return _label_with_quality(x, dict(tau=tau, eps=eps, binary_graph=binary_graph),
                               n_iter=n_iter, sample_size=sample_size)[::2]


def _label_with_quality(x: torch.Tensor, ncut_params: dict, *, n_iter: int, sample_size: int):
    """(mask, coarse, quality) of unit features ``x``; ``quality`` holds ``confidence`` too."""
    coarse, info = _ncut_unit(x, **ncut_params, return_info=True)
    mask, converged = _ipo_unit(x, coarse, n_iter=n_iter, sample_size=sample_size,
                                return_converged=True)
    quality = quality_signals(mask, coarse, info, converged)
    quality["confidence"] = confidence(quality)
    return mask, coarse, quality


class PseudoLabeler:
    """Backbone → NCut → IPO for batches of images; load once, call per batch.

    Args:
        backbone: a :class:`selfment_dist.model.backbone.Backbone` (or any callable mapping uint8
            (B, S, S, 3) images to (B, h, w, C) features).
        tau, eps, binary_graph, n_iter, sample_size: the algorithm's parameters (paper defaults).
        no_object_threshold: images whose ``confidence`` is below it get ``no_object`` True.
        max_objects: above 1, also the MaskCut-style objects of each image
            (:func:`selfment_dist.algorithm.maskcut_labels.multi_object_labels`); ``mask`` stays the
            single-object Selfment mask.
        min_object_confidence, object_ipo: passed to ``multi_object_labels`` (drop objects
            below this confidence; refine each object with IPO).
    """

    def __init__(self, backbone, *, tau: float = 0.2, eps: float = 1e-5, binary_graph: bool = True,
                 n_iter: int = 20, sample_size: int = 10,
                 no_object_threshold: float = NO_OBJECT_THRESHOLD, max_objects: int = 1,
                 min_object_confidence: float | None = None, object_ipo: bool = False):
        self.backbone = backbone
        self.params = dict(tau=tau, eps=eps, binary_graph=binary_graph)
        self.n_iter = n_iter
        self.sample_size = sample_size
        self.no_object_threshold = float(no_object_threshold)
        self.max_objects = int(max_objects)
        # Only the options asked for are passed on: the algorithm's defaults stay its own.
        self.object_options = {k: v for k, v in (("min_object_confidence", min_object_confidence),
                                                 ("ipo", object_ipo or None)) if v is not None}
        if object_ipo:  # IPO per object with this run's IPO limits
            self.object_options.update(n_iter=n_iter, sample_size=sample_size)

    def __call__(self, images, *, return_ncut: bool = False,
                 return_features: bool = False) -> dict[str, np.ndarray]:
        """Label a batch.

        Args:
            images: float32 (B, S, S, 3) RGB in [0, 1] from ``backbone.resize_square`` (or uint8 at size S).
        Returns:
            ``mask`` bool (B, h, w); the quality signals of :mod:`selfment_dist.algorithm.quality` and
            ``confidence`` as float32 (B,) (``ipo_converged`` bool), ``no_object`` bool (B,);
            with ``return_ncut`` also ``ncut_mask`` bool (B, h, w); with ``return_features``
            also ``features`` float16 (B, h, w, C) (unit-norm); with ``max_objects`` > 1 also
            ``objects_mask`` bool (B, N, h, w), ``objects_confidence`` float32 (B, N) and
            ``objects_present`` bool (B, N), N = ``max_objects``, in round order.
        """
        feats = as_unit_features(self.backbone(images))
        mask, coarse, quality = _label_with_quality(feats, self.params, n_iter=self.n_iter,
                                                    sample_size=self.sample_size)
        out = {"mask": mask.cpu().numpy()}
        for name, value in quality.items():
            out[name] = value.cpu().numpy()
        out["ipo_converged"] = out["ipo_converged"] > 0.5
        out["no_object"] = out["confidence"] < self.no_object_threshold
        if return_ncut:
            out["ncut_mask"] = coarse.cpu().numpy()
        if return_features:
            out["features"] = feats.to(torch.float16).cpu().numpy()
        if self.max_objects > 1:
            out.update(self._objects(feats))
        return out

    def _objects(self, feats: torch.Tensor) -> dict[str, np.ndarray]:
        from selfment_dist.algorithm.maskcut_labels import multi_object_labels

        objects = multi_object_labels(feats, max_objects=self.max_objects, **self.params,
                                      **self.object_options)
        return {"objects_mask": objects["mask"].cpu().numpy(),
                "objects_confidence": objects["confidence"].float().cpu().numpy(),
                "objects_present": objects["present"].cpu().numpy()}
