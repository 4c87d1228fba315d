"""NCut + IPO: faithful to the published per-image procedure, batched, robust to bad input."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage
import torch

from selfment_dist.synthetic import make_patch_feature_batch as make_batch
from selfment_dist.synthetic import make_patch_features as make_features
from selfment_dist import ipo_refine, ncut_bipartition, pseudo_label
from selfment_dist.ncut import (DENSE_MAX_NODES, _block_krylov_second, _dense_second,
                                fiedler_vectors, normalized_affinity, seed_component)
from selfment_dist.reference import reference_ipo, reference_ncut, reference_pseudo_label

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _agreement(ours: np.ndarray, ref: np.ndarray) -> np.ndarray:
    return (ours == ref).reshape(len(ours), -1).mean(1)


@pytest.mark.parametrize("binary_graph", [True, False])
def test_pseudo_labels_match_published_procedure(binary_graph):
    """Random grid shapes (square and not, both solver paths), feature dims and batch sizes."""
    rng = np.random.default_rng(1234 + binary_graph)
    per_image = []
    shapes = [(1, 1), (3, 5), (14, 14), (12, 31)]  # dense path ...
    shapes += [(int(rng.integers(17, 34)), int(rng.integers(17, 34))) for _ in range(5)]  # block Krylov
    for h, w in shapes:
        c = int(rng.choice([8, 64, 384]))
        b = int(rng.integers(1, 5))
        feats = make_batch(rng, b, h, w, c, noise=float(rng.uniform(0.3, 1.0)))
        ours = pseudo_label(torch.from_numpy(feats), binary_graph=binary_graph).numpy()
        assert ours.shape == (b, h, w) and ours.dtype == bool
        ref = np.stack([reference_pseudo_label(f, binary_graph=binary_graph) for f in feats])
        per_image += list(_agreement(ours, ref))
    per_image = np.array(per_image)
    assert per_image.mean() >= 0.995, per_image
    assert (per_image == 1).mean() >= 0.8, per_image


def test_ncut_alone_matches_reference_across_solver_paths():
    rng = np.random.default_rng(7)
    for h, w in [(10, 12), (16, 16), (20, 26)]:
        feats = make_batch(rng, 3, h, w, 64)
        ours = ncut_bipartition(torch.from_numpy(feats)).numpy()
        ref = np.stack([reference_ncut(f) for f in feats])
        assert _agreement(ours, ref).mean() >= 0.995
        assert ((h * w) > DENSE_MAX_NODES) == (h * w > 256)


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


def test_fiedler_vector_solves_generalised_problem():
    rng = np.random.default_rng(4)
    x = torch.nn.functional.normalize(torch.from_numpy(make_features(rng, 20, 20, 32)).double(), dim=-1)
    v = fiedler_vectors(x.reshape(1, -1, 32))[0].numpy()
    xx = x.reshape(-1, 32).numpy()
    a = np.where(xx @ xx.T > 0.2, 1.0, 1e-5)
    d = np.diag(a.sum(1))
    lam = v @ (d - a) @ v / (v @ d @ v)
    resid = (d - a) @ v - lam * d @ v
    assert np.linalg.norm(resid) / np.linalg.norm(d @ v) < 1e-4


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
    import selfment_dist.ncut as ncut_module

    rng = np.random.default_rng(12)
    feats = torch.from_numpy(make_batch(rng, 5, 17, 17, 16))
    whole = ncut_bipartition(feats)
    monkeypatch.setattr(ncut_module, "MAX_AFFINITY_ELEMENTS", 2 * (17 * 17) ** 2)  # chunks of 2
    assert torch.equal(ncut_bipartition(feats), whole)
