"""Multi-object pseudo-labels for the pipeline: MaskCut's objects plus a confidence, a grid
bounding box and optional refinements beyond MaskCut (all off by default).

* ``ipo=True`` — IPO per object: each object is refined by Selfment's IPO rule (reassign each
  patch to the nearer of the object's mean and the mean of the rest, flip when the direction
  turns, up to ``n_iter`` times, stop when a side has fewer than ``sample_size`` patches) but
  only among the patches no *other* object holds, so objects cannot swallow each other. An
  update that would empty a side is discarded (the previous mask kept): for one object among
  several, the official "all foreground" outcome would be a whole-image object. Where two
  refined objects claim the same free patch the earlier object keeps it (as MaskCut's step 5).
* confidence (always computed): the single-object model of
  :mod:`selfment_dist.algorithm.quality` applied to each object, from the signals of the round
  it came from (Fiedler value, spectral gap, NCut value of that round's cut) and of the object
  (its share of the grid and of the border ring, the share of patches IPO per object moves,
  whether IPO converged; IPO's signals are measured even when ``ipo`` is off). Absent objects
  get 0. The model was fitted on single-object scenes; ``benchmarks/maskcut.py`` measures how
  well it ranks objects (instance AP).
* ``min_object_confidence`` — adaptive count: objects below it are dropped (mask emptied,
  ``present`` False). The rounds are still run (the painting of later rounds is MaskCut's).
"""
from __future__ import annotations

import torch

from selfment_dist.algorithm._tensors import as_unit_features, exact_math
from selfment_dist.algorithm.maskcut import CUT_INFO, maskcut_rounds
from selfment_dist.algorithm.quality import confidence, quality_signals

__all__ = ["multi_object_labels", "grid_boxes"]


def multi_object_labels(feats, *, max_objects: int = 3, tau: float = 0.2, eps: float = 1e-5,
                        binary_graph: bool = True, ipo: bool = False, n_iter: int = 20,
                        sample_size: int = 10, min_object_confidence: float | None = None) -> dict:
    """MaskCut objects of each image with a confidence and a box each (see module docstring).

    Args:
        feats: (B, h, w, C) patch features (any float dtype/device, need not be normalised).
        max_objects, tau, eps, binary_graph: as :func:`selfment_dist.multi_object_masks`.
        ipo: refine each object by IPO among the patches no other object holds.
        n_iter, sample_size: IPO's limits (Selfment's defaults).
        min_object_confidence: drop objects whose confidence is below it (None: keep all).
    Returns:
        dict of tensors on the features' device: ``mask`` (B, N, h, w) bool; ``present``
        (B, N) bool (mask not empty); ``confidence`` (B, N) float32 in [0, 1] (0 when absent);
        ``bbox`` (B, N, 4) int64 grid box ``x0, y0, x1, y1`` with ``x1``/``y1`` exclusive (all 0
        when absent); and the per-object signals (B, N) float32: ``fiedler_value``,
        ``spectral_gap``, ``ncut_value``, ``fg_fraction``, ``border_fraction``, ``ipo_change``,
        ``ipo_converged``. With ``ipo`` False, ``mask`` equals :func:`multi_object_masks`'s
        (minus dropped objects).
    """
    if min_object_confidence is not None and not 0.0 <= min_object_confidence <= 1.0:
        raise ValueError(f"min_object_confidence must be in [0, 1], got {min_object_confidence}")
    x = as_unit_features(feats)
    objects, cut_info = maskcut_rounds(x, max_objects=max_objects, tau=tau, eps=eps,
                                       binary_graph=binary_graph)
    refined, converged = ipo_per_object(x, objects, n_iter=n_iter, sample_size=sample_size)
    b, n, h, w = objects.shape
    signals = quality_signals(refined.reshape(b * n, h, w), objects.reshape(b * n, h, w),
                              {k: cut_info[k].reshape(-1) for k in CUT_INFO},
                              converged.reshape(-1))
    mask = refined if ipo else objects
    if ipo:  # the signals describe the mask we keep
        signals["fg_fraction"] = mask.reshape(b * n, -1).float().mean(-1)
    else:
        signals.update(_area_signals(mask.reshape(b * n, h, w)))
    conf = confidence(signals).view(b, n)
    present = mask.flatten(2).any(-1)
    if min_object_confidence is not None:
        present &= conf >= min_object_confidence
        mask = mask & present[:, :, None, None]
    out = {k: v.view(b, n) for k, v in signals.items()}
    out.update(mask=mask, present=present, confidence=torch.where(present, conf, 0.0),
               bbox=grid_boxes(mask))
    return out


