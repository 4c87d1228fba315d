"""Pictures of masks: image + mask overlays tiled into contact sheets, and a confidence histogram.

No Ray, no storage: arrays in, PNG bytes out (``selfment inspect`` and the demo write them).
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["Tile", "overlay", "overlay_objects", "contact_sheet", "confidence_histogram",
           "OBJECT_COLOURS"]

_TINT = np.array([255, 40, 40], dtype=np.float32)  # mask colour
#: One colour per object, in round order (Paul Tol's "bright" scheme: distinct for colour-blind
#: readers too), cycled beyond its length.
OBJECT_COLOURS = np.array([[238, 102, 119], [68, 119, 170], [34, 136, 51], [204, 187, 68],
                           [102, 204, 238], [170, 51, 119], [187, 187, 187]], dtype=np.float32)
_CAPTION_H = 30
_PAD = 4


@dataclass
class Tile:
    """One image of a sheet: ``image`` uint8 (H, W, 3); ``mask`` bool or float in [0, 1] (h, w)
    of any size (stretched over the image), None for an image that could not be read;
    ``caption`` up to two short lines; ``flag`` draws the caption in red (e.g. no object);
    ``objects`` bool (K, h, w), when given, is drawn instead of ``mask``, one colour each."""

    image: np.ndarray | None
    mask: np.ndarray | None
    caption: str
    flag: bool = False
    objects: np.ndarray | None = None


def overlay(image: np.ndarray, mask: np.ndarray, *, size: int) -> np.ndarray:
    """uint8 (size, size, 3): ``image`` squashed to a square (as the backbone sees it) with
    ``mask`` tinted over it and its outline drawn.

    Args:
        image: uint8 (H, W, 3); mask: (h, w) bool (a patch-grid mask) or float saliency in [0, 1].
    """
    base = np.asarray(Image.fromarray(image).convert("RGB").resize((size, size),
                                                                   Image.Resampling.BILINEAR),
                      dtype=np.float32)
    m = np.asarray(mask, dtype=np.float32)
    resample = Image.Resampling.NEAREST if mask.dtype == bool else Image.Resampling.BILINEAR
    m = np.asarray(Image.fromarray(m, mode="F").resize((size, size), resample)).clip(0, 1)
    out = base * (1 - 0.5 * m[..., None]) + _TINT * (0.5 * m[..., None])
    # Outline: mask pixels with a background 4-neighbour, the outside of the image counting as
    # background (a mask covering the whole image gets a frame).
    hard = m >= 0.5
    p = np.pad(hard, 1)
    edge = hard & ~(p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:])
    out[edge] = _TINT
    return out.round().astype(np.uint8)


def overlay_objects(image: np.ndarray, objects: np.ndarray, *, size: int) -> np.ndarray:
    """uint8 (size, size, 3): ``image`` squashed to a square with each of the bool (K, h, w)
    grid masks ``objects`` tinted and outlined in its own colour (:data:`OBJECT_COLOURS`)."""
    out = np.asarray(Image.fromarray(image).convert("RGB").resize((size, size),
                                                                  Image.Resampling.BILINEAR),
                     dtype=np.float32)
    objects = np.asarray(objects, dtype=bool).reshape(-1, *np.shape(objects)[-2:])
    if len(objects):
        h, w = objects.shape[1:]
        # Nearest-neighbour stretch of every mask at once (the grid cells stay square-edged).
        rows = np.minimum(np.arange(size) * h // size, h - 1)
        cols = np.minimum(np.arange(size) * w // size, w - 1)
        big = objects[:, rows[:, None], cols[None, :]]
        p = np.pad(big, ((0, 0), (1, 1), (1, 1)))
        edges = big & ~(p[:, :-2, 1:-1] & p[:, 2:, 1:-1] & p[:, 1:-1, :-2] & p[:, 1:-1, 2:])
        for k in range(len(big)):  # a few objects: one pass each, later rounds on top
            colour = OBJECT_COLOURS[k % len(OBJECT_COLOURS)]
            out[big[k]] = 0.5 * out[big[k]] + 0.5 * colour
            out[edges[k]] = colour
    return out.round().astype(np.uint8)


def _font(size: int = 11):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one fixed bitmap size
        return ImageFont.load_default()


def contact_sheet(tiles: list[Tile], *, title: str, size: int = 128, cols: int = 8) -> bytes:
    """PNG bytes of ``tiles`` in a grid of ``cols`` columns under a one-line ``title``."""
    cols = max(1, min(cols, len(tiles) or 1))
    rows = max(1, -(-len(tiles) // cols))
    cell_w, cell_h = size + _PAD, size + _CAPTION_H + _PAD
    width = cols * cell_w + _PAD
    big = _font(14)
    lines = _wrap(title, width - 2 * _PAD, big)
    top = 6 + 18 * len(lines)
    sheet = Image.new("RGB", (width, top + rows * cell_h + _PAD), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for j, line in enumerate(lines):
        draw.text((_PAD, 4 + 18 * j), line, fill=(0, 0, 0), font=big)
    small = _font(11)
    for i, tile in enumerate(tiles):
        x = _PAD + (i % cols) * cell_w
        y = top + (i // cols) * cell_h
        if tile.image is not None and tile.objects is not None:
            sheet.paste(Image.fromarray(overlay_objects(tile.image, tile.objects, size=size)),
                        (x, y))
        elif tile.image is not None and tile.mask is not None:
            sheet.paste(Image.fromarray(overlay(tile.image, tile.mask, size=size)), (x, y))
        else:
            draw.rectangle((x, y, x + size - 1, y + size - 1), fill=(200, 200, 200))
            draw.text((x + 6, y + size // 2 - 6), "image not readable", fill=(90, 0, 0),
                      font=small)
        colour = (200, 0, 0) if tile.flag else (30, 30, 30)
        for j, line in enumerate(tile.caption.splitlines()[:2]):
            draw.text((x, y + size + 2 + 13 * j), _fit(line, size, small), fill=colour,
                      font=small)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _wrap(text: str, width: int, font) -> list[str]:
    """``text`` broken at spaces into lines of at most ``width`` pixels (a sheet narrower than
    its title must not cut it)."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(lines[-1] + " " + word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines or [""]


def _fit(text: str, width: int, font) -> str:
    """``text`` cut (with a middle ellipsis) to fit ``width`` pixels."""
    if font.getlength(text) <= width:
        return text

    def cut(keep: int) -> str:
        return text[:keep // 2] + "…" + text[len(text) - (keep - keep // 2):]

    keep = len(text)
    while keep > 4 and font.getlength(cut(keep)) > width:
        keep -= 1
    return cut(keep)


def confidence_histogram(confidence: np.ndarray, *, threshold: float | None, title: str) -> bytes:
    """PNG bytes: histogram of ``confidence`` (in [0, 1]) with the no-object ``threshold``."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.2), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    ax.hist(np.asarray(confidence, dtype=float), bins=np.linspace(0, 1, 41), color="#4477aa")
    if threshold is not None:
        ax.axvline(threshold, color="#cc3311", linestyle="--",
                   label=f"no-object threshold {threshold:g}")
        ax.legend(loc="upper center", fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("images")
    ax.set_title(title, fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
