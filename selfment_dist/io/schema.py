"""The pseudo-label data contract (``../shared/DESIGN.md``) as a pyarrow schema.

One row per input image, failures included:

=============  ========  ==========================================================================
column         type      meaning
=============  ========  ==========================================================================
key            string    unique, stable across runs (see ``docs/architecture.md``); never null
source         string    URI of the file the image came from (the container file for parquet/tar)
width, height  int32     image size after EXIF orientation; null when the image could not be read
grid_h/grid_w  int16     patch grid of ``mask``; null on error rows
mask           binary    ``numpy.packbits`` of the bool (grid_h, grid_w) mask, C order (io.masks)
fg_fraction    float32   share of foreground patches; null on error rows
error          string    null when fine, else a one-line reason (decode or model failure)
error_kind     string    null when fine; ``transient`` (I/O, timeouts, throttling, a model
                         failure: a re-run retries the key) or ``permanent`` (bad data, too
                         large: a re-run keeps the row)
fiedler_value  float32   quality signals (``selfment_dist.algorithm.quality``), null on error rows:
spectral_gap   float32   λ2 and λ3 − λ2 of the NCut graph, the normalised-cut value of its
ncut_value     float32   split, the share of the grid's outer ring in the mask, the share of
border_fraction float32  patches IPO moved, whether IPO reached a fixed point
ipo_change     float32
ipo_converged  bool
confidence     float32   in [0, 1]: calibrated trust in the mask (``benchmarks/confidence.py``)
no_object      bool      confidence below the run's ``no_object_threshold``: ``train`` skips the
                         row by default; null on error rows
ncut_mask      binary    optional (``save_ncut``): the NCut mask before IPO, same encoding
features       binary    optional (``save_features``): the unit-norm patch features as raw
                         little-endian float16 in C order (grid_h, grid_w, C): ``grid_h*grid_w*C``
                         values; C = len / (2·grid_h·grid_w), also in the manifest
objects        list      optional (``max_objects`` > 1): per object, in round order, its packed
                         grid mask, confidence and grid bbox (:mod:`selfment_dist.io.objects`)
=============  ========  ==========================================================================

Why ``features`` is binary and not ``list<float16>``: one contiguous value per row decodes with a
single ``numpy.frombuffer`` (no per-element repetition levels), is ~2 bytes per value on disk and
in memory, and round-trips through every parquet reader (float16 logical types are recent).
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from selfment_dist.errors import UserValueError
from selfment_dist.io.objects import OBJECTS_FIELD

#: ``error_kind`` values: retried by a re-run, or kept.
TRANSIENT, PERMANENT = "transient", "permanent"

__all__ = ["TRANSIENT", "PERMANENT", "PSEUDO_LABEL_SCHEMA", "pseudo_label_schema", "open_part",
           "error_row", "encode_features", "decode_features", "OPTIONAL_COLUMNS",
           "QUALITY_COLUMNS"]

_BASE_FIELDS = [
    pa.field("key", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("grid_h", pa.int16()),
    pa.field("grid_w", pa.int16()),
    pa.field("mask", pa.binary()),
    pa.field("fg_fraction", pa.float32()),
    pa.field("error", pa.string()),
    pa.field("error_kind", pa.string()),
]
# Quality columns: how much to trust each mask (after the base columns, before the optional ones).
_QUALITY_FIELDS = [
    pa.field("fiedler_value", pa.float32()),
    pa.field("spectral_gap", pa.float32()),
    pa.field("ncut_value", pa.float32()),
    pa.field("border_fraction", pa.float32()),
    pa.field("ipo_change", pa.float32()),
    pa.field("ipo_converged", pa.bool_()),
    pa.field("confidence", pa.float32()),
    pa.field("no_object", pa.bool_()),
]
#: The quality columns' names (null on error rows).
QUALITY_COLUMNS = tuple(f.name for f in _QUALITY_FIELDS)
_NCUT_FIELD = pa.field("ncut_mask", pa.binary())
_FEATURES_FIELD = pa.field(
    "features", pa.binary(),
    metadata={b"encoding": b"float16 little-endian, C order (grid_h, grid_w, C)"})

#: Optional columns, in the order they follow the base columns.
OPTIONAL_COLUMNS = ("ncut_mask", "features", "objects")

_SCHEMA_METADATA = {
    b"selfment.contract": b"pseudo-labels/1",
    b"selfment.mask_encoding": b"numpy.packbits of bool (grid_h, grid_w), C order",
}


def pseudo_label_schema(*, ncut_mask: bool = False, features: bool = False,
                        objects: bool = False) -> pa.Schema:
    """The contract's schema, with the optional ``ncut_mask`` / ``features`` / ``objects``
    columns."""
    fields = list(_BASE_FIELDS) + _QUALITY_FIELDS
    if ncut_mask:
        fields.append(_NCUT_FIELD)
    if features:
        fields.append(_FEATURES_FIELD)
    if objects:
        fields.append(OBJECTS_FIELD)
    return pa.schema(fields, metadata=_SCHEMA_METADATA)


#: The base contract (no optional columns).
PSEUDO_LABEL_SCHEMA = pseudo_label_schema()


def error_row(key: str, source: str, message: str, *, width: int | None = None,
              height: int | None = None, kind: str = "permanent") -> dict:
    """A row for an image that could not be labelled: everything but the ids (and the size when
    it is known) is null, ``error`` holds ``message``. Optional columns, when the schema has
    them, are null too (pyarrow fills missing keys with null). ``kind``: ``transient`` or
    ``permanent`` (see the ``error_kind`` column)."""
    if not message:
        raise ValueError("an error row needs a message")
    return {"key": str(key), "source": str(source), "width": width, "height": height,
            "grid_h": None, "grid_w": None, "mask": None, "fg_fraction": None,
            "error": str(message), "error_kind": str(kind), "ncut_mask": None,
            "features": None, "objects": None, **dict.fromkeys(QUALITY_COLUMNS)}


def encode_features(feats: np.ndarray) -> bytes:
    """float (h, w, C) → raw little-endian float16 bytes, C order."""
    return np.ascontiguousarray(feats, dtype="<f2").tobytes()


def decode_features(data: bytes, h: int, w: int) -> np.ndarray:
    """Inverse of :func:`encode_features` → float16 (h, w, C)."""
    flat = np.frombuffer(data, dtype="<f2")
    if flat.size % (int(h) * int(w)):
        raise ValueError(f"{flat.size} float16 values do not fit a {h}x{w} grid")
    return flat.reshape(int(h), int(w), -1)


def open_part(f, path: str) -> pq.ParquetFile:
    """The parquet file of an open pseudo-label part ``f`` (at ``path``, for the message).

    Raises:
        UserValueError: the file is not parquet (a stray or truncated file among the parts).
    """
    try:
        return pq.ParquetFile(f)
    except (pa.ArrowInvalid, OSError) as exc:
        raise UserValueError(f"{path} is not a readable parquet file ({exc}); move it out of "
                             "the labels folder or re-run the stage that wrote it") from None
