"""Backbone names and patch sizes without torch or timm.

Drivers check a run's backbone and image size before anything starts. Asking timm costs the
driver the torch, torchvision and timm imports (about 5 s of CPU); the names timm knew when this
list was written answer here, and any other name (a newer timm's, or a typo, for the hint)
goes to :func:`selfment_dist.model.backbone.check_image_size`. tests/test_backbone.py keeps the list
a subset of what the installed timm builds.
"""
from __future__ import annotations

import re

# timm names (architecture.tag) of each family; backbone.py adds timm's checkpoint converters.
FAMILY_PATTERNS = {
    "dino": re.compile(r"^vit_[a-z]+_patch(?:8|16)_224\.dino$"),
    "dinov2": re.compile(r"^vit_[a-z]+_patch14(?:_reg4)?_dinov2\.[a-z0-9_]+$"),
    "dinov3": re.compile(r"^vit_[a-z0-9_]+_patch16_dinov3(?:_qkvb)?\.[a-z0-9_]+$"),
}
PATCH_RE = re.compile(r"_patch(\d+)_")

#: ``supported_backbones()`` with timm 1.0.31.
KNOWN_BACKBONES = frozenset({
    "vit_7b_patch16_dinov3.lvd1689m", "vit_7b_patch16_dinov3.sat493m",
    "vit_base_patch8_224.dino", "vit_base_patch14_dinov2.lvd142m",
    "vit_base_patch14_reg4_dinov2.lvd142m", "vit_base_patch16_224.dino",
    "vit_base_patch16_dinov3.lvd1689m", "vit_base_patch16_dinov3_qkvb.eupe_lvd1689m",
    "vit_base_patch16_dinov3_qkvb.lvd1689m", "vit_giant_patch14_dinov2.lvd142m",
    "vit_giant_patch14_reg4_dinov2.lvd142m", "vit_huge_plus_patch16_dinov3.lvd1689m",
    "vit_huge_plus_patch16_dinov3_qkvb.lvd1689m", "vit_large_patch14_dinov2.lvd142m",
    "vit_large_patch14_reg4_dinov2.lvd142m", "vit_large_patch16_dinov3.lvd1689m",
    "vit_large_patch16_dinov3.sat493m", "vit_large_patch16_dinov3_qkvb.lvd1689m",
    "vit_large_patch16_dinov3_qkvb.sat493m", "vit_small_patch8_224.dino",
    "vit_small_patch14_dinov2.lvd142m", "vit_small_patch14_reg4_dinov2.lvd142m",
    "vit_small_patch16_224.dino", "vit_small_patch16_dinov3.lvd1689m",
    "vit_small_patch16_dinov3_qkvb.eupe_lvd1689m", "vit_small_patch16_dinov3_qkvb.lvd1689m",
    "vit_small_plus_patch16_dinov3.lvd1689m", "vit_small_plus_patch16_dinov3_qkvb.lvd1689m",
    "vit_tiny_patch16_dinov3_qkvb.eupe_lvd1689m",
})


def patch_size(name: str) -> int:
    return int(PATCH_RE.search(name).group(1))


def image_size_problem(name: str, image_size: int, patch: int) -> str | None:
    """Why ``image_size`` does not suit a backbone of ``patch``, or None."""
    if image_size <= 0 or image_size % patch:
        lower = (image_size // patch) * patch
        options = [s for s in (lower, lower + patch) if s > 0]
        return (f"image_size {image_size} is not a positive multiple of {name}'s patch size "
                f"{patch}; use {' or '.join(map(str, options))}")
    return None
