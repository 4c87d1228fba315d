"""How synthetic scene sets are written: image formats, encoding and the set's folders."""
from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image

from selfment_dist.io.storage import url_to_fs

#: Image file extensions the scene writers encode, and Pillow's format for each.
IMAGE_FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG"}
#: Scenes encoded and written per fsspec ``pipe`` call (bounded memory).
WRITE_CHUNK = 256


def image_ext(image_format: str) -> str:
    """The file extension of ``image_format`` (``".JPG"`` → ``"jpg"``), one the writers encode."""
    ext = image_format.lower().lstrip(".")
    if ext not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {sorted(IMAGE_FORMATS)}, got {image_format!r}")
    return ext


def scene_root(root_uri: str, storage_options: dict[str, Any] | None):
    """(fs, root path) of a scene set, with its ``images/`` and ``masks/`` folders made."""
    fs, root = url_to_fs(root_uri, storage_options)
    root = root.rstrip("/")
    for sub in ("images", "masks"):
        fs.makedirs(f"{root}/{sub}", exist_ok=True)
    return fs, root


def encode(array: np.ndarray, fmt: str) -> bytes:
    """An image (HxWx3 or HxW uint8) as ``fmt`` (Pillow's name) file bytes; JPEG at quality 95."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()
