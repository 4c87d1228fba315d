"""How much to trust a pseudo-mask: per-image quality signals and one calibrated ``confidence``.

The signals come out of the labelling batch at almost no cost (the eigenvalues the NCut solver
already has, one mat-vec on its affinity, a few reductions over the masks):

=================  ===========================================================================
signal             meaning
=================  ===========================================================================
fiedler_value      λ2 of ``(D − A) v = λ D v``: small when the graph splits into two parts
spectral_gap       λ3 − λ2: large when there is one clear split rather than many similar ones
ncut_value         normalised-cut value of the split NCut chose (0 = two disconnected parts)
fg_fraction        share of the grid in the final mask
border_fraction    share of the grid's outer ring of patches inside the mask
ipo_change         share of patches IPO moved between foreground and background
ipo_converged      IPO reached a fixed point (not stopped by its iteration or size limits)
=================  ===========================================================================

``confidence`` is a logistic model over these signals, fitted on synthetic scenes with and
without an object by ``benchmarks/confidence.py --calibrate`` (the constants below are its
output; rerun it to refit). All functions take and return torch tensors on any device.
"""
from __future__ import annotations

import torch

from selfment_dist.defaults import NO_OBJECT_THRESHOLD

__all__ = ["SIGNALS", "FEATURES", "NO_OBJECT_THRESHOLD", "quality_signals", "feature_matrix",
           "confidence"]

SIGNALS = ("fiedler_value", "spectral_gap", "ncut_value", "fg_fraction", "border_fraction",
           "ipo_change", "ipo_converged")

#: The logistic model's inputs, in the order of ``_WEIGHTS``.
FEATURES = ("fiedler_value", "spectral_gap", "ncut_value", "fg_fraction", "fg_fraction_sq",
            "border_fraction", "ipo_change", "ipo_converged")

# Fitted by ``python benchmarks/confidence.py --calibrate`` (see its docstring for the data):
# standardisation (mean, scale) of each feature, then the logistic weights and bias. Fitted on
# 60 synthetic scenes through the pipeline with random backbone weights at 224 px and 120
# DINO-like feature grids (16x16x64), 30 % of each without an object; target: "object present
# and pseudo-mask IoU >= 0.5" (111 of 180 rows). Per standard deviation of each signal, trust
# falls with the mask's share of the border (-1.9) and with IPO's changes (-0.7), and rises with
# the spectral gap (+1.3) and with IPO's convergence (+0.9).
_MEAN = (0.388, 0.5081, 0.4629, 0.2705, 0.1199, 0.1707, 0.08619, 0.8611)
_SCALE = (0.3867, 0.3674, 0.4039, 0.2161, 0.2164, 0.2563, 0.1608, 0.3458)
_WEIGHTS = (-0.4273, 1.319, -0.01429, 0.2267, -0.09789, -1.932, -0.6793, 0.9158)
_BIAS = 0.4723


def quality_signals(mask: torch.Tensor, coarse: torch.Tensor, ncut_info: dict,
                    ipo_converged: torch.Tensor) -> dict[str, torch.Tensor]:
    """The per-image signals of one labelled batch.

    Args:
        mask: (B, h, w) bool final (IPO) masks; coarse: (B, h, w) bool NCut masks.
        ncut_info: ``fiedler_value``, ``spectral_gap``, ``ncut_value`` (B,) from the NCut solver
            (``fiedler_vectors(..., return_info=True)``).
        ipo_converged: (B,) bool.
    Returns:
        dict of :data:`SIGNALS` → (B,) float32 tensors on the masks' device.
    """
    b, h, w = mask.shape
    m = mask.to(torch.float32)
    if h > 2 and w > 2:
        ring = (m[:, 0].sum(1) + m[:, -1].sum(1) + m[:, 1:-1, 0].sum(1) + m[:, 1:-1, -1].sum(1))
        border = ring / (2 * (h + w) - 4)
    else:  # a grid that is all border
        border = m.mean((1, 2))
    out = {k: ncut_info[k].to(device=mask.device, dtype=torch.float32)
           for k in ("fiedler_value", "spectral_gap", "ncut_value")}
    out.update(fg_fraction=m.mean((1, 2)), border_fraction=border,
               ipo_change=(mask != coarse).to(torch.float32).mean((1, 2)),
               ipo_converged=ipo_converged.to(torch.float32))
    return out


def feature_matrix(signals: dict) -> torch.Tensor:
    """(B, len(FEATURES)) float32 inputs of the logistic model (unstandardised)."""
    s = {k: torch.as_tensor(signals[k], dtype=torch.float32) for k in SIGNALS}
    s["fg_fraction_sq"] = s["fg_fraction"] ** 2
    return torch.stack([s[k] for k in FEATURES], -1)


def confidence(signals: dict) -> torch.Tensor:
    """(B,) float32 in [0, 1]: the calibrated probability that the image holds one object the
    mask follows. Non-finite signals give 0."""
    # Row by row in float64 (an elementwise product summed over each row, not a gemv, whose
    # kernel and rounding depend on the batch size): an image's confidence does not depend on
    # which images shared its batch.
    x = feature_matrix(signals).double()
    mean, scale, weights = (x.new_tensor(c) for c in (_MEAN, _SCALE, _WEIGHTS))
    z = (((x - mean) / scale) * weights).sum(-1) + _BIAS
    return torch.nan_to_num(torch.sigmoid(z), nan=0.0).clamp(0.0, 1.0).float()
