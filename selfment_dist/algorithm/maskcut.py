"""Several objects per image: MaskCut (CutLER, ``maskcut/maskcut.py``), batched.

Up to ``max_objects`` rounds on each image's patch graph (the published semantics; the step by
step restatement is :mod:`selfment_dist.algorithm.maskcut_reference`):

1. zero the features of the patches earlier accepted rounds took (MaskCut's "painting");
2. NCut as :mod:`selfment_dist.algorithm.ncut` builds it (binary affinity on unit features,
   second smallest generalised eigenvector, split at its mean);
3. reverse when ≥ 3 grid corners are foreground, else when the max-|v| patch is background; seed
   at ``argmax(v)`` (``argmax(−v)`` after a reverse); keep the seed's 4-connected component;
4. from round 2 on, reject (all zeros) a mask with IoU > 0.5 against the previous round's mask
   or covering ≤ 1 % of the grid; a rejected round leaves the painting as it was;
5. each object drops the patches of earlier objects.

Batching: every round solves all images at once with the block-Krylov solver of
:func:`selfment_dist.algorithm.ncut.fiedler_vectors`, and the connected components of the whole
batch come from :func:`selfment_dist.algorithm.ncut.seed_component`. Rounds are sequential by
nature (each paints for the next), but an image whose painting did not change since its last
solve (its round was rejected, or added only painted patches) would solve the very same graph
again: it reuses its last cut instead, so a round only solves the images that need it.

The eigenvector's sign is arbitrary and step 3 depends on it when the side holding ≥ 3 corners
also holds the max-|v| patch; like the reference (``canonical_sign=True``) we first turn ``v`` so
its max-|v| entry is positive, which lets the corner rule win that conflict.
"""
from __future__ import annotations

import torch

from selfment_dist.algorithm._tensors import as_unit_features, exact_math
from selfment_dist.algorithm.ncut import MAX_AFFINITY_ELEMENTS, fiedler_vectors, seed_component

__all__ = ["multi_object_masks", "maskcut_split", "CUT_INFO"]

#: Per-round quality of the cut, from the solver (see ``fiedler_vectors(return_info=True)``).
CUT_INFO = ("fiedler_value", "spectral_gap", "ncut_value")
#: A round's mask is rejected when it covers at most this share of the grid, in percent
#: (CutLER: ``ratio <= 0.01``), or when its IoU with the previous round's mask exceeds 0.5.
MIN_AREA_PERCENT = 1


def multi_object_masks(feats, *, max_objects: int = 3, tau: float = 0.2, eps: float = 1e-5,
                       binary_graph: bool = True) -> torch.Tensor:
    """Up to ``max_objects`` object masks per image by MaskCut (see module docstring).

    Args:
        feats: (B, h, w, C) patch features, any float dtype and device; need not be normalised.
        max_objects: rounds per image (CutLER's ``N``; its default is 3).
        tau, eps, binary_graph: the affinity graph, as :func:`selfment_dist.ncut_bipartition`.
    Returns:
        (B, max_objects, h, w) bool on the features' device; object ``k`` is round ``k``'s mask
        minus the patches of objects ``< k``; absent or rejected objects are all False.
    Raises:
        ValueError: a wrong shape, non-finite features, or ``max_objects < 1``.
    """
    x = as_unit_features(feats)
    return maskcut_rounds(x, max_objects=max_objects, tau=tau, eps=eps,
                          binary_graph=binary_graph)[0]


