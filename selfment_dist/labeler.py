"""Pseudo-labels: NCut then IPO on patch features; and the batch labeller a Ray actor wraps."""
from __future__ import annotations

import numpy as np
import torch

from ._tensors import as_unit_features
from .ipo import _ipo_unit
from .ncut import _ncut_unit


def pseudo_label(feats, *, tau: float = 0.2, eps: float = 1e-5, binary_graph: bool = True,
                 n_iter: int = 20, sample_size: int = 10) -> torch.Tensor:
    """Selfment pseudo-mask of each image: :func:`ncut_bipartition` refined by :func:`ipo_refine`.

    Args:
        feats: (B, h, w, C) patch features (any float dtype/device, need not be normalised).
    Returns:
        (B, h, w) bool foreground mask on the features' device.
    """
    x = as_unit_features(feats)  # once: the two stages share the checked, normalised features
    coarse = _ncut_unit(x, tau=tau, eps=eps, binary_graph=binary_graph)
    return _ipo_unit(x, coarse, n_iter=n_iter, sample_size=sample_size)


class PseudoLabeler:
    """Backbone → NCut → IPO for batches of images; load once, call per batch.

    Args:
        backbone: a :class:`selfment_dist.backbone.Backbone` (or any callable mapping uint8
            (B, S, S, 3) images to (B, h, w, C) features).
        tau, eps, binary_graph, n_iter, sample_size: the algorithm's parameters (paper defaults).
    """

    def __init__(self, backbone, *, tau: float = 0.2, eps: float = 1e-5, binary_graph: bool = True,
                 n_iter: int = 20, sample_size: int = 10):
        self.backbone = backbone
        self.params = dict(tau=tau, eps=eps, binary_graph=binary_graph)
        self.n_iter = n_iter
        self.sample_size = sample_size

    def __call__(self, images, *, return_ncut: bool = False,
                 return_features: bool = False) -> dict[str, np.ndarray]:
        """Label a batch.

        Args:
            images: float32 (B, S, S, 3) RGB in [0, 1] from ``backbone.resize_square`` (or uint8 at size S).
        Returns:
            ``mask`` bool (B, h, w); with ``return_ncut`` also ``ncut_mask`` bool (B, h, w); with
            ``return_features`` also ``features`` float16 (B, h, w, C) (unit-norm).
        """
        feats = as_unit_features(self.backbone(images))
        coarse = _ncut_unit(feats, **self.params)
        mask = _ipo_unit(feats, coarse, n_iter=self.n_iter, sample_size=self.sample_size)
        out = {"mask": mask.cpu().numpy()}
        if return_ncut:
            out["ncut_mask"] = coarse.cpu().numpy()
        if return_features:
            out["features"] = feats.to(torch.float16).cpu().numpy()
        return out