def _area_signals(mask: torch.Tensor) -> dict:
    """fg_fraction and border_fraction of (M, h, w) masks (as quality_signals computes them)."""
    zeros = torch.zeros(mask.shape[0], device=mask.device)
    sig = quality_signals(mask, mask, {k: zeros for k in CUT_INFO}, zeros)
    return {k: sig[k] for k in ("fg_fraction", "border_fraction")}


def grid_boxes(mask: torch.Tensor) -> torch.Tensor:
    """(..., h, w) bool → (..., 4) int64 boxes ``x0, y0, x1, y1`` (x1, y1 exclusive); 0s if empty."""
    h, w = mask.shape[-2:]
    cols, rows = mask.any(-2), mask.any(-1)
    x0 = cols.int().argmax(-1)
    x1 = w - cols.flip(-1).int().argmax(-1)
    y0 = rows.int().argmax(-1)
    y1 = h - rows.flip(-1).int().argmax(-1)
    box = torch.stack([x0, y0, x1, y1], -1).long()
    return box * cols.any(-1, keepdim=True)


@exact_math
def ipo_per_object(x: torch.Tensor, objects: torch.Tensor, *, n_iter: int = 20,
                   sample_size: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """IPO of every object of every image at once, each among the patches no other object holds.

    Args:
        x: (B, h, w, C) unit features; objects: (B, N, h, w) bool, disjoint.
    Returns:
        refined: (B, N, h, w) bool, disjoint (earlier objects win a shared patch); converged:
        (B, N) bool, the object reached a fixed point.
    """
    b, n, h, w = objects.shape
    feats = x.reshape(b, h * w, -1)
    m = objects.reshape(b, n, h * w)
    valid = ~(m.any(1, keepdim=True) & ~m)  # the object's own patches and the free ones
    valid_f = valid.to(feats.dtype)
    n_valid = valid_f.sum(-1)

    def means(mask):
        mf = mask.to(feats.dtype)
        n_fg = mf.sum(-1)
        sum_fg = mf @ feats
        sum_bg = valid_f @ feats - sum_fg
        n_bg = n_valid - n_fg
        return sum_fg / n_fg.clamp(min=1)[..., None], sum_bg / n_bg.clamp(min=1)[..., None], n_fg, n_bg

    mu_fg, mu_bg, n_fg, n_bg = means(m)
    ref = mu_fg - mu_bg
    active = m.any(-1) & (n_bg > 0)  # an empty object, or one holding every free patch, stays
    converged = torch.zeros_like(active)
    for _ in range(n_iter):
        active &= (n_fg >= sample_size) & (n_bg >= sample_size)
        if not bool(active.any()):
            break
        # (B, N, h*w): each patch's dot product with each object's two means.
        new = (mu_fg @ feats.transpose(1, 2) > mu_bg @ feats.transpose(1, 2)) & valid
        new_fg, new_bg, new_nf, new_nb = means(new)
        empties = (new_nf == 0) | (new_nb == 0)
        flip = ((new_fg - new_bg) * ref).sum(-1) < 0
        new = torch.where(flip[..., None], valid & ~new, new)
        if bool(flip.any()):
            new_fg, new_bg, new_nf, new_nb = means(new)
        upd = active & ~empties & (new != m).any(-1)
        converged |= active & ~empties & ~upd
        active &= upd
        m = torch.where(upd[..., None], new, m)
        mu_fg = torch.where(upd[..., None], new_fg, mu_fg)
        mu_bg = torch.where(upd[..., None], new_bg, mu_bg)
        n_fg, n_bg = torch.where(upd, new_nf, n_fg), torch.where(upd, new_nb, n_bg)
    # Earlier objects keep a patch two refined objects claim.
    earlier = (m.int().cumsum(1) - m.int()) > 0
    m = m & ~earlier
    return m.view(b, n, h, w), converged