def maskcut_split(v: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """MaskCut's side and seed for each eigenvector (step 3 before the component).

    Args:
        v: (B, N) eigenvectors (any sign); grid: (h, w), h*w == N.
    Returns:
        fg: (B, h, w) bool; seed: (B,) long flat index of the seed (on ``fg``).
    """
    h, w = grid
    peak = v.abs().argmax(-1, keepdim=True)
    sign = torch.where(v.gather(1, peak) < 0, -1.0, 1.0).to(v.dtype)
    v = v * sign  # canonical orientation: the max-|v| entry is positive
    above = v > v.sum(-1, keepdim=True) / v.shape[-1]
    corners = above[:, [0, w - 1, (h - 1) * w, h * w - 1]].sum(-1)
    reverse = (corners >= 3) | ~above.gather(1, peak).squeeze(1)
    fg = torch.where(reverse[:, None], ~above, above)
    # argmax(-v) is argmin(v); both return the first index of a tie, as numpy does.
    seed = torch.where(reverse, v.argmin(-1), v.argmax(-1))
    return fg.view(-1, h, w), seed


def _cut(x: torch.Tensor, grid: tuple[int, int], *, tau: float, eps: float,
         binary_graph: bool) -> tuple[torch.Tensor, dict]:
    """One MaskCut round (steps 2-3) of painted unit features x (B, N, C): (B, N) bool, info."""
    n = x.shape[1]
    chunk = max(1, MAX_AFFINITY_ELEMENTS // n ** 2)  # bounds the (chunk, N, N) affinity
    parts = [fiedler_vectors(x[i:i + chunk], tau=tau, eps=eps, binary_graph=binary_graph,
                             return_info=True) for i in range(0, x.shape[0], chunk)]
    v = torch.cat([p[0] for p in parts])
    fg, seed = maskcut_split(v, grid)
    mask = seed_component(fg, seed).reshape(-1, n)
    return mask, {k: torch.cat([p[1][k] for p in parts]) for k in CUT_INFO}


def _rejected(previous: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Step 4 for (B, N) bool masks: IoU with the previous round's mask > 0.5 (an empty union
    gives NaN in the official IoU, which is not > 0.5), or area ≤ 1 % of the grid."""
    inter = (previous & mask).sum(-1)
    union = (previous | mask).sum(-1)
    # inter/union > 1/2  ⟺  2·inter > union: integers, exact; an empty union gives False.
    too_similar = inter * 2 > union
    too_small = 100 * mask.sum(-1) <= MIN_AREA_PERCENT * mask.shape[-1]
    return too_similar | too_small


@exact_math
def maskcut_rounds(x: torch.Tensor, *, max_objects: int, tau: float, eps: float,
                   binary_graph: bool) -> tuple[torch.Tensor, dict]:
    """MaskCut of unit features x (B, h, w, C) already checked and normalised.

    Returns:
        objects: (B, max_objects, h, w) bool; info: :data:`CUT_INFO` → (B, max_objects) float32,
        the quality of the cut each round's mask came from (also for rejected rounds).
    """
    if int(max_objects) != max_objects or max_objects < 1:
        raise ValueError(f"max_objects must be a positive integer, got {max_objects!r}")
    b, h, w, c = x.shape
    n = h * w
    flat = x.reshape(b, n, c)
    dev = x.device
    painted = torch.zeros(b, n, dtype=torch.bool, device=dev)
    previous = torch.zeros_like(painted)
    taken = torch.zeros_like(painted)
    cut = torch.zeros_like(painted)  # each image's latest solved cut, reused while unpainted
    info = {k: torch.zeros(b, dtype=torch.float32, device=dev) for k in CUT_INFO}
    stale = torch.ones(b, dtype=torch.bool, device=dev)  # painting changed since the last cut
    objects = torch.zeros(b, max_objects, n, dtype=torch.bool, device=dev)
    round_info = {k: torch.zeros(b, max_objects, dtype=torch.float32, device=dev) for k in CUT_INFO}
    for r in range(max_objects):
        if n == 1:  # a one-patch grid has no cut (the official would fail on it)
            break
        idx = stale.nonzero().squeeze(-1)
        if idx.numel():
            feats = flat[idx].masked_fill(painted[idx].unsqueeze(-1), 0.0)
            cut[idx], new_info = _cut(feats, (h, w), tau=tau, eps=eps, binary_graph=binary_graph)
            for k in CUT_INFO:
                info[k][idx] = new_info[k]
        mask = cut.clone()
        if r >= 1:
            mask &= ~_rejected(previous, mask)[:, None]
        stale = (mask & ~painted).any(-1)
        previous = mask
        painted |= mask
        objects[:, r] = mask & ~taken
        taken |= objects[:, r]
        for k in CUT_INFO:
            round_info[k][:, r] = info[k]
    return objects.view(b, max_objects, h, w), round_info
