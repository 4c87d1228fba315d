"""Settings checks that need more than a settings model: run on entry to a ``run_*`` function.

Types, ranges and the checks across fields of one stage are declared on the settings models
(:mod:`selfment_dist.settings`), which raise :class:`SettingsError` (one line per problem) before
anything starts. What is left here needs outside knowledge, such as a backbone's patch size.
"""
from __future__ import annotations

from numbers import Integral
from typing import Any

from selfment_dist.model.backbone_names import KNOWN_BACKBONES, image_size_problem, patch_size
from selfment_dist.settings import SettingsError

__all__ = ["SettingsError", "check_backbone_size"]


def check_backbone_size(backbone: Any, image_size: Any) -> list[str]:
    """The problem with ``backbone``/``image_size`` (unknown backbone, size not a positive
    multiple of its patch size), as a list of at most one line."""
    if not isinstance(backbone, str):
        return []  # already reported by the settings model
    size_ok = not isinstance(image_size, bool) and isinstance(image_size, Integral) \
        and image_size >= 1  # else already reported by the settings model
    if backbone in KNOWN_BACKBONES:  # no torch/timm import in the driver
        problem = size_ok and image_size_problem(backbone, int(image_size),
                                                 patch_size(backbone))
        return [problem] if problem else []
    from selfment_dist.model.backbone import backbone_family, check_image_size
    try:
        if size_ok:
            check_image_size(backbone, int(image_size))
        else:
            backbone_family(backbone)
    except ValueError as exc:
        return [str(exc)]
    return []
