"""The ``objects`` column of the pseudo-label contract (``--max-objects N > 1``).

One cell per image: a list, in round order, of the objects MaskCut-style rounds kept (rejected or
absent rounds are left out, so a cell may be empty)::

    list<struct<mask: binary, confidence: float32, bbox: fixed_size_list<int16>[4]>>

- ``mask``: ``numpy.packbits`` of the bool (grid_h, grid_w) object mask, C order: the same
  encoding as the row's ``mask`` (:mod:`selfment_dist.io.masks`).
- ``confidence``: the object's confidence in [0, 1] (the algorithm's per-object score).
- ``bbox``: the mask's patch-grid box ``[x0, y0, x1, y1]``, half-open (x1, y1 exclusive, as a
  slice ``mask[y0:y1, x0:x1]``; width = x1 - x0). Computed here from the mask, so it always
  agrees with it.

No Ray, no torch: numpy in, Python lists out (what ``pyarrow.Table.from_pydict`` takes).
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from selfment_dist.io.masks import decode_mask, encode_mask

__all__ = ["OBJECT_TYPE", "OBJECTS_TYPE", "OBJECTS_FIELD", "grid_bbox", "objects_cell",
           "decode_objects"]

OBJECT_TYPE = pa.struct([
    pa.field("mask", pa.binary()),
    pa.field("confidence", pa.float32()),
    pa.field("bbox", pa.list_(pa.int16(), 4)),
])
OBJECTS_TYPE = pa.list_(OBJECT_TYPE)
OBJECTS_FIELD = pa.field(
    "objects", OBJECTS_TYPE,
    metadata={b"bbox": b"patch grid [x0, y0, x1, y1], half-open (x1, y1 exclusive)"})


def grid_bbox(mask: np.ndarray) -> list[int]:
    """Half-open ``[x0, y0, x1, y1]`` of a non-empty bool (h, w) mask (``[0, 0, 0, 0]`` if empty)."""
    m = np.asarray(mask, dtype=bool)
    cols, rows = np.flatnonzero(m.any(axis=0)), np.flatnonzero(m.any(axis=1))
    if cols.size == 0:
        return [0, 0, 0, 0]
    return [int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1]


def objects_cell(masks: np.ndarray, confidence: np.ndarray,
                 present: np.ndarray | None = None) -> list[dict]:
    """One image's ``objects`` cell.

    Args:
        masks: bool (N, h, w), one mask per round.
        confidence: float (N,), each round's confidence.
        present: bool (N,), the rounds that gave an object (default: non-empty masks). Absent
            rounds are left out; the others keep their round order.
    """
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 3:
        raise ValueError(f"object masks must be (N, h, w); got shape {masks.shape}")
    keep = masks.any(axis=(1, 2)) if present is None else (
        np.asarray(present, dtype=bool) & masks.any(axis=(1, 2)))
    conf = np.asarray(confidence, dtype=np.float32).reshape(-1)
    return [{"mask": encode_mask(masks[i]), "confidence": float(conf[i]),
             "bbox": grid_bbox(masks[i])} for i in np.flatnonzero(keep)]


def decode_objects(cell: list[dict] | None, h: int, w: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A cell back as ``(masks bool (K, h, w), confidence float32 (K,), bbox int (K, 4))``
    (K = 0 for an empty or null cell)."""
    cell = cell or []
    masks = np.zeros((len(cell), int(h), int(w)), dtype=bool)
    for i, obj in enumerate(cell):
        masks[i] = decode_mask(obj["mask"], h, w)
    conf = np.array([obj["confidence"] for obj in cell], dtype=np.float32)
    bbox = np.array([list(obj["bbox"]) for obj in cell], dtype=np.int64).reshape(-1, 4)
    return masks, conf, bbox
