"""Several objects per image in the pseudo-label stage (``--max-objects``): what the labeller
is given. (The ``objects`` cells themselves are built by :mod:`selfment_dist.io.objects`.)"""
from __future__ import annotations

from selfment_dist.settings import PseudoLabelSettings

__all__ = ["labeler_object_options"]


def labeler_object_options(s: PseudoLabelSettings) -> dict:
    """``PseudoLabeler``'s object keywords: none at all for one object, so a default run's
    actors are built exactly as before."""
    if s.max_objects == 1:
        return {}
    return {"max_objects": s.max_objects, "min_object_confidence": s.min_object_confidence,
            "object_ipo": s.object_ipo}
