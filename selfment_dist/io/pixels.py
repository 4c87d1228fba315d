"""Decoded pixels as the light transport ships them (``model/preprocess.py`` resizes them on
the model's device). No torch here: decode workers import this, and torch costs 1.6 s of CPU
per worker process.

- :func:`decoded_pixels`: any PIL mode → C-contiguous uint8 (H, W, 3) RGB.
- :func:`ragged_column`: a decode batch's ``image`` column of such arrays (Ray Data stores it
  as a variable-shaped tensor column).
- :func:`as_image_list`: the images of some rows of that column, without copying pixels.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

__all__ = ["decoded_pixels", "ragged_column", "as_image_list"]


def decoded_pixels(image: Image.Image | np.ndarray) -> np.ndarray:
    """A decoded image as C-contiguous uint8 (H, W, 3) RGB, as :func:`resize_square` reads it
    (any PIL mode converted with PIL's ``convert("RGB")``)."""
    if isinstance(image, Image.Image):
        if image.mode != "RGB":
            image = image.convert("RGB")
        return np.array(image, dtype=np.uint8)
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected uint8 (H, W, 3) RGB pixels, got {image.dtype} "
                         f"{tuple(image.shape)}")
    return np.ascontiguousarray(image)


def ragged_column(pixels: Sequence[np.ndarray | None]) -> np.ndarray:
    """An ``image`` column of a decode batch: an object array of uint8 (H, W, 3) arrays (Ray
    Data stores it as a variable-shaped tensor column). ``None`` (an error row) becomes a
    1x1 black image that no model call reads."""
    out = np.empty(len(pixels), dtype=object)
    for i, p in enumerate(pixels):
        out[i] = p if p is not None else np.zeros((1, 1, 3), dtype=np.uint8)
    return out


def as_image_list(column, rows: Sequence[int] | None = None) -> list[np.ndarray]:
    """The images of ``rows`` (all when None) of an ``image`` column as a list, without
    copying pixels: Ray Data hands a variable-shaped column over as an object array of arrays
    and an all-same-shape one as one (n, H, W, 3) array."""
    if rows is None:
        rows = range(len(column))
    return [np.asarray(column[i]) for i in rows]
