"""COCO instance JSON of pseudo-label objects, in CutLER's convention (``maskcut/maskcut.py``).

- One category: ``{"id": 1, "name": "fg", "supercategory": "fg"}``.
- ``images``: ``id``, ``file_name``, ``width``, ``height`` (the original image, after EXIF
  orientation), plus ``key`` (the pseudo-label row's key, to join back).
- ``annotations``: ``id``, ``image_id``, ``category_id`` 1, ``segmentation`` (compressed RLE
  at the original image size, ``counts`` as an ASCII string), ``area`` and ``bbox``
  ``[x, y, w, h]`` from ``pycocotools.mask.area`` / ``toBbox``, ``iscrowd`` 0, plus ``score``
  (the object's confidence: the file doubles as a COCOeval results file) and ``round`` (the
  object's position in its row's ``objects`` cell).

Grid → image size: nearest-neighbour, the rule of ``torch.nn.functional.interpolate(...,
mode="nearest")`` (source index ``floor(i * grid / size)``). CutLER upsamples its grid mask
that way too (to the 480² square, before its CRF, then a PIL resize to the original size and a
threshold at half); with no CRF in between, nearest straight to the original size keeps the
same cell edges (up to a pixel of rounding) without the detour.

No Ray, no torch: numpy and pycocotools.
"""
from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils

from selfment_dist.io.objects import decode_objects

__all__ = ["CATEGORY_ID", "CATEGORIES", "INFO", "upsample_nearest", "encode_rles",
           "image_entry", "object_annotations", "coco_document"]

CATEGORY_ID = 1
CATEGORIES = [{"id": CATEGORY_ID, "name": "fg", "supercategory": "fg"}]
INFO = {"description": "selfment-dist pseudo-instances (MaskCut-style objects)",
        "url": "https://github.com/facebookresearch/CutLER", "version": "1.0"}


def upsample_nearest(masks: np.ndarray, height: int, width: int) -> np.ndarray:
    """bool (K, h, w) grid masks → bool (K, height, width), nearest neighbour."""
    masks = np.asarray(masks, dtype=bool)
    k, h, w = masks.shape
    rows = np.minimum((np.arange(height) * h) // height, h - 1)
    cols = np.minimum((np.arange(width) * w) // width, w - 1)
    return masks[:, rows[:, None], cols[None, :]]


def encode_rles(masks: np.ndarray) -> list[dict]:
    """bool (K, H, W) → K compressed RLEs (``pycocotools.mask.encode``), ``counts`` bytes."""
    if len(masks) == 0:
        return []
    # pycocotools takes (H, W, K) uint8 in Fortran order.
    return mask_utils.encode(np.asfortranarray(np.moveaxis(masks, 0, -1).astype(np.uint8)))


def image_entry(image_id: int, file_name: str, width: int, height: int, key: str) -> dict:
    return {"id": int(image_id), "file_name": file_name, "width": int(width),
            "height": int(height), "key": key}


def object_annotations(image_id: int, first_ann_id: int, cell: list[dict] | None,
                       grid_h: int, grid_w: int, width: int, height: int, *,
                       min_confidence: float | None = None) -> list[dict]:
    """The annotations of one row's ``objects`` cell.

    Object ``i`` of the cell gets id ``first_ann_id + i`` whatever is left out, so ids do not
    depend on ``min_confidence``. Left out: objects below ``min_confidence``, and masks that
    cover no pixel at the image size (CutLER drops ``area < 1`` too).
    """
    masks, conf, _ = decode_objects(cell, grid_h, grid_w)
    keep = np.arange(len(masks))
    if min_confidence is not None:
        keep = keep[conf >= min_confidence]
    rles = encode_rles(upsample_nearest(masks[keep], height, width))
    if not rles:
        return []
    areas, boxes = mask_utils.area(rles), mask_utils.toBbox(rles)
    out = []
    for i, rle, area, box in zip(keep, rles, areas, boxes):
        if area < 1:
            continue
        out.append({"id": int(first_ann_id + i), "image_id": int(image_id),
                    "category_id": CATEGORY_ID, "iscrowd": 0, "area": float(area),
                    "bbox": [float(v) for v in box],
                    "segmentation": {"size": [int(height), int(width)],
                                     "counts": rle["counts"].decode("ascii")},
                    "score": float(conf[i]), "round": int(i)})
    return out


def coco_document(images: list[dict], annotations: list[dict]) -> dict:
    """A COCO instance file (``pycocotools.coco.COCO`` and Detectron2's ``load_coco_json``)."""
    return {"info": INFO, "licenses": [], "categories": CATEGORIES, "images": images,
            "annotations": annotations}
