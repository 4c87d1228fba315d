"""Selfment (arXiv 2602.23759) on Ray: DINO patch features → NCut → IPO → pseudo-masks → head.

The public algorithm API (no Ray needed)::

    from selfment_dist import ncut_bipartition, ipo_refine, pseudo_label, selfment_loss, PatchHead, sod_scores
"""
from __future__ import annotations

__version__ = "0.1.0"

from .head import PatchHead
from .ipo import ipo_refine
from .labeler import PseudoLabeler, pseudo_label
from .losses import selfment_loss
from .metrics import sod_scores
from .ncut import ncut_bipartition

__all__ = ["ncut_bipartition", "ipo_refine", "pseudo_label", "PseudoLabeler", "selfment_loss",
           "PatchHead", "sod_scores", "__version__"]
