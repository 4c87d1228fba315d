"""Batched normalised cut (NCut) on patch-feature affinity graphs.

The published procedure (TokenCut, used by Selfment for its coarse mask) builds the affinity
``A = F Fᵀ`` of the L2-normalised patch features, sparsifies it (``A > tau → 1`` else ``eps``),
solves the generalised eigenproblem ``(D − A) v = λ D v`` for the second smallest eigenvector,
splits at its mean, calls the side holding ``argmax |v|`` (the seed) foreground and keeps the
4-connected component of the seed.

Instead of a dense eigendecomposition per image we use the equivalent symmetric problem
``M = D^{-1/2} A D^{-1/2}``: the second smallest generalised eigenvector is ``v = D^{-1/2} u``
where ``u`` is the eigenvector of the second *largest* eigenvalue of ``M``. The largest one is
known in closed form (``u0 ∝ D^{1/2} 1``, eigenvalue 1), so it is deflated and a batched block
Lanczos iteration with full reorthogonalisation finds the top of the remaining spectrum for all
images of the batch at once with batched gemms. Images whose Ritz residual has not converged
fall back to a dense ``eigh``; tiny graphs go dense directly.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from selfment_dist.algorithm._tensors import as_unit_features, exact_math

logger = logging.getLogger(__name__)

#: Images whose iterative solve fell back to a dense float64 ``eigh`` in this process (slow on
#: GPUs with weak FP64); read and reset with :func:`take_dense_fallbacks`.
_DENSE_FALLBACKS = 0


#: Block-Lanczos steps taken, summed over images, in this process; read with
#: :func:`take_lanczos_steps`.
_LANCZOS_STEPS = 0
#: torch's batched CUDA ``eigh`` runs a per-matrix loop for matrices larger than 32×32 (the
#: batched Jacobi solver's limit): Rayleigh–Ritz problems larger than this go to the host.
DEVICE_EIGH_MAX = 32


def take_dense_fallbacks() -> int:
    """Dense-``eigh`` fallbacks counted since the last call (in this process), reset to 0."""
    global _DENSE_FALLBACKS
    count, _DENSE_FALLBACKS = _DENSE_FALLBACKS, 0
    return count


def take_lanczos_steps() -> int:
    """Block-Lanczos steps (summed over images) since the last call (in this process), reset."""
    global _LANCZOS_STEPS
    count, _LANCZOS_STEPS = _LANCZOS_STEPS, 0
    return count


def _ritz_eigh(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``eigh`` of the small float64 Rayleigh–Ritz matrices (B, k, k). On an accelerator with
    k > :data:`DEVICE_EIGH_MAX` they are solved on the host: the same LAPACK result as on a
    CPU run, without the device's per-matrix loop (a latency cliff once the basis passes 32)."""
    if h.device.type != "cpu" and h.shape[-1] > DEVICE_EIGH_MAX:
        theta, s = torch.linalg.eigh(h.cpu())
        return theta.to(h.device, non_blocking=True), s.to(h.device, non_blocking=True)
    return torch.linalg.eigh(h)

#: Graphs with at most this many nodes are solved densely (exact and cheap at this size).
DENSE_MAX_NODES = 256
#: Affinity entries held at once (B·N² floats): 2**28 is 1 GiB in float32, i.e. about three
#: 96×96-grid images (1536 px at patch 16) or forty-eight 48×48 ones per chunk.
MAX_AFFINITY_ELEMENTS = 2 ** 28


