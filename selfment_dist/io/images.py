"""Image decoding with clear failures: bytes → RGB ``PIL.Image`` in display orientation.

Every way an input can be unusable ends in :class:`ImageDecodeError` with a one-line message
(which becomes the ``error`` of that image's row), never in a crash or a silent skip:

- empty file (0 bytes);
- too many bytes (``max_bytes``), checked before the image is parsed (sources check it before
  reading, see :mod:`.sources`);
- not an image (e.g. a text file named ``.jpg``), or a format outside :data:`FORMATS`: only
  JPEG, PNG, WebP, GIF, BMP and TIFF are ever opened, whatever the file is named, so none of
  Pillow's other parsers (EPS, PSD, FITS, ...) can be reached from an input;
- too many pixels (decompression bombs): the size is read from the header and checked *before*
  the pixel data is decoded;
- an unsupported mode (32-bit integer or float images, whose scaling to 8 bits is ambiguous);
- truncated or corrupt data (e.g. a JPEG cut short).
"""
from __future__ import annotations

import io
import logging
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from selfment_dist.errors import SelfmentUserError

logger = logging.getLogger(__name__)

__all__ = ["ImageDecodeError", "decode_image", "DEFAULT_MAX_PIXELS", "DEFAULT_MAX_BYTES",
           "IMAGE_EXTENSIONS", "FORMATS"]

#: Default pixel-count limit (width × height) against decompression bombs: 100 megapixels.
DEFAULT_MAX_PIXELS = 100_000_000
#: Default byte limit of one encoded image (a file, a tar member, a parquet cell): 32 MiB, far
#: above any web image, far below what would strain a decode task's memory.
DEFAULT_MAX_BYTES = 32 * 1024 * 1024

#: The only formats Pillow may open (Pillow format ids); every other format is an error row.
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
#: File extensions read as images (lower case, without the dot): those of :data:`FORMATS`.
IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "jfif", "png", "webp", "bmp", "gif", "tif", "tiff"})

# 8-bit modes PIL converts to RGB faithfully; 16-bit greyscale is scaled by hand (>> 8).
_RGB_CONVERTIBLE = frozenset({"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX",
                              "CMYK", "YCbCr", "LAB", "HSV"})
_SIXTEEN_BIT = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


class ImageDecodeError(SelfmentUserError, ValueError):
    """An input that cannot be turned into an RGB image; the message says why, in one line.
    Inside a run it becomes the image's error row; from a file the user named, a user error."""


def too_many_bytes(size: int, max_bytes: int) -> str:
    """The error message for an input of ``size`` bytes over ``max_bytes``."""
    return f"too many bytes: {size:,} > max_bytes {max_bytes:,}"


def _head(data: bytes, n: int = 16) -> str:
    return repr(bytes(data[:n]))


def _open(data: bytes) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"too many pixels (decompression bomb guard): {exc}") from None
    except UnidentifiedImageError:
        raise ImageDecodeError(
            f"not an image: unrecognised format ({len(data)} bytes starting {_head(data)}); "
            f"supported: {', '.join(FORMATS)}"
        ) from None
    except Exception as exc:  # a recognised header that is itself broken
        raise ImageDecodeError(f"unreadable image header: {type(exc).__name__}: {exc}") from None


def decode_image(data: bytes, *, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 max_bytes: int | None = DEFAULT_MAX_BYTES,
                 exif_orientation: bool = True) -> Image.Image:
    """Decode encoded image bytes to an RGB image, EXIF orientation applied (unless
    ``exif_orientation=False``: pixels as stored, the official Selfment code's frame, which
    benchmark evaluation uses).

    Args:
        data: the file's bytes (JPEG, PNG, WebP, …).
        max_pixels: largest accepted ``width * height`` (as stored, before orientation);
            ``None`` disables the check (PIL's own bomb guard still applies).
        max_bytes: largest accepted ``len(data)``; ``None`` disables the check.
        exif_orientation: apply the EXIF orientation tag (``ImageOps.exif_transpose``).
    Returns:
        ``PIL.Image`` in mode ``"RGB"``, size ``(width, height)`` after EXIF orientation.
    Raises:
        ImageDecodeError: with a one-line message (see module docstring).
    """
    if data is None or len(data) == 0:
        raise ImageDecodeError("empty file (0 bytes)")
    if max_bytes is not None and len(data) > max_bytes:
        raise ImageDecodeError(too_many_bytes(len(data), max_bytes))
    im = _open(data)
    fmt = im.format or "image"

    # Header checks: before a single pixel is decoded.
    w, h = im.size
    if max_pixels is not None and w * h > max_pixels:
        raise ImageDecodeError(f"too many pixels: {w}x{h} = {w * h:,} > max_pixels {max_pixels:,}"
                               " (decompression bomb guard)")
    if im.mode not in _RGB_CONVERTIBLE and im.mode not in _SIXTEEN_BIT:
        raise ImageDecodeError(f"unsupported image mode {im.mode!r} ({fmt}); supported: 8-bit "
                               "L/LA/P/RGB/RGBA/CMYK/YCbCr and 16-bit greyscale")

    # Full decode.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im.load()
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"too many pixels (decompression bomb guard): {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageDecodeError(f"truncated or corrupt {fmt} data: {exc}") from None

    try:
        if exif_orientation:
            # In place: the default returns a full copy even when nothing is to be turned (4
            # bytes a pixel more at the decode's peak; see docs/inputs_memory.md).
            ImageOps.exif_transpose(im, in_place=True)
    except Exception as exc:  # a broken EXIF block must not cost the image
        logger.debug("ignoring unreadable EXIF orientation: %s", exc)

    if im.mode in _SIXTEEN_BIT:
        grey = (np.asarray(im, dtype=np.uint16) >> 8).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if im.mode in ("P", "PA") and "transparency" in im.info:
        im = im.convert("RGBA")
    return im if im.mode == "RGB" else im.convert("RGB")
