"""Synthetic scenes with several objects and instance ground truth (for MaskCut's tests and
benchmarks, the multi-object demo and the instance evaluation).

Two kinds, both pure functions of their seed:

* planted patch features (:func:`make_instance_features`): 2-4 separated objects on a grid, each
  object's patches sharing a common "object" direction plus its own direction, on a background
  drifting between three directions, plus Gaussian noise. The objects differ in how strongly
  they carry their own direction, so their affinity to the other objects differs and the
  normalised cut has one clear split per round (an open spectral gap) rather than a tie;
* images (:func:`make_instance_scene`, :func:`write_instance_scenes`): a textured background with
  2-4 separated objects in distinct colours and textures, with one mask per object and a COCO
  instances file in CutLER's convention (one category, id 1, ``"fg"``).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from selfment_dist.data.scene_files import IMAGE_FORMATS, WRITE_CHUNK, encode, image_ext, scene_root
from selfment_dist.data.synthetic import (_distinct_colours, _finish, _masked_stats, _paint,
                                          _texture, scene_keys)

#: Noise levels (std per feature dimension, directions have std 1) used by tests and benchmarks.
NOISE_LEVELS = (0.2, 0.5, 0.8)
CATEGORY = {"id": 1, "name": "fg", "supercategory": "fg"}


def _separated_ellipses(rng: np.random.Generator, shape: tuple[int, int], n: int, *,
                        min_frac: float, max_frac: float, gap: int) -> list[np.ndarray]:
    """``n`` ellipses of area ``min_frac..max_frac`` of the frame, inside it, ``gap`` pixels
    (or patches) apart from each other (rejection sampling; fewer when they do not fit)."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    masks: list[np.ndarray] = []
    blocked = np.zeros(shape, dtype=bool)
    for _ in range(60 * n):
        if len(masks) == n:
            break
        frac = rng.uniform(min_frac, max_frac)
        aspect = float(np.exp(rng.uniform(np.log(0.6), np.log(1.6))))
        r = np.sqrt(frac * h * w / np.pi)
        ry, rx = r * np.sqrt(aspect), r / np.sqrt(aspect)
        cy = rng.uniform(ry + 0.5, max(h - ry - 0.5, ry + 0.6))
        cx = rng.uniform(rx + 0.5, max(w - rx - 0.5, rx + 0.6))
        m = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
        if m.sum() < max(4, 0.5 * min_frac * h * w) or (m & blocked).any():
            continue
        masks.append(m)
        blocked |= ndimage.binary_dilation(m, iterations=gap)
    return masks


def make_instance_features(rng: np.random.Generator, h: int, w: int, c: int = 64, *,
                           n_objects: int = 3, noise: float = 0.5
                           ) -> tuple[np.ndarray, np.ndarray]:
    """Planted multi-object patch features.

    Args:
        rng: the random stream; h, w: grid; c: feature dimension.
        n_objects: objects to plant (2-4 fit comfortably on a 20x20 grid or larger).
        noise: per-dimension std of the Gaussian noise (see :data:`NOISE_LEVELS`).
    Returns:
        feats: float32 (h, w, c), unnormalised; masks: bool (K, h, w), K ≤ ``n_objects``
        disjoint, 4-separated object masks (K < n_objects only when they did not fit).
    """
    masks = _separated_ellipses(rng, (h, w), n_objects, min_frac=0.03, max_frac=0.12, gap=2)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    wy, wx = yy / max(h - 1, 1), xx / max(w - 1, 1)
    bg_dirs = rng.normal(size=(3, c))
    weights = np.stack([1 - wy, wy * (1 - wx), wy * wx], -1) + 0.2
    feats = weights @ bg_dirs
    common = rng.normal(size=c)
    # Objects carry their own direction with increasing weight (so they link to fewer of the
    # other objects) and some of one background direction (so they link to a part of the
    # background that differs per object): no two objects are alike in the graph, hence no
    # tie between objects in the eigenvector, even where noise is too weak to break one.
    for k, m in enumerate(masks):
        own = rng.normal(size=c)
        strength = 0.4 + 0.9 * k + rng.uniform(0, 0.2)
        feats[m] = common + strength * own + 0.3 * bg_dirs[k % 3] + 0.2 * feats[m]
    feats = feats + noise * rng.normal(size=(h, w, c))
    return feats.astype(np.float32), np.stack(masks) if masks else np.zeros((0, h, w), bool)


def make_instance_feature_batch(rng: np.random.Generator, b: int, h: int, w: int, c: int = 64,
                                **kwargs) -> tuple[np.ndarray, list[np.ndarray]]:
    """(b, h, w, c) float32 features and the list of their (K_i, h, w) masks."""
    pairs = [make_instance_features(rng, h, w, c, **kwargs) for _ in range(b)]
    return np.stack([p[0] for p in pairs]), [p[1] for p in pairs]


