"""The official image preprocessing up to normalisation (:func:`resize_square`).

Apart from the backbone (no timm): the decode tasks of every stage call it, and a worker process
that only decodes images should not pay for importing the model stack.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = ["resize_square"]


def resize_square(image: Image.Image | np.ndarray, size: int) -> np.ndarray:
    """The official preprocessing up to normalisation: any PIL mode → RGB → float32 in [0, 1]
    (``ToTensor``) → bilinear resize with antialias to size×size (``Resize((s, s),
    antialias=True)``, align_corners=False). The order matters: resizing the uint8 image first
    and converting afterwards gives other values.

    Args:
        image: a PIL image, or a uint8 (H, W, 3) RGB array.
    Returns:
        float32 (size, size, 3) RGB array in [0, 1] (aspect ratio not preserved; EXIF
        orientation is the decoder's job).
    """
    if isinstance(image, Image.Image):
        if image.mode != "RGB":
            image = image.convert("RGB")
        image = np.array(image, dtype=np.uint8)  # a writable copy for torch
    x = torch.as_tensor(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255)
    if tuple(x.shape[1:]) != (size, size):
        x = F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False,
                          antialias=True)[0]
    return x.permute(1, 2, 0).contiguous().numpy()
