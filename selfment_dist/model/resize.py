"""The official image preprocessing up to normalisation (:func:`resize_square`).

Apart from the backbone (no timm): the decode tasks of every stage call it, and a worker process
that only decodes images should not pay for importing the model stack.

Memory: the official order (float32 first, then resize) would hold the whole image as float32
(12 bytes a pixel, 19 with the uint8 copies: ~1.9 GB for 100 MP). torch's CPU kernel for an
antialiased bilinear resize of float tensors is *separable* (aten/src/ATen/native/cpu/
UpSampleKernel.cpp, ``separable_upsample_generic_Nd_kernel_impl``): it resamples the width
first, into a float32 intermediate (C, H, out_w), then the height of that intermediate. Each
output value of the width pass reads one input row only, and its weights depend only on (in_w,
out_w). So :func:`resize_square` runs the width pass over bands of rows, converting each band
to float32 on its own, then the height pass over the narrow intermediate: the same kernel on
the same numbers in the same order, hence bit-identical output, with a peak of about one band
plus the intermediate (H × size × 12 bytes).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = ["resize_square", "BAND_PIXELS"]

#: Input pixels converted to float32 at a time by the width pass (1 Mpx: 12 MB of float32;
#: bands this large cost no measurable time over one call on the whole image).
BAND_PIXELS = 1 << 20


def _to_float(rows: np.ndarray) -> torch.Tensor:
    """uint8 (h, W, 3) → float32 (1, 3, h, W) in [0, 1], as ``ToTensor`` does (x / 255)."""
    return torch.as_tensor(rows).permute(2, 0, 1).float().div_(255)[None]


def _resize(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    return F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False,
                         antialias=True)


def resize_square(image: Image.Image | np.ndarray, size: int, *,
                  band_pixels: int = BAND_PIXELS) -> np.ndarray:
    """The official preprocessing up to normalisation: any PIL mode → RGB → float32 in [0, 1]
    (``ToTensor``) → bilinear resize with antialias to size×size (``Resize((s, s),
    antialias=True)``, align_corners=False). The order matters: resizing the uint8 image first
    and converting afterwards gives other values. Bit-identical to converting the whole image
    and calling ``F.interpolate`` once, but the float32 copy is made band by band (see the
    module docstring).

    Args:
        image: a PIL image, or a uint8 (H, W, 3) RGB array.
        band_pixels: input pixels per band of the width pass (testing: small bands).
    Returns:
        float32 (size, size, 3) RGB array in [0, 1] (aspect ratio not preserved; EXIF
        orientation is the decoder's job).
    """
    if isinstance(image, Image.Image):
        if image.mode != "RGB":
            image = image.convert("RGB")
        width, height = image.size
    else:
        height, width = image.shape[:2]
    if width == size:  # no width pass (torch skips it too): the height pass reads it all
        narrow = _to_float(_rows(image, 0, height))
    else:
        step = max(1, band_pixels // max(width, 1))
        narrow = torch.empty((1, 3, height, size), dtype=torch.float32)
        for top in range(0, height, step):
            band = _to_float(_rows(image, top, min(top + step, height)))
            narrow[:, :, top:top + step] = _resize(band, band.shape[2], size)
            del band
    if height != size:
        narrow = _resize(narrow, size, size)
    return narrow[0].permute(1, 2, 0).contiguous().numpy()


def _rows(image: Image.Image | np.ndarray, top: int, bottom: int) -> np.ndarray:
    """Rows ``top:bottom`` as a writable uint8 (h, W, 3) array (a copy: torch wants it
    writable, and a PIL image is cropped first so that only the band is ever copied)."""
    if isinstance(image, Image.Image):
        return np.array(image.crop((0, top, image.size[0], bottom)), dtype=np.uint8)
    return np.array(image[top:bottom], dtype=np.uint8)
