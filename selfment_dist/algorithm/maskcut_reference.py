"""MaskCut as published: one image at a time, a dense scipy ``eigh`` per round, numpy loops.

Restates CutLER's ``maskcut/maskcut.py`` (``maskcut_forward``) step by step, at grid level:

1. Zero the features of every patch an earlier accepted round took (the "painting"); a zero
   feature has affinity 0 < tau with everything, so its edges all weigh ``eps``.
2. Binary affinity ``A = (F Fᵀ > tau) ? 1 : eps`` of the L2-normalised features; second smallest
   generalised eigenvector of ``(D − A) v = λ D v``; bipartition ``v > mean(v)``.
3. Reverse when 3 or 4 grid corners are foreground, else when the max-|v| patch is background;
   the seed is ``argmax(v)``, or ``argmax(−v)`` after a reverse; keep the seed's 4-connected
   component (``scipy.ndimage.label``'s default structure, as TokenCut's ``detect_box``).
4. From round 2 on, the mask becomes all zeros when its IoU with the previous round's mask (after
   that round's own rejection) exceeds 0.5 or it covers ≤ 1 % of the grid. A rejected round adds
   nothing to the painting, so the next round solves the same graph again (and, compared with an
   all-zero previous mask, is accepted unless small: MaskCut's quirk, kept).
5. Each object drops the patches of earlier objects (the official subtracts them at image size).

One deliberate choice: the sign of an eigenvector is arbitrary, and step 3 is *not* sign
invariant when the side holding ≥ 3 corners also holds the max-|v| patch (one orientation picks
the corner-free side, the other the peak's side), so the official result there depends on what
LAPACK returns. ``canonical_sign=True`` (default) first turns ``v`` so that its max-|v| entry is
positive; then the corner rule always wins that conflict, as the object-centric prior intends.
``canonical_sign=False`` keeps scipy's sign (CutLER literally).

The ≤ 1 % test is done in integers (``100·area ≤ h·w``) rather than CutLER's float
``area / h / w <= 0.01``, which rounds either way at exactly 1 %.

This is the yardstick for :func:`selfment_dist.multi_object_masks` (tests and benchmarks), not
for real work.
"""
from __future__ import annotations

import numpy as np
import scipy.linalg
import scipy.ndimage

from selfment_dist.algorithm.reference import _unit


def reference_fiedler(x: np.ndarray, *, tau: float = 0.2, eps: float = 1e-5,
                      binary_graph: bool = True) -> np.ndarray:
    """Second smallest generalised eigenvector of one graph; x: (N, C) unit (or zero) rows."""
    a = x @ x.T
    a = np.where(a > tau, 1.0, eps) if binary_graph else np.where(a >= tau, a, eps)
    d = np.diag(a.sum(1))
    _, vecs = scipy.linalg.eigh(d - a, d, subset_by_index=[1, 2])
    return vecs[:, 0]


def reference_maskcut_cut(v: np.ndarray, grid: tuple[int, int], *,
                          canonical_sign: bool = True) -> tuple[np.ndarray, float]:
    """Steps 2-3 of one round from its eigenvector ``v`` (N,).

    Returns:
        the seed's component, bool (h, w); and the round's decision margin: the smaller of the
        nearest patch's distance to the mean and the seed's lead over the best patch outside
        its component, both relative to max |v| (near 0: another solver's rounding may decide
        differently, e.g. between two objects tied in ``v``).
    """
    h, w = grid
    if canonical_sign and v[np.argmax(np.abs(v))] < 0:
        v = -v
    scale = max(float(np.abs(v).max()), 1e-300)
    margin = float(np.abs(v - v.sum() / len(v)).min()) / scale
    bip = v > v.sum() / len(v)
    grid_bip = bip.reshape(h, w)
    corners = int(grid_bip[0, 0]) + int(grid_bip[0, -1]) + int(grid_bip[-1, 0]) + int(grid_bip[-1, -1])
    reverse = True if corners >= 3 else not bip[int(np.argmax(np.abs(v)))]
    if reverse:
        bip, seed = ~bip, int(np.argmax(-v))
    else:
        seed = int(np.argmax(v))
    labels, _ = scipy.ndimage.label(bip.reshape(h, w))  # 4-connectivity
    if labels.flat[seed] == 0:  # only for a constant v; the official would take the background
        return np.zeros((h, w), dtype=bool), 0.0
    comp = labels == labels.flat[seed]
    signed = -v if reverse else v
    rest = signed[~comp.reshape(-1)]
    if rest.size:
        margin = min(margin, float(signed[seed] - rest.max()) / scale)
    return comp, margin


def reference_maskcut(feats: np.ndarray, *, max_objects: int = 3, tau: float = 0.2,
                      eps: float = 1e-5, binary_graph: bool = True,
                      canonical_sign: bool = True, return_margin: bool = False):
    """MaskCut of one image. feats: (h, w, C) → bool (max_objects, h, w), absent objects empty.

    With ``return_margin`` also the smallest decision margin of its rounds (see
    :func:`reference_maskcut_cut`): where it is tiny the result hangs on rounding.
    """
    h, w, c = feats.shape
    x = _unit(feats).reshape(h * w, c)
    painted = np.zeros(h * w, dtype=bool)
    previous = np.zeros(h * w, dtype=bool)
    taken = np.zeros(h * w, dtype=bool)
    out = np.zeros((max_objects, h * w), dtype=bool)
    margin = np.inf
    for i in range(max_objects):
        if h * w == 1:
            break
        v = reference_fiedler(np.where(painted[:, None], 0.0, x), tau=tau, eps=eps,
                              binary_graph=binary_graph)
        mask, round_margin = reference_maskcut_cut(v, (h, w), canonical_sign=canonical_sign)
        mask, margin = mask.reshape(-1), min(margin, round_margin)
        if i >= 1:
            union = int((previous | mask).sum())
            iou = (previous & mask).sum() / union if union else float("nan")
            if iou > 0.5 or 100 * int(mask.sum()) <= h * w:
                mask = np.zeros_like(mask)
        previous = mask
        painted |= mask
        out[i] = mask & ~taken
        taken |= out[i]
    out = out.reshape(max_objects, h, w)
    return (out, margin) if return_margin else out
