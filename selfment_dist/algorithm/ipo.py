"""Iterative Patch Optimization (IPO): refine a coarse foreground mask in feature space.

As the official code (geshang777/Selfment ``train.py``) does it: an empty or full NCut mask is
returned as it is. Otherwise ``ref = mean(fg) − mean(bg)``. Up to ``n_iter`` times: stop when
either side has fewer than ``sample_size`` patches; reassign every patch to foreground when its
dot product with the foreground mean beats (strictly) the one with the background mean; when
that empties a side, return the all-foreground or all-background labels and stop; otherwise
flip the labels when the new fg−bg direction points against ``ref``.

Batched: the masked means of all images are two batched mat-vecs per iteration, and images that
stopped or reached a fixed point are frozen while the rest continue.
"""
from __future__ import annotations

import torch

from selfment_dist.algorithm._tensors import as_mask, as_unit_features, exact_math


def _side_means(x: torch.Tensor, m: torch.Tensor, total: torch.Tensor):
    """Means of the fg (``m``) and bg patches of each image.

    Args:
        x: (B, N, C) features; m: (B, N) bool; total: (B, C) ``x.sum(1)``.
    Returns:
        mu_fg, mu_bg: (B, C); n_fg, n_bg: (B,) counts (as x's dtype).
    """
    mf = m.to(x.dtype)
    n_fg = mf.sum(1)
    n_bg = m.shape[1] - n_fg
    sum_fg = torch.bmm(mf.unsqueeze(1), x).squeeze(1)
    mu_fg = sum_fg / n_fg.clamp(min=1)[:, None]
    mu_bg = (total - sum_fg) / n_bg.clamp(min=1)[:, None]
    return mu_fg, mu_bg, n_fg, n_bg


def ipo_refine(feats, mask, *, n_iter: int = 20, sample_size: int = 10) -> torch.Tensor:
    """Refine coarse masks by iterative reassignment to the nearer side mean.

    Args:
        feats: (B, h, w, C) patch features (need not be normalised), any device.
        mask: (B, h, w) bool coarse foreground (e.g. from :func:`ncut_bipartition`).
        n_iter: maximum iterations; sample_size: minimum patches on each side to continue.
    Returns:
        (B, h, w) bool refined mask on the features' device.
    """
    x4 = as_unit_features(feats)
    return _ipo_unit(x4, as_mask(mask, x4), n_iter=n_iter, sample_size=sample_size)


@exact_math
def _ipo_unit(x4: torch.Tensor, mask: torch.Tensor, *, n_iter: int, sample_size: int,
              return_converged: bool = False):
    """:func:`ipo_refine` of features already checked and normalised, mask already a bool
    tensor on their device. With ``return_converged`` also (B,) bool: the image reached a
    fixed point (not stopped by ``n_iter``, a too small side or an emptied side)."""
    m = mask.clone()
    b, h, w, c = x4.shape
    x = x4.reshape(b, h * w, c)
    m = m.reshape(b, h * w)
    total = x.sum(1)

    mu_fg, mu_bg, n_fg, n_bg = _side_means(x, m, total)
    ref = mu_fg - mu_bg
    active = torch.ones(b, dtype=torch.bool, device=x.device)
    converged = torch.zeros(b, dtype=torch.bool, device=x.device)
    for _ in range(n_iter):
        active &= (n_fg >= sample_size) & (n_bg >= sample_size)
        if not bool(active.any()):
            break
        # Same comparison as the published loop: two dot products, not their difference (in
        # one bmm, so the features are read once).
        scores = torch.bmm(x, torch.stack((mu_fg, mu_bg), -1))
        new = scores[..., 0] > scores[..., 1]
        n_new = new.sum(1)
        empties = active & ((n_new == 0) | (n_new == h * w))
        # Official: the degenerate relabelling is the result (no flip check on it).
        m = torch.where(empties[:, None], new, m)
        active &= ~empties
        new_fg, new_bg, new_nf, new_nb = _side_means(x, new, total)
        flip = ((new_fg - new_bg) * ref).sum(-1) < 0
        new = torch.where(flip[:, None], ~new, new)
        new_fg, new_bg = torch.where(flip[:, None], new_bg, new_fg), torch.where(flip[:, None], new_fg, new_bg)
        new_nf, new_nb = torch.where(flip, new_nb, new_nf), torch.where(flip, new_nf, new_nb)
        # A fixed point stays fixed: such images need no further iterations.
        changed = (new != m).any(1)
        upd = active & changed
        m = torch.where(upd[:, None], new, m)
        mu_fg = torch.where(upd[:, None], new_fg, mu_fg)
        mu_bg = torch.where(upd[:, None], new_bg, mu_bg)
        n_fg = torch.where(upd, new_nf, n_fg)
        n_bg = torch.where(upd, new_nb, n_bg)
        converged |= active & ~changed
        active &= changed
    return (m.view(b, h, w), converged) if return_converged else m.view(b, h, w)
