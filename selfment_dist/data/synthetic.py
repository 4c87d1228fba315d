"""Deterministic synthetic scenes with ground-truth masks, for the demo and the tests.

A scene is a textured background (gradient, smooth noise or stripes) with one, sometimes two,
foreground objects (ellipse, polygon, noise blob or ring) covering 5-50 % of the image, each
painted with its own colours and texture (flat, stripes, noise or checker). Camouflaged scenes
paint the objects with the background's texture kind and re-centre their colours on the
background's mean and spread, plus a small colour offset: hard, but not impossible.

Scenes without an object (``kind``) test whether a pipeline knows when there is nothing to
segment: a texture, a gradient, clutter (many small shapes, none salient) carry an empty mask; an
object that fills the frame (touching every border) carries its mask, covering most of the image.

Everything is vectorised numpy and a pure function of the seed (a ``numpy.random.Generator``),
a few milliseconds for 128x128.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from selfment_dist.data.scene_files import IMAGE_FORMATS, WRITE_CHUNK, encode, image_ext, scene_root

logger = logging.getLogger(__name__)

Seed = int | Sequence[int]

MIN_FG_FRACTION = 0.03
MAX_FG_FRACTION = 0.6
#: Scene kinds without one salient object, in the order ``write_scenes`` cycles through them.
NO_OBJECT_KINDS = ("texture", "gradient", "clutter", "fill")
SCENE_KINDS = ("object", *NO_OBJECT_KINDS)


def scene_keys(n: int) -> list[str]:
    """Keys of the first ``n`` scenes: ``scene_00000``, ``scene_00001``, ..."""
    return [f"scene_{i:05d}" for i in range(n)]


def make_scene(
    seed: Seed, *, size: tuple[int, int] = (96, 128), camouflage: bool = False,
    kind: str = "object",
) -> tuple[np.ndarray, np.ndarray]:
    """Render one scene.

    Args:
        seed: anything ``numpy.random.default_rng`` takes (an int, or a sequence of ints such as
            ``(seed, index)``, which is what ``write_scenes`` uses).
        size: (H, W) in pixels, each at least 16.
        camouflage: paint the objects with the background's colour statistics and texture kind
            (``kind="object"`` only).
        kind: ``"object"`` (one or two objects), or one of :data:`NO_OBJECT_KINDS`.

    Returns:
        image: uint8 (H, W, 3) RGB; mask: bool (H, W), True on the objects: for ``"object"``
        never empty nor full; empty for ``texture``/``gradient``/``clutter``; most of the image
        for ``fill``.
    """
    h, w = (int(s) for s in size)
    if h < 16 or w < 16:
        raise ValueError(f"scene size must be at least 16x16, got {size}")
    if kind not in SCENE_KINDS:
        raise ValueError(f"kind must be one of {SCENE_KINDS}, got {kind!r}")
    rng = np.random.default_rng(seed)
    if kind != "object":
        image, fg_any = _no_object_scene(rng, kind, (h, w))
        return _finish(rng, image, fg_any)

    # Background.
    bg_kind = rng.choice(["gradient", "noise", "stripes"])
    bg_colours = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
    image = _paint(_texture(rng, bg_kind, (h, w)), bg_colours)

    # Objects: one, sometimes two; each painted over the previous layers.
    fg_any = np.zeros((h, w), dtype=bool)
    for obj in _object_masks(rng, (h, w)):
        if camouflage:
            layer = _paint(_texture(rng, bg_kind, (h, w)), bg_colours + rng.normal(0, 12, size=(2, 3)))
            layer = _match_statistics(rng, layer, obj, image, ~(fg_any | obj))
        else:
            kind = rng.choice(["flat", "stripes", "noise", "checker"])
            bg_mean, _ = _masked_stats(image, ~obj)
            layer = _paint(_texture(rng, kind, (h, w)), _distinct_colours(rng, bg_mean))
        image = np.where(obj[..., None], layer, image)
        fg_any |= obj
    return _finish(rng, image, fg_any)


def _finish(rng: np.random.Generator, image: np.ndarray, fg_any: np.ndarray):
    """Soft illumination and sensor noise over the whole scene; uint8 image and mask."""
    h, w = fg_any.shape
    light = 1 + np.float32(rng.uniform(-0.15, 0.15)) * _texture(rng, "gradient", (h, w))
    image *= light[..., None]
    noise = rng.random(image.shape, dtype=np.float32) - np.float32(0.5)
    image += np.float32(rng.uniform(2, 10)) * noise  # uniform, std 0.6-2.9 levels
    return np.clip(image, 0, 255).round().astype(np.uint8), fg_any


def _no_object_scene(rng: np.random.Generator, kind: str, shape: tuple[int, int]):
    """float32 (H, W, 3) image and bool mask of a scene without one salient object."""
    h, w = shape
    colours = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
    empty = np.zeros(shape, dtype=bool)
    if kind == "gradient":
        return _paint(_texture(rng, "gradient", shape), colours), empty
    if kind == "texture":
        tex = rng.choice(["noise", "stripes", "checker"])
        return _paint(_texture(rng, tex, shape), colours), empty
    if kind == "clutter":  # many small shapes of many colours, none of them salient
        image = _paint(_texture(rng, rng.choice(["gradient", "noise"]), shape), colours)
        for _ in range(int(rng.integers(15, 35))):
            area = rng.uniform(0.002, 0.01) * h * w
            centre = (rng.uniform(0, h), rng.uniform(0, w))
            blob = _ellipse(rng, shape, area, centre)
            layer = _paint(_texture(rng, rng.choice(["flat", "noise"]), shape),
                           rng.uniform(0, 255, size=(2, 3)))
            image = np.where(blob[..., None], layer, image)
        return image, empty
    # fill: a close-up, the object's surface everywhere but a sliver of background
    image = _paint(_texture(rng, rng.choice(["gradient", "noise"]), shape), colours)
    r = np.sqrt(rng.uniform(1.2, 2.0) * h * w / np.pi)
    obj = _ellipse(rng, shape, np.pi * r * r, (h / 2 + rng.uniform(-0.1, 0.1) * h,
                                                w / 2 + rng.uniform(-0.1, 0.1) * w))
    bg_mean, _ = _masked_stats(image, ~obj)
    layer = _paint(_texture(rng, rng.choice(["flat", "stripes", "noise", "checker"]), shape),
                   _distinct_colours(rng, bg_mean))
    return np.where(obj[..., None], layer, image), obj


def scene_kinds(n: int, *, no_object_fraction: float = 0.0) -> list[str]:
    """Kinds of the first ``n`` scenes of :func:`write_scenes`: scene i holds no object when
    floor((i+1)f) > floor(i f) (f = ``no_object_fraction``, spread evenly), cycling through
    :data:`NO_OBJECT_KINDS`."""
    kinds, k = [], 0
    for i in range(n):
        if _is_camouflaged(i, no_object_fraction):
            kinds.append(NO_OBJECT_KINDS[k % len(NO_OBJECT_KINDS)])
            k += 1
        else:
            kinds.append("object")
    return kinds


def write_scenes(
    root_uri: str,
    n: int,
    *,
    seed: int = 0,
    size: tuple[int, int] = (96, 128),
    image_format: str = "jpg",
    camouflage_fraction: float = 0.25,
    no_object_fraction: float = 0.0,
    storage_options: dict[str, Any] | None = None,
) -> list[str]:
    """Write ``n`` scenes as ``<root>/images/<key>.<image_format>`` and ``<root>/masks/<key>.png``.

    Scene ``i`` is ``make_scene((seed, i), size=size, camouflage=..., kind=...)``; the camouflaged
    ones are spread evenly (scene i is camouflaged when floor((i+1)f) > floor(i f),
    f = camouflage_fraction), so scene i does not depend on ``n``; so are the scenes without an
    object (``no_object_fraction``, kinds from :func:`scene_kinds`; they take precedence over
    camouflage). Masks are 8-bit L PNGs with values 0/255. ``root_uri`` is a local path or fsspec
    URL. Returns ``scene_keys(n)``.
    """
    ext = image_ext(image_format)
    if not 0.0 <= camouflage_fraction <= 1.0:
        raise ValueError(f"camouflage_fraction must be in [0, 1], got {camouflage_fraction}")
    if not 0.0 <= no_object_fraction <= 1.0:
        raise ValueError(f"no_object_fraction must be in [0, 1], got {no_object_fraction}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    fs, root = scene_root(root_uri, storage_options)

    keys = scene_keys(n)
    kinds = scene_kinds(n, no_object_fraction=no_object_fraction)
    for start in range(0, n, WRITE_CHUNK):
        files: dict[str, bytes] = {}
        for i in range(start, min(start + WRITE_CHUNK, n)):
            image, mask = make_scene((seed, i), size=size, kind=kinds[i],
                                     camouflage=_is_camouflaged(i, camouflage_fraction))
            files[f"{root}/images/{keys[i]}.{ext}"] = encode(image, IMAGE_FORMATS[ext])
            files[f"{root}/masks/{keys[i]}.png"] = encode(mask.astype(np.uint8) * 255, "PNG")
        fs.pipe(files)
    logger.info("wrote %d synthetic scenes to %s", n, root_uri)
    return keys


def _is_camouflaged(i: int, fraction: float) -> bool:
    return int(np.floor((i + 1) * fraction)) > int(np.floor(i * fraction))


# ---------------------------------------------------------------------------------------------
# Textures: fields t in [0, 1] of shape (H, W), painted as c0 + t (c1 - c0).


@functools.lru_cache(maxsize=8)
def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy.flags.writeable = False
    xx.flags.writeable = False
    return yy, xx


def _rotated(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Pixel coordinate along a random direction."""
    yy, xx = _grid(*shape)
    theta = rng.uniform(0, np.pi)
    return xx * np.cos(theta) + yy * np.sin(theta)


