"""Validation and normalisation of patch features shared by the algorithm modules."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from selfment_dist.model.numerics import float32_matmuls


def exact_math(fn):
    """Run ``fn`` with autocast off on every device type and TF32 off (IEEE float32 matmuls,
    the caller's TF32 flags restored after): NCut and IPO compute in float32 or higher even
    inside a caller's bf16/fp16 autocast region or after ``--precision tf32`` turned TF32 on (a
    bf16 or TF32 affinity moves the ``tau`` threshold, and CUDA has no bf16 QR)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False), \
                float32_matmuls(tf32=False):
            return fn(*args, **kwargs)
    return wrapper


def as_unit_features(feats, *, name: str = "feats") -> torch.Tensor:
    """Check a (B, h, w, C) feature tensor and return it L2-normalised along C.

    Accepts unnormalised input of any floating dtype on any device (numpy arrays too); computes
    in at least float32 so half-precision backbone output does not lose the NCut threshold.
    A zero vector stays zero (its affinities then fall to ``eps``) instead of becoming NaN.

    Raises:
        ValueError: wrong rank, an empty dimension, or NaN/inf values.
    """
    if not isinstance(feats, torch.Tensor):
        feats = torch.as_tensor(feats)
    if feats.ndim != 4:
        raise ValueError(f"{name} must have shape (B, h, w, C), got {tuple(feats.shape)}")
    if 0 in feats.shape:
        raise ValueError(f"{name} has an empty dimension: shape {tuple(feats.shape)}")
    if not feats.is_floating_point() or feats.dtype in (torch.float16, torch.bfloat16):
        feats = feats.float()
    if not bool(torch.isfinite(feats).all()):
        raise ValueError(f"{name} contain NaN or inf values; check the backbone output "
                         "(e.g. a bf16 overflow or a corrupt checkpoint)")
    return F.normalize(feats, dim=-1, eps=1e-12)


def as_mask(mask, like: torch.Tensor, *, name: str = "mask") -> torch.Tensor:
    """Return ``mask`` as a bool tensor of shape ``like.shape[:3]`` on ``like``'s device."""
    if not isinstance(mask, torch.Tensor):
        mask = torch.as_tensor(mask)
    if tuple(mask.shape) != tuple(like.shape[:3]):
        raise ValueError(f"{name} must have shape {tuple(like.shape[:3])} (B, h, w) to match the "
                         f"features, got {tuple(mask.shape)}")
    return mask.to(device=like.device, dtype=torch.bool)