def normalized_affinity(x: torch.Tensor, *, tau: float = 0.2, eps: float = 1e-5,
                        binary_graph: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Affinity of unit features, symmetrically normalised.

    Args:
        x: (B, N, C) float unit-norm features.
    Returns:
        M: (B, N, N) ``D^{-1/2} A D^{-1/2}``, same dtype/device as ``x``.
        d: (B, N) degrees ``A.sum(-1)`` (all ≥ N·eps > 0, so no division by zero).
    """
    if not 0.0 < eps < 1.0:
        raise ValueError(f"eps (the weight of dropped edges) must be in (0, 1), got {eps}")
    a = torch.bmm(x, x.transpose(1, 2))
    if binary_graph:
        # In place, 1 where kept and eps elsewhere (eps < 1): two cheap passes over the largest
        # buffer instead of a bool mask, a float copy and an affine map (5x slower on CPU).
        torch.gt(a, tau, out=a).clamp_(min=eps)
    else:
        a = torch.where(a >= tau, a, torch.full_like(a, eps))
    d = a.sum(-1)
    s = d.rsqrt()
    a.mul_(s[:, :, None]).mul_(s[:, None, :])  # in place: A is (B, N, N), the largest buffer
    return a, d


def _start_block(batch: int, n: int, p: int, *, dtype, device) -> torch.Tensor:
    # A fixed pseudo-random start keeps results deterministic run to run and device to device.
    g = torch.Generator(device="cpu").manual_seed(0)
    return torch.randn(n, p, generator=g, dtype=torch.float64).to(device=device, dtype=dtype).expand(batch, n, p)


def _project_out(w: torch.Tensor, u0: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
    """Remove from the block ``w`` (B, N, p) its components along ``u0`` (B, N) and ``basis``
    (B, N, k), twice: classical Gram-Schmidt repeated, which stays orthogonal in float32."""
    u = u0.unsqueeze(-1)
    for _ in range(2):
        w = w - u @ (u.transpose(1, 2) @ w)
        if basis is not None and basis.shape[-1]:
            w = w - basis @ (basis.transpose(1, 2) @ w)
    return w


def _block_krylov_second(m: torch.Tensor, u0: torch.Tensor, *, block: int = 8, max_steps: int = 24,
                         gap_rtol: float = 1e-4, abs_tol: float = 1e-7,
                         return_values: bool = False):
    """Top eigenvector of ``m`` on the orthogonal complement of ``u0``, for a batch of graphs.

    Block Lanczos with full reorthogonalisation: each step multiplies ``m`` by a block of ``block``
    vectors (a gemm, far cheaper per vector than mat-vecs), and Rayleigh–Ritz on the whole basis
    is done in float64. A block method matters here: with the sparsified graph the top of the
    spectrum is a tight cluster (λ2, λ3 … differ by O(eps)), which single-vector Lanczos resolves
    slowly, while a block at least as wide as the cluster converges at the rate of the cluster's
    distance to the bulk of the spectrum.

    Args:
        m: (B, N, N) symmetric; u0: (B, N) its known top eigenvector (unit norm).
    Returns:
        vec: (B, N) unit Ritz vectors; converged: (B,) bool, where the Ritz residual is below
        ``gap_rtol`` × the distance to the next Ritz value, below ``abs_tol`` (scaled to the
        dtype), or stopped falling at the floor of the working precision. With
        ``return_values`` also (B, 2) float64: the two largest Ritz values (μ2, μ3 of ``m``).
    """
    global _LANCZOS_STEPS
    b, n, _ = m.shape
    p = max(1, min(block, n - 1))
    steps_max = max(1, min(max_steps, (n - 1) // p))
    q = _project_out(_start_block(b, n, p, dtype=m.dtype, device=m.device), u0, None)
    q, _ = torch.linalg.qr(q)
    basis, images = [q], []
    vec = q[:, :, 0]
    converged = torch.zeros(b, dtype=torch.bool, device=m.device)
    prev = torch.full((b,), float("inf"), dtype=torch.float64, device=m.device)
    precision = torch.finfo(m.dtype).eps
    abs_tol = abs_tol * precision / torch.finfo(torch.float32).eps
    floor_tol = 1e3 * precision
    for step in range(steps_max):
        images.append(torch.bmm(m, basis[-1]))
        qs = torch.cat(basis, -1)
        mqs = torch.cat(images, -1)
        # Rayleigh–Ritz on span(qs) in float64: H = Qᵀ M Q.
        h = torch.bmm(qs.transpose(1, 2).double(), mqs.double())
        h = 0.5 * (h + h.transpose(1, 2))
        theta, s = _ritz_eigh(h)
        y = s[:, :, -1:]
        vec64 = torch.bmm(qs.double(), y)
        resid = (torch.bmm(mqs.double(), y) - theta[:, -1, None, None] * vec64).norm(dim=(1, 2))
        gap = (theta[:, -1] - theta[:, -2]) if theta.shape[-1] > 1 else torch.ones_like(resid)
        # Stop at the gap-relative target, or where the residual stopped falling: that is the
        # floor of the working precision, which a dense solver in that precision shares.
        stalled = (resid > 0.5 * prev) & (resid <= floor_tol)
        converged = (resid <= gap_rtol * gap) | (resid <= abs_tol) | stalled
        prev = resid
        vec = vec64.squeeze(-1).to(m.dtype)
        top2 = theta[:, [-1, -2]] if theta.shape[-1] > 1 else theta[:, [-1, -1]]
        if bool(converged.all()) or step == steps_max - 1:
            _LANCZOS_STEPS += (step + 1) * b
            break
        # Next block: the new directions of M·(last block), orthogonal to everything so far.
        w = _project_out(images[-1], u0, qs)
        q, r = torch.linalg.qr(w)
        # A (near) rank-deficient block means an invariant subspace was found; replace the
        # dead directions by fresh ones so the basis stays orthonormal.
        dead = r.diagonal(dim1=1, dim2=2).abs() < 1e-6
        if bool(dead.any()):
            fresh = _project_out(_start_block(b, n, p, dtype=m.dtype, device=m.device).roll(step + 1, -1),
                                 u0, qs)
            q, _ = torch.linalg.qr(torch.where(dead[:, None, :], fresh, q))
            q, _ = torch.linalg.qr(_project_out(q, u0, qs))
        basis.append(q)
    vec = vec / vec.norm(dim=-1, keepdim=True)
    return (vec, converged, top2) if return_values else (vec, converged)


def _dense_second(m: torch.Tensor, *, return_values: bool = False):
    """Eigenvector of the second largest eigenvalue of each (N, N) matrix, in float64; with
    ``return_values`` also (B, 2) float64: the second and third largest eigenvalues."""
    vals, vecs = torch.linalg.eigh(m.double())
    vec = vecs[:, :, -2].to(m.dtype) if m.shape[-1] > 1 else vecs[:, :, -1].to(m.dtype)
    if not return_values:
        return vec
    n = m.shape[-1]
    return vec, vals[:, [max(n - 2, 0), max(n - 3, 0)]]


def _cut_info(m: torch.Tensor, d: torch.Tensor, v: torch.Tensor, mu: torch.Tensor) -> dict:
    """Quality of the split of each graph at the mean of its eigenvector ``v`` (B, N).

    ``mu`` (B, 2): the top two non-trivial eigenvalues of ``M``. The normalised-cut value
    ``cut/assoc(S) + cut/assoc(S̄)`` needs ``cut = Σ_{i∈S, j∉S} A_ij = (√d·1_S)ᵀ M (√d·1_S̄)``:
    one batched mat-vec on ``M``, a fraction of one solver step.
    """
    side = (v > v.mean(-1, keepdim=True)).to(m.dtype)
    sqrt_d = d.sqrt()
    cut = ((sqrt_d * side).unsqueeze(1) @ (m @ (sqrt_d * (1 - side)).unsqueeze(-1))).view(-1)
    assoc_s = (d * side).sum(-1)
    assoc_t = d.sum(-1) - assoc_s
    value = cut / assoc_s.clamp(min=1e-12) + cut / assoc_t.clamp(min=1e-12)
    mu = mu.to(torch.float32)
    # Generalised eigenvalues of (D − A) v = λ D v are 1 − μ.
    return {"fiedler_value": 1 - mu[:, 0], "spectral_gap": mu[:, 0] - mu[:, 1],
            "ncut_value": value.to(torch.float32)}


@exact_math
def fiedler_vectors(x: torch.Tensor, *, tau: float = 0.2, eps: float = 1e-5,
                    binary_graph: bool = True, dense_max_nodes: int = DENSE_MAX_NODES,
                    return_info: bool = False):
    """Second smallest generalised eigenvectors of ``(D − A) v = λ D v``, batched.

    Args:
        x: (B, N, C) unit-norm features (float32 or float64) on any device.
        return_info: also return the quality of the split (see below).
    Returns:
        (B, N) eigenvectors ``v`` (scale and sign arbitrary; the bipartition ignores both). With
        ``return_info``: ``(v, info)``, ``info`` a dict of (B,) float32 tensors:
        ``fiedler_value`` λ2, ``spectral_gap`` λ3 − λ2, ``ncut_value`` of the split at the mean
        of ``v`` (0 for two disconnected parts, larger for a weaker cut).
    """
    b, n, _ = x.shape
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    if n == 1:
        v = x.new_ones(b, 1)
        if return_info:
            zeros = x.new_zeros(b, dtype=torch.float32)
            return v, {"fiedler_value": zeros, "spectral_gap": zeros, "ncut_value": zeros}
        return v
    m, d = normalized_affinity(x, tau=tau, eps=eps, binary_graph=binary_graph)
    sqrt_d = d.sqrt()
    if n <= dense_max_nodes:
        u, mu = _dense_second(m, return_values=True)
    else:
        u0 = sqrt_d / sqrt_d.norm(dim=-1, keepdim=True)
        u, converged, mu = _block_krylov_second(m, u0, return_values=True)
        if not bool(converged.all()):
            global _DENSE_FALLBACKS
            idx = (~converged).nonzero().squeeze(-1)
            _DENSE_FALLBACKS += idx.numel()
            logger.warning("block Krylov did not converge for %d/%d images of %d nodes; dense "
                           "float64 eigh fallback (slow on GPUs with weak FP64)", idx.numel(), b, n)
            u[idx], mu[idx] = _dense_second(m[idx], return_values=True)
    v = u / sqrt_d
    return (v, _cut_info(m, d, v, mu)) if return_info else v


def _spread_along_rows(comp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Grow ``comp`` to every whole horizontal run of ``mask`` it touches. (B, h, w) bool."""
    b, h, w = mask.shape
    prev = F.pad(mask[..., :-1], (1, 0), value=False)
    run = torch.cumsum(mask & ~prev, -1) * mask  # 1-based run index in its row, 0 off the mask
    idx = (torch.arange(b * h, device=mask.device).view(b, h, 1) * (w + 1) + run).view(-1)
    hit = torch.zeros(b * h * (w + 1), dtype=torch.uint8, device=mask.device)
    hit.scatter_reduce_(0, idx, comp.reshape(-1).to(torch.uint8), reduce="amax")
    return hit[idx].view(b, h, w).bool() & mask


def seed_component(mask: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """The 4-connected component of ``mask`` that holds ``seed``, for a whole batch at once.

    Alternating sweeps spread the component along whole row runs, then whole column runs of the
    mask, so the number of sweeps is the number of turns a path needs, not its length; the
    batch needs one host sync per sweep and stays on the mask's device.

    Args:
        mask: (B, h, w) bool; seed: (B,) long flat indices into h*w.
    Returns:
        (B, h, w) bool (empty for an image whose seed is not on its mask).
    """
    b, h, w = mask.shape
    comp = torch.zeros(b, h * w, dtype=torch.bool, device=mask.device)
    comp[torch.arange(b, device=mask.device), seed] = True
    comp = comp.view(b, h, w) & mask
    mask_t = mask.transpose(1, 2).contiguous()
    for _ in range(h * w):
        grown = _spread_along_rows(comp, mask)
        grown = _spread_along_rows(grown.transpose(1, 2).contiguous(), mask_t).transpose(1, 2)
        if torch.equal(grown, comp):
            break
        comp = grown
    return comp


def bipartition(v: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Split each eigenvector at its mean; the side holding ``argmax |v|`` is foreground.

    Args:
        v: (B, N) eigenvectors; grid: (h, w) with h*w == N.
    Returns:
        fg: (B, h, w) bool (before the connected-component step); seed: (B,) long.
    """
    above = v > v.mean(-1, keepdim=True)
    seed = v.abs().argmax(-1)
    seed_above = above.gather(1, seed[:, None])
    fg = torch.where(seed_above, above, ~above)  # flip sides when the seed fell below the mean
    return fg.view(-1, *grid), seed


def ncut_bipartition(feats, *, tau: float = 0.2, eps: float = 1e-5,
                     binary_graph: bool = True) -> torch.Tensor:
    """Coarse foreground mask of each image by normalised cut (see module docstring).

    Args:
        feats: (B, h, w, C) patch features, any float dtype, any device; need not be normalised.
        tau: affinity threshold; eps: weight of edges below it.
        binary_graph: ``A > tau → 1`` (default) or keep ``A`` where ``A ≥ tau``.
    Returns:
        (B, h, w) bool foreground mask on the features' device.
    Raises:
        ValueError: on a wrong shape or non-finite features.
    """
    return _ncut_unit(as_unit_features(feats), tau=tau, eps=eps, binary_graph=binary_graph)


@exact_math
def _ncut_unit(x: torch.Tensor, *, tau: float, eps: float, binary_graph: bool,
               return_info: bool = False):
    """:func:`ncut_bipartition` of features already checked and normalised (B, h, w, C); with
    ``return_info`` also the split's quality (see :func:`fiedler_vectors`)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h * w, c)
    # Bound memory: the (chunk, N, N) affinity is the largest buffer.
    chunk = max(1, MAX_AFFINITY_ELEMENTS // (h * w) ** 2)
    parts = [fiedler_vectors(x[i:i + chunk], tau=tau, eps=eps, binary_graph=binary_graph,
                             return_info=return_info)
             for i in range(0, b, chunk)]
    v = torch.cat([p[0] for p in parts] if return_info else parts)
    fg, seed = bipartition(v, (h, w))
    mask = seed_component(fg, seed)
    if not return_info:
        return mask
    return mask, {k: torch.cat([p[1][k] for p in parts]) for k in parts[0][1]}
