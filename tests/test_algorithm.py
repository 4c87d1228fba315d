"""NCut + IPO: faithful to the published per-image procedure, batched, robust to bad input."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import scipy.ndimage
import torch

from selfment_dist.data.synthetic import make_patch_feature_batch as make_batch
from selfment_dist.data.synthetic import make_patch_features as make_features
from selfment_dist import ipo_refine, ncut_bipartition, pseudo_label
from selfment_dist.algorithm.ncut import (DENSE_MAX_NODES, _block_krylov_second, _dense_second,
                                fiedler_vectors, normalized_affinity, seed_component)
from selfment_dist.algorithm.reference import reference_ipo, reference_ncut, reference_pseudo_label

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device on this machine"))]


def _agreement(ours: np.ndarray, ref: np.ndarray) -> np.ndarray:
    return (ours == ref).reshape(len(ours), -1).mean(1)


def _graph(feats: np.ndarray, binary_graph: bool = True, tau: float = 0.2, eps: float = 1e-5):
    """(D, A) of one image as the published code builds them (float64)."""
    x = feats.reshape(-1, feats.shape[-1]).astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    a = x @ x.T
    a = np.where(a > tau, 1.0, eps) if binary_graph else np.where(a >= tau, a, eps)
    return np.diag(a.sum(1)), a


def _spectral_gap(feats: np.ndarray, binary_graph: bool = True) -> float:
    """Relative gap (λ3 − λ2) / λ3 of scipy's generalised problem: where it is open, the second
    eigenvector is well defined and any correct solver must give the same bipartition."""
    d, a = _graph(feats, binary_graph)
    if len(a) < 3:
        return 1.0
    lam = scipy.linalg.eigh(d - a, d, subset_by_index=[1, 2], eigvals_only=True)
    return float((lam[1] - lam[0]) / max(lam[1], 1e-300))


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


OPEN_GAP = 1e-3

@pytest.mark.parametrize("binary_graph", [True, False])
def test_pseudo_labels_match_published_procedure(binary_graph):
    """Random grid shapes (square and not, both solver paths), feature dims and batch sizes."""
    rng = np.random.default_rng(1234 + binary_graph)
    n_open, ious = 0, []
    shapes = [(1, 1), (3, 5), (14, 14), (12, 31)]  # dense path ...
    shapes += [(int(rng.integers(17, 26)), int(rng.integers(17, 26))) for _ in range(4)]  # block Krylov
    for h, w in shapes:
        c = int(rng.choice([8, 64, 384]))
        b = int(rng.integers(1, 4))
        planted = [make_features(rng, h, w, c, noise=float(rng.uniform(0.3, 1.0)), return_mask=True)
                   for _ in range(b)]
        feats = np.stack([f for f, _ in planted])
        ours = pseudo_label(torch.from_numpy(feats), binary_graph=binary_graph).numpy()
        assert ours.shape == (b, h, w) and ours.dtype == bool
        for f, o, (_, gt) in zip(feats, ours, planted):
            ref = reference_pseudo_label(f, binary_graph=binary_graph)
            if _spectral_gap(f, binary_graph) > OPEN_GAP:
                # No slack: where the eigenvector is well defined the masks are identical.
                np.testing.assert_array_equal(o, ref)
                n_open += 1
            if h * w >= 100:
                ious.append(_iou(o, gt))
    assert n_open >= 10  # most images have an open gap, so the identity check has teeth
    # Independent oracle: the planted object, not the reference code.
    assert np.mean(ious) > 0.6, ious


def test_ncut_alone_matches_reference_across_solver_paths():
    rng = np.random.default_rng(7)
    assert DENSE_MAX_NODES == 256
    for h, w in [(10, 12), (16, 16), (20, 26)]:
        feats = make_batch(rng, 3, h, w, 64)
        ours = ncut_bipartition(torch.from_numpy(feats)).numpy()
        for f, o in zip(feats, ours):
            if _spectral_gap(f) > OPEN_GAP:
                np.testing.assert_array_equal(o, reference_ncut(f))


def test_block_krylov_equals_dense_eigenvector():
    rng = np.random.default_rng(3)
    x = torch.nn.functional.normalize(torch.from_numpy(make_batch(rng, 3, 24, 24, 96)), dim=-1)
    m, d = normalized_affinity(x.reshape(3, -1, 96))
    u0 = d.sqrt() / d.sqrt().norm(dim=-1, keepdim=True)
    fast, converged = _block_krylov_second(m, u0)
    dense = _dense_second(m)
    assert bool(converged.all())
    corr = (fast * dense).sum(-1).abs() / (fast.norm(dim=-1) * dense.norm(dim=-1))
    assert bool((corr > 0.9999).all()), corr


@pytest.mark.parametrize("h,w,dtype", [(12, 12, torch.float64), (20, 20, torch.float64),
                                       (20, 20, torch.float32), (24, 21, torch.float32)])
def test_fiedler_vector_is_the_second_generalised_eigenvector(h, w, dtype):
    """λ of our vector equals scipy's second smallest generalised eigenvalue, the vector is
    D-orthogonal to the trivial one (vᵀD1 = 0) and solves the problem. The trivial constant
    vector (λ = 0) or a wrong eigenvector fails at least one of these."""
    rng = np.random.default_rng(4 + h + w)
    feats = make_features(rng, h, w, 32)
    x = torch.nn.functional.normalize(torch.from_numpy(feats).to(dtype), dim=-1)
    v = fiedler_vectors(x.reshape(1, -1, 32))[0].double().numpy()
    d, a = _graph(feats)
    lam = v @ (d - a) @ v / (v @ d @ v)
    lam2 = scipy.linalg.eigh(d - a, d, subset_by_index=[1, 1], eigvals_only=True)[0]
    tol = 1e-9 if dtype == torch.float64 else 1e-4  # float32 features shift A's entries
    assert lam == pytest.approx(lam2, rel=tol, abs=tol), (lam, lam2)
    assert lam2 > 1e-6  # a real cut, not the trivial λ = 0
    d1 = np.diag(d)
    assert abs(v @ d1) / (np.linalg.norm(v * np.sqrt(d1)) * np.sqrt(d1.sum())) < 10 * tol
    resid = (d - a) @ v - lam * d @ v
    assert np.linalg.norm(resid) / np.linalg.norm(d @ v) < (1e-6 if dtype == torch.float64 else 1e-3)


def test_seed_component_equals_scipy_label():
    rng = np.random.default_rng(5)
    masks = rng.random((6, 23, 37)) > 0.45
    # A spiral: one long path with many turns.
    spiral = np.zeros((23, 37), bool)
    top, left, bottom, right = 0, 0, 22, 36
    while top <= bottom and left <= right:
        spiral[top, left:right + 1] = True
        spiral[top:bottom + 1, right] = True
        if bottom - top >= 2:
            spiral[bottom, left:right + 1] = True
        if right - left >= 4:
            spiral[top + 2:bottom + 1, left] = True
        top, left, bottom, right = top + 2, left + 2, bottom - 2, right - 2
        if top <= bottom:
            spiral[top - 1, left - 2 + 2] = False  # leave the next ring connected one way
    masks[0] = spiral
    seeds = np.array([np.flatnonzero(m)[rng.integers(0, m.sum())] for m in masks])
    ours = seed_component(torch.from_numpy(masks), torch.from_numpy(seeds)).numpy()
    for m, s, o in zip(masks, seeds, ours):
        labels, _ = scipy.ndimage.label(m)
        np.testing.assert_array_equal(o, labels == labels.flat[s])


@pytest.mark.parametrize("sample_size", [1, 10, 40])
def test_ipo_matches_reference_from_any_start(sample_size):
    rng = np.random.default_rng(sample_size)
    feats = make_batch(rng, 5, 18, 21, 48, noise=0.8)
    starts = rng.random((5, 18, 21)) > rng.uniform(0.2, 0.8, size=(5, 1, 1))
    starts[0] = True  # everything: stops at once
    starts[1] = False  # nothing: stops at once
    ours = ipo_refine(torch.from_numpy(feats), torch.from_numpy(starts), sample_size=sample_size).numpy()
    for f, s, o in zip(feats, starts, ours):
        np.testing.assert_array_equal(o, reference_ipo(f, s, sample_size=sample_size))
    np.testing.assert_array_equal(ours[0], starts[0])
    np.testing.assert_array_equal(ours[1], starts[1])
    # IPO really moved the random starts (a no-op IPO would fail here).
    assert (ours[2:] != starts[2:]).reshape(3, -1).any(1).all()


@pytest.mark.parametrize("n_iter", [0, 1, 3])
def test_ipo_respects_iteration_budget(n_iter):
    rng = np.random.default_rng(11)
    feats = make_batch(rng, 3, 12, 12, 16, noise=1.5)
    starts = rng.random((3, 12, 12)) > 0.5
    ours = ipo_refine(torch.from_numpy(feats), torch.from_numpy(starts), n_iter=n_iter).numpy()
    for f, s, o in zip(feats, starts, ours):
        np.testing.assert_array_equal(o, reference_ipo(f, s, n_iter=n_iter))


def test_batching_does_not_change_results():
    rng = np.random.default_rng(8)
    feats = torch.from_numpy(make_batch(rng, 4, 20, 20, 32))
    together = pseudo_label(feats)
    alone = torch.cat([pseudo_label(feats[i:i + 1]) for i in range(4)])
    assert torch.equal(together, alone)


def test_unnormalised_and_low_precision_inputs():
    rng = np.random.default_rng(9)
    feats = torch.from_numpy(make_batch(rng, 2, 15, 15, 32))
    base = pseudo_label(feats)
    assert torch.equal(pseudo_label(feats * 17.0), base)
    assert torch.equal(pseudo_label(feats.double()), base)
    assert (pseudo_label(feats.half()) == base).float().mean() > 0.99
    assert torch.equal(pseudo_label(feats.numpy()), base)


@pytest.mark.parametrize("device", DEVICES)
def test_outputs_stay_on_the_input_device(device):
    rng = np.random.default_rng(10)
    feats = torch.from_numpy(make_batch(rng, 2, 17, 17, 16)).to(device)
    for out in (ncut_bipartition(feats), pseudo_label(feats),
                ipo_refine(feats, torch.ones(2, 17, 17, dtype=torch.bool, device=device))):
        assert out.device.type == device and out.dtype == torch.bool and out.shape == (2, 17, 17)


@pytest.mark.parametrize("h,w", [(1, 1), (1, 7), (2, 2), (16, 17)])
@pytest.mark.parametrize("kind", ["constant", "zeros", "two_values", "random"])
def test_degenerate_features_do_not_crash(h, w, kind):
    rng = np.random.default_rng(h * 100 + w)
    if kind == "constant":
        feats = np.ones((2, h, w, 8), np.float32)
    elif kind == "zeros":
        feats = np.zeros((2, h, w, 8), np.float32)
    elif kind == "two_values":
        feats = np.where(rng.random((2, h, w, 1)) > 0.5, 1.0, -1.0) * np.ones((1, 1, 1, 8))
    else:
        feats = rng.normal(size=(2, h, w, 8))
    out = pseudo_label(torch.from_numpy(np.asarray(feats, np.float32)))
    assert out.shape == (2, h, w) and out.dtype == torch.bool
    # The foreground always holds the NCut seed, so it is never empty.
    assert bool(ncut_bipartition(torch.from_numpy(np.asarray(feats, np.float32))).flatten(1).any(1).all())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_features_are_a_clear_error(bad):
    feats = torch.randn(2, 4, 4, 8)
    feats[1, 2, 3, 0] = bad
    for fn in (ncut_bipartition, pseudo_label):
        with pytest.raises(ValueError, match="NaN or inf"):
            fn(feats)
    with pytest.raises(ValueError, match="NaN or inf"):
        ipo_refine(feats, torch.ones(2, 4, 4, dtype=torch.bool))


def test_bad_shapes_are_a_clear_error():
    with pytest.raises(ValueError, match=r"\(B, h, w, C\)"):
        ncut_bipartition(torch.randn(16, 8))
    with pytest.raises(ValueError, match="empty dimension"):
        pseudo_label(torch.randn(0, 4, 4, 8))
    with pytest.raises(ValueError, match="mask must have shape"):
        ipo_refine(torch.randn(1, 4, 4, 8), torch.ones(1, 4, 5, dtype=torch.bool))
    for eps in (0.0, 1.0, -1e-5):  # the weight of a dropped edge must be below a kept one's
        with pytest.raises(ValueError, match=r"eps .* must be in \(0, 1\)"):
            pseudo_label(torch.randn(1, 4, 4, 8), eps=eps)


def test_memory_chunking_gives_the_same_masks(monkeypatch):
    import selfment_dist.algorithm.ncut as ncut_module

    rng = np.random.default_rng(12)
    feats = torch.from_numpy(make_batch(rng, 5, 17, 17, 16))
    whole = ncut_bipartition(feats)
    monkeypatch.setattr(ncut_module, "MAX_AFFINITY_ELEMENTS", 2 * (17 * 17) ** 2)  # chunks of 2
    assert torch.equal(ncut_bipartition(feats), whole)


def test_lanczos_steps_are_counted_and_ritz_problems_stay_exact_on_the_host():
    """Every block-Lanczos solve adds its steps (per image) to the process counter the run
    summary reads; the Rayleigh–Ritz eigh of a large basis gives LAPACK's own result."""
    from selfment_dist.algorithm import ncut as ncut_module
    ncut_module.take_lanczos_steps()
    feats = torch.from_numpy(make_batch(np.random.default_rng(3), 2, 20, 20, 16))
    ncut_bipartition(feats)
    assert ncut_module.take_lanczos_steps() >= 2  # at least one step for each of 2 images
    assert ncut_module.take_lanczos_steps() == 0
    h = torch.randn(3, 48, 48, dtype=torch.float64)
    h = h + h.transpose(1, 2)
    theta, s = ncut_module._ritz_eigh(h)
    ref_theta, ref_s = torch.linalg.eigh(h)
    assert torch.equal(theta, ref_theta) and torch.equal(s, ref_s)