def _texture(rng: np.random.Generator, kind: str, shape: tuple[int, int]) -> np.ndarray:
    h, w = shape
    if kind == "flat":
        return np.full(shape, rng.uniform(0, 1), dtype=np.float32)
    if kind == "gradient":
        u = _rotated(rng, shape)
        return (u - u.min()) / max(float(u.max() - u.min()), 1e-6)
    if kind == "noise":
        return _smooth_noise(rng, shape, cells=int(rng.integers(3, 12)))
    if kind == "stripes":
        period = rng.uniform(4, 0.25 * min(h, w))
        wave = 0.5 + 0.5 * np.sin(2 * np.pi * _rotated(rng, shape) / period + rng.uniform(0, 2 * np.pi))
        sharp = rng.uniform(1, 6)  # 1: sine, large: square wave
        return 0.5 + 0.5 * np.tanh(sharp * (wave - 0.5)) / np.tanh(0.5 * sharp)
    if kind == "checker":
        cell = rng.uniform(3, 0.2 * min(h, w))
        theta = rng.uniform(0, np.pi / 2)
        yy, xx = _grid(h, w)
        u = (xx * np.cos(theta) + yy * np.sin(theta)) / cell
        v = (-xx * np.sin(theta) + yy * np.cos(theta)) / cell
        return ((np.floor(u) + np.floor(v)) % 2).astype(np.float32)
    raise ValueError(f"unknown texture kind {kind!r}")


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Value noise: a random (cells x cells') grid bilinearly upsampled to ``shape``, in [0, 1]."""
    h, w = shape
    gh, gw = cells, max(2, round(cells * w / h))
    grid = rng.uniform(0, 1, size=(gh + 1, gw + 1)).astype(np.float32)
    ys = np.linspace(0, gh, h, dtype=np.float32)
    xs = np.linspace(0, gw, w, dtype=np.float32)
    y0 = np.minimum(ys.astype(int), gh - 1)
    x0 = np.minimum(xs.astype(int), gw - 1)
    fy = (ys - y0)[:, None]
    fx = (xs - x0)[None, :]
    # Smoothstep weights hide the grid.
    fy, fx = fy * fy * (3 - 2 * fy), fx * fx * (3 - 2 * fx)
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
    bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    t = top * (1 - fy) + bottom * fy
    return (t - t.min()) / max(float(t.max() - t.min()), 1e-6)


def _paint(t: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """Field t in [0, 1] of any shape (...) and (2, 3) colours -> float32 (..., 3) pixels."""
    c0, c1 = colours.astype(np.float32)
    return c0 + t[..., None] * (c1 - c0)


def _distinct_colours(rng: np.random.Generator, bg_mean: np.ndarray) -> np.ndarray:
    """Two colours around a base colour at least ~90 RGB units away from ``bg_mean``."""
    candidates = rng.uniform(0, 255, size=(16, 3))
    dist = np.linalg.norm(candidates - bg_mean, axis=1)
    far = np.flatnonzero(dist > 90)
    base = candidates[far[0] if far.size else int(np.argmax(dist))]
    spread = rng.normal(0, 25, size=3)
    return np.clip(np.stack([base - spread, base + spread]), 0, 255)


def _masked_stats(image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of float32 (H, W, 3) ``image`` over bool (H, W) ``mask``.

    Matrix products, not boolean indexing: several times faster on small images.
    """
    flat = image.reshape(-1, 3)
    weight = mask.reshape(-1).astype(np.float32)
    count = max(float(weight.sum()), 1.0)
    mean = weight @ flat / count
    var = weight @ (flat * flat) / count - mean * mean
    return mean, np.sqrt(np.maximum(var, 0))


def _match_statistics(
    rng: np.random.Generator, layer: np.ndarray, obj: np.ndarray, image: np.ndarray, ref: np.ndarray
) -> np.ndarray:
    """Re-centre ``layer`` so that on ``obj`` it has the per-channel mean/std of ``image`` on ``ref``,
    plus a subtle colour offset."""
    if not ref.any():
        return layer
    src_mean, src_std = _masked_stats(layer, obj)
    ref_mean, ref_std = _masked_stats(image, ref)
    scale = np.minimum(ref_std / np.maximum(src_std, 1e-3) * rng.uniform(0.8, 1.2), 3.0)
    offset = rng.normal(0, 1, size=3)
    offset *= rng.uniform(6, 16) / np.linalg.norm(offset)  # a small colour shift, 6-16 RGB units
    return (layer - src_mean) * scale.astype(np.float32) + (ref_mean + offset).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Shapes: boolean masks with a target area, placed mostly inside the image.


def _object_masks(rng: np.random.Generator, shape: tuple[int, int]) -> list[np.ndarray]:
    """One or two object masks whose union covers MIN..MAX_FG_FRACTION of the image."""
    h, w = shape
    for _ in range(20):
        frac = float(np.exp(rng.uniform(np.log(0.05), np.log(0.5))))
        n_obj = 2 if rng.uniform() < 0.3 and frac > 0.1 else 1
        parts = [frac] if n_obj == 1 else [frac * (p := rng.uniform(0.5, 0.8)), frac * (1 - p)]
        masks, centres = [], []
        for part in parts:
            centre = _place(rng, shape, part, centres)
            masks.append(_shape_mask(rng, shape, part * h * w, centre))
            centres.append(centre)
        union = np.logical_or.reduce(masks)
        if MIN_FG_FRACTION <= union.mean() <= MAX_FG_FRACTION:
            return [m for m in masks if m.any()]
    # Practically unreachable; keeps the "never empty, never full" promise.
    return [_ellipse(rng, shape, 0.2 * h * w, (h / 2, w / 2))]


def _place(rng, shape, frac, others) -> tuple[float, float]:
    """A centre that keeps an object of area fraction ``frac`` mostly inside, far from ``others``."""
    h, w = shape
    r = np.sqrt(frac * h * w / np.pi)
    margin_y, margin_x = min(0.7 * r, h / 2), min(0.7 * r, w / 2)
    cands = np.stack([rng.uniform(margin_y, h - margin_y, 8), rng.uniform(margin_x, w - margin_x, 8)], 1)
    if not others:
        return tuple(cands[0])
    dist = np.min(np.linalg.norm(cands[:, None, :] - np.asarray(others)[None], axis=-1), axis=1)
    return tuple(cands[int(np.argmax(dist))])


def _shape_mask(rng, shape, area, centre) -> np.ndarray:
    kind = rng.choice(["ellipse", "polygon", "blob", "ring"], p=[0.3, 0.3, 0.25, 0.15])
    return {"ellipse": _ellipse, "polygon": _polygon, "blob": _blob, "ring": _ring}[kind](rng, shape, area, centre)


def _local_coords(rng, shape, centre, aspect):
    """Coordinates in the object's rotated frame, the y axis scaled by ``aspect``."""
    yy, xx = _grid(*shape)
    theta = rng.uniform(0, np.pi)
    dy, dx = yy - centre[0], xx - centre[1]
    u = dx * np.cos(theta) + dy * np.sin(theta)
    v = -dx * np.sin(theta) + dy * np.cos(theta)
    return u, v * aspect


def _ellipse(rng, shape, area, centre) -> np.ndarray:
    aspect = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
    r = np.sqrt(area / np.pi)  # semi-axes r*sqrt(aspect), r/sqrt(aspect)
    u, v = _local_coords(rng, shape, centre, aspect)
    return u * u / aspect + v * v / aspect <= r * r


def _ring(rng, shape, area, centre) -> np.ndarray:
    aspect = float(np.exp(rng.uniform(np.log(0.6), np.log(1.6))))
    q = rng.uniform(0.35, 0.65)  # inner / outer radius
    r_out = np.sqrt(area / (np.pi * (1 - q * q)))
    u, v = _local_coords(rng, shape, centre, aspect)
    d2 = (u * u + v * v) / aspect
    return (d2 <= r_out * r_out) & (d2 > (q * r_out) ** 2)


def _polygon(rng, shape, area, centre) -> np.ndarray:
    """A star-shaped polygon with 3-9 vertices, scaled to ``area``."""
    h, w = shape
    k = int(rng.integers(3, 10))
    angles = (np.arange(k) + rng.uniform(-0.35, 0.35, k)) * (2 * np.pi / k) + rng.uniform(0, 2 * np.pi)
    radii = rng.uniform(0.5, 1.0, k)
    x, y = radii * np.cos(angles), radii * np.sin(angles)
    poly_area = 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))
    s = np.sqrt(area / max(poly_area, 1e-6))
    pts = list(zip((centre[1] + s * x).tolist(), (centre[0] + s * y).tolist()))
    canvas = Image.new("1", (w, h), 0)
    ImageDraw.Draw(canvas).polygon(pts, fill=1)
    return np.asarray(canvas, dtype=bool)


def _blob(rng, shape, area, centre) -> np.ndarray:
    """Smoothed noise plus a radial falloff, thresholded to ``area``; the component at its peak."""
    h, w = shape
    yy, xx = _grid(h, w)
    r = np.sqrt(area / np.pi)
    falloff = 1 - np.hypot(yy - centre[0], xx - centre[1]) / (2.5 * r)
    field = falloff + 0.5 * _smooth_noise(rng, shape, cells=int(rng.integers(3, 7)))
    k = int(np.clip(area, 1, h * w - 1))
    threshold = np.partition(field.ravel(), h * w - k)[h * w - k]
    blob = field >= threshold
    labels, _ = ndimage.label(blob)
    return labels == labels.flat[int(np.argmax(field))]


# Patch features (no image): for algorithm tests and benchmarks.


def make_patch_features(rng: np.random.Generator, h: int, w: int, c: int, *, noise: float = 0.5,
                        with_object: bool = True, return_mask: bool = False):
    """(h, w, c) float32 unnormalised patch features shaped like DINO's on an object-centric
    image: an object (an ellipse whose patches share a direction, drifting towards a second
    "part" direction) on a background drifting smoothly between three directions, plus noise.
    For algorithm tests and benchmarks, where real features are not at hand.

    ``with_object=False`` leaves the background alone (a scene without an object; the same
    random draws are made, so the rest of the stream does not shift). ``return_mask`` also
    returns the bool (h, w) object mask (empty without an object)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
    ry, rx = rng.uniform(0.15, 0.35) * max(h, 2), rng.uniform(0.15, 0.35) * max(w, 2)
    theta = rng.uniform(0, np.pi)
    dy, dx = yy - cy, xx - cx
    u = dy * np.cos(theta) + dx * np.sin(theta)
    v = -dy * np.sin(theta) + dx * np.cos(theta)
    fg = ((u / ry) ** 2 + (v / rx) ** 2 < 1) & with_object
    fg_dir = rng.normal(size=c)
    part_dir = fg_dir + 0.6 * rng.normal(size=c)
    bg_dirs = rng.normal(size=(3, c))
    # Background: a smooth blend of three directions across the image (scene layout).
    wy, wx = yy / max(h - 1, 1), xx / max(w - 1, 1)
    weights = np.stack([1 - wy, wy * (1 - wx), wy * wx], -1) + 0.2
    bg = weights @ bg_dirs
    # Object: one direction, its lower half drifting towards a second part direction.
    part = np.clip((u / ry + 1) / 2, 0, 1)[..., None]
    obj = (1 - 0.5 * part) * fg_dir + 0.5 * part * part_dir
    feats = np.where(fg[..., None], obj, bg) * 1.0 + noise * rng.normal(size=(h, w, c))
    return (feats.astype(np.float32), fg) if return_mask else feats.astype(np.float32)


def make_patch_feature_batch(rng: np.random.Generator, b: int, h: int, w: int, c: int, **kwargs) -> np.ndarray:
    """(b, h, w, c) float32: :func:`make_patch_features` for ``b`` images."""
    return np.stack([make_patch_features(rng, h, w, c, **kwargs) for _ in range(b)])
