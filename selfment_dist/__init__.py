"""Selfment (arXiv 2602.23759) on Ray: DINO patch features → NCut → IPO → pseudo-masks → head.

The public algorithm API (no Ray needed)::

    from selfment_dist import ncut_bipartition, ipo_refine, pseudo_label, selfment_loss, PatchHead, sod_scores

The names load on first use (PEP 562): every Ray worker and CLI process imports this package,
and importing all of them up front costs seconds per process (the metrics alone pull in
scikit-learn through pysodmetrics), paid again by every model actor a run starts.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_PUBLIC = {
    "PatchHead": ".model.head",
    "ipo_refine": ".algorithm.ipo",
    "PseudoLabeler": ".algorithm.labeler",
    "pseudo_label": ".algorithm.labeler",
    "selfment_loss": ".model.losses",
    "sod_scores": ".evaluation.metrics",
    "ncut_bipartition": ".algorithm.ncut",
    "multi_object_masks": ".algorithm.maskcut",
}

__all__ = ["ncut_bipartition", "ipo_refine", "pseudo_label", "PseudoLabeler", "selfment_loss",
           "PatchHead", "sod_scores", "__version__"]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load lazily
    from selfment_dist.model.head import PatchHead
    from selfment_dist.algorithm.ipo import ipo_refine
    from selfment_dist.algorithm.labeler import PseudoLabeler, pseudo_label
    from selfment_dist.model.losses import selfment_loss
    from selfment_dist.evaluation.metrics import sod_scores
    from selfment_dist.algorithm.ncut import ncut_bipartition


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