def make_instance_scene(seed, *, size: tuple[int, int] = (128, 128),
                        n_objects: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """An image with 2-4 separated objects (``n_objects`` fixes the count).

    Returns:
        image: uint8 (H, W, 3); masks: bool (K, H, W), disjoint, one per object.
    """
    h, w = (int(s) for s in size)
    if h < 32 or w < 32:
        raise ValueError(f"instance scene size must be at least 32x32, got {size}")
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 5)) if n_objects is None else int(n_objects)
    bg_colours = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
    image = _paint(_texture(rng, str(rng.choice(["gradient", "noise"])), (h, w)), bg_colours)
    masks = _separated_ellipses(rng, (h, w), n, min_frac=0.03, max_frac=0.12,
                                gap=max(2, min(h, w) // 32))
    for m in masks:
        bg_mean, _ = _masked_stats(image, ~m)
        kind = str(rng.choice(["flat", "stripes", "noise", "checker"]))
        layer = _paint(_texture(rng, kind, (h, w)), _distinct_colours(rng, bg_mean))
        image = np.where(m[..., None], layer, image)
    image, _ = _finish(rng, image, np.logical_or.reduce(masks) if masks else np.zeros((h, w), bool))
    return image, np.stack(masks) if masks else np.zeros((0, h, w), bool)


def instance_annotations(masks: np.ndarray, image_id: int, first_id: int,
                         scores: Sequence[float] | None = None) -> list[dict]:
    """COCO annotations (or, with ``scores``, results) of bool (K, H, W) masks of one image:
    RLE ``segmentation`` (``pycocotools.mask.encode`` of Fortran-ordered uint8, counts as
    ASCII), ``area``, ``bbox`` [x, y, w, h], ``category_id`` 1, ``iscrowd`` 0; empty masks
    skipped."""
    from pycocotools import mask as mask_util

    out = []
    for k, m in enumerate(masks):
        if not m.any():
            continue
        rle = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
        ann = {"id": first_id + len(out), "image_id": int(image_id),
               "category_id": CATEGORY["id"], "iscrowd": 0,
               "area": float(mask_util.area(rle)), "bbox": [float(v) for v in mask_util.toBbox(rle)],
               "segmentation": {"size": [int(s) for s in rle["size"]],
                                "counts": rle["counts"].decode("ascii")}}
        if scores is not None:
            ann["score"] = float(scores[k])
        out.append(ann)
    return out


def coco_instances(images: list[dict], annotations: list[dict]) -> dict:
    """A COCO instances document in CutLER's convention (one category: id 1, ``"fg"``)."""
    return {"info": {"description": "selfment-dist synthetic instances"}, "licenses": [],
            "categories": [dict(CATEGORY)], "images": images, "annotations": annotations}


def write_instance_scenes(root_uri: str, n: int, *, seed: int = 0,
                          size: tuple[int, int] = (128, 128), image_format: str = "png",
                          storage_options: dict[str, Any] | None = None) -> list[str]:
    """Write ``n`` scenes as ``<root>/images/<key>.<ext>``, their union masks as
    ``<root>/masks/<key>.png`` (0/255, for the single-object tools) and the instance ground
    truth as ``<root>/instances.json`` (COCO; ``file_name`` is ``images/<key>.<ext>``, image
    ids 1..n). Scene ``i`` is ``make_instance_scene((seed, i), size=size)``. Returns the keys.
    """
    ext = image_ext(image_format)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    fs, root = scene_root(root_uri, storage_options)
    keys = scene_keys(n)
    images, annotations = [], []
    for start in range(0, n, WRITE_CHUNK):  # bounded memory: one chunk of files at a time
        files: dict[str, bytes] = {}
        for i in range(start, min(start + WRITE_CHUNK, n)):
            image, masks = make_instance_scene((seed, i), size=size)
            h, w = image.shape[:2]
            files[f"{root}/images/{keys[i]}.{ext}"] = encode(image, IMAGE_FORMATS[ext])
            union = masks.any(0) if len(masks) else np.zeros((h, w), bool)
            files[f"{root}/masks/{keys[i]}.png"] = encode(union.astype(np.uint8) * 255, "PNG")
            images.append({"id": i + 1, "file_name": f"images/{keys[i]}.{ext}", "width": w, "height": h})
            annotations += instance_annotations(masks, i + 1, len(annotations) + 1)
        fs.pipe(files)
    fs.pipe({f"{root}/instances.json": json.dumps(coco_instances(images, annotations)).encode()})
    return keys
