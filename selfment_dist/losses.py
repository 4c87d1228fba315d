"""The Selfment training loss: BCE + Dice + sim_weight x supervised contrastive, per image.

For one image with patches i = 1..N, foreground logit l_i = logits[i, 1], probability
p_i = softmax(logits[i])[1], label y_i in {0, 1} and unit embedding z_i = emb_i / |emb_i|:

    bce         = mean_i BCEWithLogits(l_i, y_i)
    dice        = 1 - (2 sum_i p_i y_i + s) / (sum_i p_i + sum_i y_i + s),   s = DICE_SMOOTH = 1
    contrastive = mean over anchors i with |P(i)| > 0 of
                  -1/|P(i)| sum_{p in P(i)} log( exp(z_i.z_p / T) / sum_{a != i} exp(z_i.z_a / T) )
                  with P(i) = {p != i : y_p = y_i}   (SupCon "L_out", Khosla et al. 2020);
                  0 for an image without such an anchor.
    total       = bce + dice + sim_weight * contrastive

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

DICE_SMOOTH = 1.0
"""Additive smoothing s of the Dice term; keeps it defined (= 0) for an empty mask predicted empty."""


def selfment_loss(
    logits: torch.Tensor,
    emb: torch.Tensor,
    labels: torch.Tensor,
    *,
    sim_weight: float = 0.1,
    temperature: float = 0.05,
    valid: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Selfment loss of a batch of images.

    Args:
        logits: (B, N, 2) head logits per patch, channel 1 = foreground.
        emb: (B, N, E) patch embeddings (normalised here).
        labels: (B, N) pseudo-mask; bool or 0/1 numbers (non-zero = foreground).
        sim_weight: weight of the contrastive term in ``total``.
        temperature: SupCon temperature.
        valid: optional (B, N) bool mask; False marks padding patches, which take part in no
            term (their values must still be finite). Images without any valid patch are left
            out of the batch averages.

    Returns:
        dict of scalar float32 tensors ``total``, ``bce``, ``dice``, ``contrastive`` on the
        inputs' device; only ``total`` is meant for ``backward()``, the others share its graph.
    """
    _check_shapes(logits, emb, labels, valid)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    with torch.autocast(device_type=logits.device.type, enabled=False):
        logits = logits.float()
        emb = emb.float()
        fg = labels != 0 if labels.dtype != torch.bool else labels
        y = fg.float()
        if valid is None:
            valid = torch.ones_like(fg)
        valid = valid.to(torch.bool)
        w = valid.float()
        n_valid = w.sum(-1)  # (B,)

        # BCE on the foreground logit, Dice on the foreground probability (per image).
        bce_px = F.binary_cross_entropy_with_logits(logits[..., 1], y, reduction="none")
        bce = torch.where(valid, bce_px, torch.zeros_like(bce_px)).sum(-1) / n_valid.clamp_min(1)
        prob = torch.softmax(logits, dim=-1)[..., 1]
        prob = torch.where(valid, prob, torch.zeros_like(prob))
        yw = y * w
        dice = 1 - (2 * (prob * yw).sum(-1) + DICE_SMOOTH) / (prob.sum(-1) + yw.sum(-1) + DICE_SMOOTH)

        contrastive = _supcon(emb, fg, valid, temperature)

        # Average over the images that have at least one valid patch.
        has_patches = n_valid > 0
        n_img = has_patches.sum().clamp_min(1)

        def batch_mean(per_image: torch.Tensor) -> torch.Tensor:
            return torch.where(has_patches, per_image, torch.zeros_like(per_image)).sum() / n_img

        out = {"bce": batch_mean(bce), "dice": batch_mean(dice), "contrastive": batch_mean(contrastive)}
        out["total"] = out["bce"] + out["dice"] + sim_weight * out["contrastive"]
    return out


def _supcon(emb: torch.Tensor, fg: torch.Tensor, valid: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-image SupCon (L_out) loss, (B,) float32; 0 for images with no anchor having a positive.

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
    in_fg, in_bg = (fg & valid).float(), (~fg & valid).float()
    class_sum = torch.where(fg[..., None], torch.bmm(in_fg[:, None], z), torch.bmm(in_bg[:, None], z))
    pos_sim = ((z * class_sum).sum(-1) - (z * z).sum(-1)) / temperature  # (B, N)
    class_count = torch.where(fg, in_fg.sum(-1, keepdim=True), in_bg.sum(-1, keepdim=True))
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