# -- issue 30 #14: the labeller's own columns against the public functions -----------------------

def test_pseudo_labeler_columns_are_the_public_functions_of_its_features():
    """``mask`` is :func:`pseudo_label` and ``ncut_mask`` :func:`ncut_bipartition` of the very
    features the labeller returns (computed independently). Noisy features, so that IPO moves
    some patches: a labeller that swapped its two masks fails here."""
    from selfment_dist.algorithm.labeler import PseudoLabeler

    feats = torch.from_numpy(make_batch(np.random.default_rng(0), 8, 12, 12, 64, noise=2.0))
    labeler = PseudoLabeler(lambda images: feats)  # the backbone's part: these features
    out = labeler(np.zeros((8, 32, 32, 3), np.float32), return_ncut=True, return_features=True)
    mask = pseudo_label(feats).numpy()
    ncut = ncut_bipartition(feats).numpy()
    assert (mask != ncut).any(), "IPO changed nothing: the test could not tell the masks apart"
    np.testing.assert_array_equal(out["mask"], mask)
    np.testing.assert_array_equal(out["ncut_mask"], ncut)
    # And from the features it hands out (float16, as the parquet column stores them).
    f16 = torch.from_numpy(out["features"])
    np.testing.assert_array_equal(out["mask"], pseudo_label(f16).numpy())
    np.testing.assert_array_equal(out["ncut_mask"], ncut_bipartition(f16).numpy())
