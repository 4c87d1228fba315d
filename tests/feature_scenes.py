"""Synthetic patch features shaped like DINO's on object-centric images (for algorithm tests).

An object (an ellipse, sometimes with a second part) whose patches share a direction, on a
background whose features drift smoothly across the image between a few directions, plus
per-patch noise. Deterministic from the numpy Generator passed in.
"""
from __future__ import annotations

import numpy as np


def make_features(rng: np.random.Generator, h: int, w: int, c: int, *, noise: float = 0.5) -> np.ndarray:
    """(h, w, c) float32 unnormalised features with one foreground object."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
    ry, rx = rng.uniform(0.15, 0.35) * max(h, 2), rng.uniform(0.15, 0.35) * max(w, 2)
    theta = rng.uniform(0, np.pi)
    dy, dx = yy - cy, xx - cx
    u = dy * np.cos(theta) + dx * np.sin(theta)
    v = -dy * np.sin(theta) + dx * np.cos(theta)
    fg = (u / ry) ** 2 + (v / rx) ** 2 < 1
    fg_dir = rng.normal(size=c)
    part_dir = fg_dir + 0.6 * rng.normal(size=c)
    bg_dirs = rng.normal(size=(3, c))
    # Background: a smooth blend of three directions across the image (scene layout).
    wy, wx = yy / max(h - 1, 1), xx / max(w - 1, 1)
    weights = np.stack([1 - wy, wy * (1 - wx), wy * wx], -1) + 0.2
    bg = weights @ bg_dirs
    # Object: one direction, its lower half drifting towards a second part direction.
    part = np.clip((u / ry + 1) / 2, 0, 1)[..., None]
    obj = (1 - 0.5 * part) * fg_dir + 0.5 * part * part_dir
    feats = np.where(fg[..., None], obj, bg) * 1.0 + noise * rng.normal(size=(h, w, c))
    return feats.astype(np.float32)


def make_batch(rng: np.random.Generator, b: int, h: int, w: int, c: int, **kwargs) -> np.ndarray:
    return np.stack([make_features(rng, h, w, c, **kwargs) for _ in range(b)])
