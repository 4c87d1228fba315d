"""Mask encoding of the pseudo-label contract: ``numpy.packbits`` of the bool grid, C order."""
from __future__ import annotations

import numpy as np

__all__ = ["encode_mask", "decode_mask"]


def encode_mask(mask) -> bytes:
    """bool (h, w) → ``numpy.packbits(mask, axis=None)`` bytes (row-major, big bit order).

    ``ceil(h * w / 8)`` bytes; the grid shape is stored next to it (``grid_h``, ``grid_w``).
    """
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D (h, w); got shape {m.shape}")
    return np.packbits(np.ascontiguousarray(m, dtype=bool), axis=None).tobytes()


def decode_mask(data: bytes, h: int, w: int) -> np.ndarray:
    """Inverse of :func:`encode_mask`: bytes → bool (h, w).

    Raises:
        ValueError: when the byte count does not match ``ceil(h * w / 8)``.
    """
    h, w = int(h), int(w)
    n = h * w
    expected = (n + 7) // 8
    if len(data) != expected:
        raise ValueError(f"mask of {len(data)} bytes does not fit a {h}x{w} grid "
                         f"(expected {expected} bytes)")
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=n)
    return bits.astype(bool).reshape(h, w)
