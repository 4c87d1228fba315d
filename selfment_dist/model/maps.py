"""Saliency-map post-processing: patch grid → image size → 8-bit levels → PNG (stateless).

Apart from :mod:`selfment_dist.model.segmenter` (no timm): segment's write tasks call these, and a
worker process that only writes maps should not pay for importing the model stack.
"""
from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = ["upsample", "to_uint8", "to_png_bytes", "QUANTIZE"]


def upsample(saliency: np.ndarray | torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of patch-grid saliency to an image size (``align_corners=False``).

    Args:
        saliency: float (h, w) or (B, h, w) values in [0, 1], numpy or torch (any device).
        size: (H, W) target size in pixels (rows, columns).
    Returns:
        float32 numpy (H, W) or (B, H, W), values in [0, 1].
    """
    sal = torch.as_tensor(saliency)
    if sal.ndim not in (2, 3):
        raise ValueError(f"saliency must be (h, w) or (B, h, w), got shape {tuple(sal.shape)}")
    height, width = (int(s) for s in size)
    if height < 1 or width < 1:
        raise ValueError(f"size must be a positive (H, W), got {size}")
    x = sal.float()
    x = x[None, None] if x.ndim == 2 else x[:, None]  # (N, 1, h, w)
    out = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)
    out = out[0, 0] if sal.ndim == 2 else out[:, 0]
    return out.clamp_(0.0, 1.0).cpu().numpy()


#: Float saliency → 8-bit levels: ``floor(255 * s)`` as the official code writes its maps
#: (``(p * 255).astype(np.uint8)``), or ``round(255 * s)``.
QUANTIZE = ("floor", "round")


def to_uint8(saliency: np.ndarray | torch.Tensor, quantize: str = "floor") -> np.ndarray:
    """Float saliency in [0, 1] → uint8 levels (values outside are clipped).

    Args:
        saliency: float (H, W) (or any shape) in [0, 1], numpy or torch (any device).
        quantize: ``"floor"``: ``floor(255 * s)`` in float32, the official inference.py's
            ``(s * 255).astype(uint8)`` (default); ``"round"``: ``round(255 * s)``.
    Returns:
        uint8 array of the same shape.
    """
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize must be one of {QUANTIZE}, got {quantize!r}")
    sal = saliency.float().cpu().numpy() if isinstance(saliency, torch.Tensor) else \
        np.asarray(saliency, dtype=np.float32)
    # float32 throughout, as the official code: 255 * s is rounded to float32 before the floor.
    scaled = np.clip(sal, 0.0, 1.0).astype(np.float32) * np.float32(255.0)
    return (np.rint(scaled) if quantize == "round" else scaled).astype(np.uint8)


def to_png_bytes(saliency: np.ndarray | torch.Tensor) -> bytes:
    """A saliency map as an 8-bit greyscale PNG.

    Args:
        saliency: float (H, W) in [0, 1] (stored as ``floor(255 * s)``, see :func:`to_uint8`),
            or uint8 (H, W) levels stored as they are.
    Returns:
        PNG file bytes, mode ``L``, H rows by W columns.
    """
    arr = np.asarray(saliency.cpu() if isinstance(saliency, torch.Tensor) else saliency)
    if arr.ndim != 2:
        raise ValueError(f"saliency must be 2-D (H, W), got shape {arr.shape}")
    if arr.dtype != np.uint8:
        arr = to_uint8(arr)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr), mode="L").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
