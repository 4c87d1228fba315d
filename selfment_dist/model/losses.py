"""The Selfment training loss: BCE + Dice + sim_weight x contrastive, per image.

Defaults follow the official code (geshang777/Selfment ``train.py``). For one image with patches
i = 1..N, foreground logit l_i = logits[i, 1], probability p_i = softmax(logits[i])[1], label
y_i in {0, 1} and unit embedding z_i = emb_i / |emb_i|:

    bce         = mean_i BCEWithLogits(l_i, y_i)
    dice        = 1 - (2 sum_i p_i y_i + s) / (sum_i p_i + sum_i y_i + s),   s = DICE_SMOOTH = 1e-6
    contrastive = 0 when the foreground or the background has fewer than 2 patches; otherwise
                  mean over ALL anchors i of  -1/|P(i)| sum_{p in P(i)} log softmax_i(S)[p]
                  with S = z z^T / T, the log-softmax over the full row (i's own similarity
                  stays in the denominator) and P(i) = {p != i : y_p = y_i}.
    total       = bce + dice + sim_weight * contrastive

``contrastive="supcon"`` selects our earlier variant instead (off by default): SupCon "L_out"
(Khosla et al. 2020), whose denominator leaves out a = i, averaged over the anchors that have a
positive (0 when none has). It gives larger values and differently aimed gradients while the
embeddings are diffuse, so numbers trained with it are not the paper's.

Each term is averaged over the images of the batch. Everything is vectorised over the batch and
computed in float32 with autocast disabled, so the loss is the same under mixed precision.

Memory: the contrastive denominator needs (B, N, N) similarities; forward and backward together
peak at about five float32 (N, N) matrices per image (the positives' numerator is O(N E)). At
768 px with patch 16, N = 2304: one matrix is ~21 MB, an image ~100-120 MB (measured on CPU),
so a batch of 32 images needs ~3.5 GB on top of the model; size the batch accordingly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

DICE_SMOOTH = 1e-6
"""Additive smoothing s of the Dice term (the official value); keeps it defined (= 0) for an
empty mask predicted empty."""

CONTRASTIVE_VARIANTS = ("official", "supcon")
"""``official``: the published loss (default); ``supcon``: self-free SupCon denominator."""


def selfment_loss(
    logits: torch.Tensor,
    emb: torch.Tensor,
    labels: torch.Tensor,
    *,
    sim_weight: float = 0.1,
    temperature: float = 0.05,
    valid: torch.Tensor | None = None,
    contrastive: str = "official",
) -> dict[str, torch.Tensor]:
    """Selfment loss of a batch of images.

    Args:
        logits: (B, N, 2) head logits per patch, channel 1 = foreground.
        emb: (B, N, E) patch embeddings (normalised here).
        labels: (B, N) pseudo-mask; bool or 0/1 numbers (non-zero = foreground).
        sim_weight: weight of the contrastive term in ``total``.
        temperature: contrastive temperature T.
        valid: optional (B, N) bool mask; False marks padding patches, which take part in no
            term (their values must still be finite). Images without any valid patch are left
            out of the batch averages.
        contrastive: ``"official"`` (default) or ``"supcon"``; see the module docstring.

    Returns:
        dict of scalar float32 (float64 for float64 logits) tensors ``total``, ``bce``, ``dice``, ``contrastive`` on the
        inputs' device; only ``total`` is meant for ``backward()``, the others share its graph.
    """
    _check_shapes(logits, emb, labels, valid)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if contrastive not in CONTRASTIVE_VARIANTS:
        raise ValueError(f"contrastive must be one of {CONTRASTIVE_VARIANTS}, got {contrastive!r}")
    # float32 at least (also under autocast); float64 inputs stay float64 (reference checks).
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    with torch.autocast(device_type=logits.device.type, enabled=False):
        logits = logits.to(dtype)
        emb = emb.to(dtype)
        fg = labels != 0 if labels.dtype != torch.bool else labels
        y = fg.to(dtype)
        if valid is None:
            valid = torch.ones_like(fg)
        valid = valid.to(torch.bool)
        w = valid.to(dtype)
        n_valid = w.sum(-1)  # (B,)

        # BCE on the foreground logit, Dice on the foreground probability (per image).
        bce_px = F.binary_cross_entropy_with_logits(logits[..., 1], y, reduction="none")
        bce = torch.where(valid, bce_px, torch.zeros_like(bce_px)).sum(-1) / n_valid.clamp_min(1)
        prob = torch.softmax(logits, dim=-1)[..., 1]
        prob = torch.where(valid, prob, torch.zeros_like(prob))
        yw = y * w
        dice = 1 - (2 * (prob * yw).sum(-1) + DICE_SMOOTH) / (prob.sum(-1) + yw.sum(-1) + DICE_SMOOTH)

        contrastive_fn = _official_contrastive if contrastive == "official" else _supcon
        con = contrastive_fn(emb, fg, valid, temperature)

        # Average over the images that have at least one valid patch.
        has_patches = n_valid > 0
        n_img = has_patches.sum().clamp_min(1)

        def batch_mean(per_image: torch.Tensor) -> torch.Tensor:
            return torch.where(has_patches, per_image, torch.zeros_like(per_image)).sum() / n_img

        out = {"bce": batch_mean(bce), "dice": batch_mean(dice), "contrastive": batch_mean(con)}
        out["total"] = out["bce"] + out["dice"] + sim_weight * out["contrastive"]
    return out


def _class_sums(z: torch.Tensor, fg: torch.Tensor, valid: torch.Tensor):
    """Per anchor: the sum of its similarities to its own class (itself included, unscaled),
    its own similarity z_i.z_i, and its class size; all (B, N)."""
    in_fg, in_bg = (fg & valid).to(z.dtype), (~fg & valid).to(z.dtype)
    class_sum = torch.where(fg[..., None], torch.bmm(in_fg[:, None], z), torch.bmm(in_bg[:, None], z))
    class_count = torch.where(fg, in_fg.sum(-1, keepdim=True), in_bg.sum(-1, keepdim=True))
    return (z * class_sum).sum(-1), (z * z).sum(-1), class_count


def _official_contrastive(emb: torch.Tensor, fg: torch.Tensor, valid: torch.Tensor,
                          temperature: float) -> torch.Tensor:
    """Per-image official contrastive loss, (B,) float32 (see the module docstring).

    mean_{p in P(i)} log softmax_i[p] = (sum_{p in P(i)} S_ip) / |P(i)| - logsumexp_a S_ia, so the
    positives are summed in O(N E); only the denominator needs the (B, N, N) similarities.
    """
    z = F.normalize(emb, dim=-1) * valid[..., None]
    sim = torch.bmm(z / temperature, z.transpose(1, 2))  # (B, N, N)
    # Full row over the valid patches, self included. A finite fill (not -inf) keeps padded rows
    # free of NaN in backward too; they are dropped below.
    pair = valid[:, :, None] & valid[:, None, :]
    log_denom = torch.logsumexp(sim.masked_fill_(~pair, torch.finfo(sim.dtype).min), dim=-1)
    same, self_sim, class_count = _class_sums(z, fg, valid)
    n_pos = (class_count - 1).clamp_min(1)
    per_anchor = log_denom - (same - self_sim) / temperature / n_pos  # (B, N)
    per_anchor = torch.where(valid, per_anchor, torch.zeros_like(per_anchor))
    n_fg = (fg & valid).sum(-1)
    n_bg = (~fg & valid).sum(-1)
    loss = per_anchor.sum(-1) / valid.sum(-1).clamp_min(1)
    # Official rule: no contrastive term unless both classes have at least 2 patches.
    return torch.where((n_fg >= 2) & (n_bg >= 2), loss, torch.zeros_like(loss))


def _supcon(emb: torch.Tensor, fg: torch.Tensor, valid: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-image SupCon (L_out) loss, (B,) float32; 0 for images with no anchor having a positive.
    The ``contrastive="supcon"`` option, not the official loss.

    Only the denominator needs the (B, N, N) similarities; the positives' numerator is summed in
    O(N E): sum_{p in P(i)} z_i.z_p = z_i . (sum of the unit embeddings of i's class) - z_i.z_i.
    """
    n = emb.shape[1]
    z = F.normalize(emb, dim=-1) * valid[..., None]
    sim = torch.bmm(z / temperature, z.transpose(1, 2))  # (B, N, N)

    # Denominator over a != i, both valid. A finite fill (not -inf) keeps rows without any
    # partner free of NaN, in backward too; such rows have no positive and are dropped below.
    not_self = ~torch.eye(n, dtype=torch.bool, device=emb.device)
    pair = valid[:, :, None] & valid[:, None, :] & not_self
    log_denom = torch.logsumexp(sim.masked_fill_(~pair, torch.finfo(sim.dtype).min), dim=-1)  # (B, N)

    # Numerator: similarities to the positives P(i) = {p != i valid, same label as i}.
    same, self_sim, class_count = _class_sums(z, fg, valid)
    pos_sim = (same - self_sim) / temperature  # (B, N)
    n_pos = (class_count - 1) * valid

    anchor = n_pos > 0
    per_anchor = -(pos_sim - n_pos * log_denom) / n_pos.clamp_min(1)
    per_anchor = torch.where(anchor, per_anchor, torch.zeros_like(per_anchor))
    return per_anchor.sum(-1) / anchor.sum(-1).clamp_min(1)


def _check_shapes(logits, emb, labels, valid) -> None:
    if logits.dim() != 3 or logits.shape[-1] != 2:
        raise ValueError(f"logits must be (B, N, 2), got {tuple(logits.shape)}")
    b, n = logits.shape[:2]
    if emb.dim() != 3 or tuple(emb.shape[:2]) != (b, n):
        raise ValueError(f"emb must be (B, N, E) = ({b}, {n}, E), got {tuple(emb.shape)}")
    if tuple(labels.shape) != (b, n):
        raise ValueError(f"labels must be (B, N) = ({b}, {n}), got {tuple(labels.shape)}")
    if valid is not None and tuple(valid.shape) != (b, n):
        raise ValueError(f"valid must be (B, N) = ({b}, {n}), got {tuple(valid.shape)}")
