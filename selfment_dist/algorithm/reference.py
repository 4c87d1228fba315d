"""The procedure as published: one image at a time, dense scipy eigensolver, numpy loops.

Restates the official code (geshang777/Selfment ``train.py``: ``_tokencut_init_labels`` and
``_unsupervised_saliency_labels``) step by step, including its degenerate cases: an empty or
full NCut mask is returned unchanged, and an IPO update that empties a side is returned as the
result.

This is the yardstick for tests (mask agreement) and benchmarks (speed). It follows the
TokenCut/Selfment reference code path literally and is deliberately not optimised; use
:func:`selfment_dist.pseudo_label` for real work.
"""
from __future__ import annotations

import numpy as np
import scipy.linalg
import scipy.ndimage


def _unit(feats: np.ndarray) -> np.ndarray:
    feats = np.asarray(feats, dtype=np.float64)
    norm = np.linalg.norm(feats, axis=-1, keepdims=True)
    return feats / np.maximum(norm, 1e-12)


def reference_ncut(feats: np.ndarray, *, tau: float = 0.2, eps: float = 1e-5,
                   binary_graph: bool = True) -> np.ndarray:
    """NCut of one image. feats: (h, w, C) → bool (h, w)."""
    h, w, c = feats.shape
    x = _unit(feats).reshape(h * w, c)
    if h * w == 1:
        return np.ones((h, w), dtype=bool)
    a = x @ x.T
    if binary_graph:
        a = np.where(a > tau, 1.0, eps)
    else:
        a = np.where(a >= tau, a, eps)
    d = np.diag(a.sum(1))
    _, vecs = scipy.linalg.eigh(d - a, d, subset_by_index=[1, 1])
    v = vecs[:, 0]
    bip = v > v.mean()
    seed = int(np.argmax(np.abs(v)))
    if not bip[seed]:
        bip = np.logical_not(bip)
    labels, _ = scipy.ndimage.label(bip.reshape(h, w))  # default structure: 4-connectivity
    return labels == labels.flat[seed]


def reference_ipo(feats: np.ndarray, mask: np.ndarray, *, n_iter: int = 20,
                  sample_size: int = 10) -> np.ndarray:
    """IPO of one image. feats: (h, w, C), mask: bool (h, w) → bool (h, w)."""
    h, w, c = feats.shape
    x = _unit(feats).reshape(h * w, c)
    m = np.asarray(mask, dtype=bool).reshape(-1).copy()
    if m.all() or not m.any():
        return m.reshape(h, w)
    ref = x[m].mean(0) - x[~m].mean(0)
    for _ in range(n_iter):
        if m.sum() < sample_size or (~m).sum() < sample_size:
            break
        mu_fg, mu_bg = x[m].mean(0), x[~m].mean(0)
        new = x @ mu_fg > x @ mu_bg
        if new.all() or not new.any():
            m = new  # official: the degenerate labels are the result
            break
        if (x[new].mean(0) - x[~new].mean(0)) @ ref < 0:
            new = ~new
        m = new
    return m.reshape(h, w)


def reference_pseudo_label(feats: np.ndarray, **kwargs) -> np.ndarray:
    """NCut then IPO of one image, as published. feats: (h, w, C) → bool (h, w)."""
    ipo_keys = {"n_iter", "sample_size"}
    ncut_kw = {k: v for k, v in kwargs.items() if k not in ipo_keys}
    ipo_kw = {k: v for k, v in kwargs.items() if k in ipo_keys}
    return reference_ipo(feats, reference_ncut(feats, **ncut_kw), **ipo_kw)
