"""PatchHead shapes and selfment_loss against a slow float64 per-image reference.

The reference restates the official definitions (geshang777/Selfment ``train.py``:
``contrastive_loss_full_patch``, ``dice_loss`` with 1e-6, BCE on logits[:, 1]) with plain loops,
independently of our vectorised code and of its constants.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from selfment_dist.model.head import HIDDEN_DIM, PatchHead
from selfment_dist.model.losses import selfment_loss

OFFICIAL_DICE_SMOOTH = 1e-6  # written out: the test must not follow our constant


def _assert_close(actual, expected, *, rtol=1e-5, atol=1e-6):
    # Not torch.testing.assert_close: its first call imports torch.distributed (seconds).
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert torch.allclose(actual, expected, rtol=rtol, atol=atol), (actual, expected)


# ----------------------------------------------------------------------------------------------
# Head


@pytest.mark.parametrize("lead", [(7,), (2, 5), (2, 3, 4)])
def test_head_shapes(lead):
    head = PatchHead(24, embed_dim=16)
    logits, emb = head(torch.randn(*lead, 24))
    assert logits.shape == (*lead, 2)
    assert emb.shape == (*lead, 16)
    feats = torch.randn(*lead, 24)
    sal = head.saliency(feats)
    assert sal.shape == lead and sal.dtype == torch.float32
    _assert_close(sal, torch.softmax(head(feats)[0], -1)[..., 1])


def test_head_architecture_and_defaults():
    head = PatchHead(384)
    assert head.embed_dim == 128
    n_params = sum(p.numel() for p in head.parameters())
    assert n_params == (384 * HIDDEN_DIM + HIDDEN_DIM) + (HIDDEN_DIM * 128 + 128) + (128 * 2 + 2)
    feats = torch.randn(3, 384)
    logits, emb = head(feats)
    # The embedding is the MLP output; the logits are a linear map of it.
    _assert_close(logits, head.classifier(emb))
    _assert_close(head.saliency(feats), torch.softmax(logits, -1)[..., 1])


def test_head_casts_half_features_and_checks_channels():
    head = PatchHead(8, embed_dim=4)
    feats = torch.randn(2, 3, 8)
    logits16, _ = head(feats.half())
    assert logits16.dtype == torch.float32
    _assert_close(logits16, head(feats.half().float())[0])
    with pytest.raises(ValueError, match="8 channels"):
        head(torch.randn(2, 3, 9))
    with pytest.raises(ValueError):
        PatchHead(0)


# ----------------------------------------------------------------------------------------------
# Loss: a deliberately slow reference, loops and float64, straight from the definitions.


def _reference_image(logits, emb, labels, sim_weight, temperature, variant="official"):
    logits = np.asarray(logits, dtype=np.float64)
    emb = np.asarray(emb, dtype=np.float64)
    y = [1.0 if v else 0.0 for v in np.asarray(labels)]
    n = len(y)
    bce = 0.0
    p = []
    for i in range(n):
        l1 = logits[i, 1]
        # -[y log sigmoid(l) + (1 - y) log(1 - sigmoid(l))] = softplus(l) - y l
        bce += max(l1, 0.0) + math.log1p(math.exp(-abs(l1))) - y[i] * l1
        m = max(logits[i])
        p.append(math.exp(logits[i, 1] - m) / (math.exp(logits[i, 0] - m) + math.exp(logits[i, 1] - m)))
    bce /= n
    inter = sum(p[i] * y[i] for i in range(n))
    dice = 1 - (2 * inter + OFFICIAL_DICE_SMOOTH) / (sum(p) + sum(y) + OFFICIAL_DICE_SMOOTH)

    z = [e / np.linalg.norm(e) for e in emb]
    if variant == "official":
        return bce, dice, _official_contrastive(z, y, temperature)
    anchor_losses = []
    for i in range(n):
        positives = [j for j in range(n) if j != i and y[j] == y[i]]
        if not positives:
            continue
        denom = sum(math.exp(float(z[i] @ z[a]) / temperature) for a in range(n) if a != i)
        terms = [float(z[i] @ z[j]) / temperature - math.log(denom) for j in positives]
        anchor_losses.append(-sum(terms) / len(terms))
    contrastive = sum(anchor_losses) / len(anchor_losses) if anchor_losses else 0.0
    return bce, dice, contrastive


def _official_contrastive(z, y, temperature):
    """The official loss: 0 unless both classes have >= 2 patches; log-softmax over each full row
    (self included); per anchor the mean -log p over its positives; mean over all anchors."""
    n = len(y)
    if sum(y) < 2 or n - sum(y) < 2:
        return 0.0
    total = 0.0
    for i in range(n):
        row = [float(z[i] @ z[a]) / temperature for a in range(n)]
        top = max(row)
        log_norm = top + math.log(sum(math.exp(r - top) for r in row))
        positives = [j for j in range(n) if j != i and y[j] == y[i]]
        total += -sum(row[j] - log_norm for j in positives) / len(positives)
    return total / n


def _reference(logits, emb, labels, valid=None, sim_weight=0.1, temperature=0.05,
               variant="official"):
    per_image = []
    for b in range(logits.shape[0]):
        keep = np.ones(logits.shape[1], bool) if valid is None else valid[b].numpy()
        if not keep.any():
            continue
        per_image.append(
            _reference_image(logits[b][keep].numpy(), emb[b][keep].numpy(), labels[b][keep].numpy(),
                             sim_weight, temperature, variant)
        )
    bce, dice, con = (sum(t[k] for t in per_image) / len(per_image) for k in range(3))
    return {"bce": bce, "dice": dice, "contrastive": con, "total": bce + dice + sim_weight * con}


def _batch(b, n, e, seed, fg_prob=0.4):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, n, 2, generator=g) * 3
    emb = torch.randn(b, n, e, generator=g)
    labels = torch.rand(b, n, generator=g) < fg_prob
    return logits, emb, labels


def _assert_matches(out, ref, dtype=torch.float32):
    # float32 carries ~7 digits (and logsumexp of values up to 1/T = 20); float64 is held to 1e-9.
    tol = 1e-5 if dtype == torch.float32 else 1e-9
    for key in ("total", "bce", "dice", "contrastive"):
        assert out[key].dim() == 0 and out[key].dtype == dtype, key
        assert abs(out[key].item() - ref[key]) <= tol * max(1.0, abs(ref[key])), (key, out[key].item(), ref[key])


@pytest.mark.parametrize(
    "b,n,e,seed", [(4, 23, 8, 0), (3, 40, 16, 1), (1, 12, 4, 2), (2, 1, 8, 3), (1, 1, 3, 4), (2, 2, 5, 5)]
)
def test_loss_matches_reference(b, n, e, seed):
    logits, emb, labels = _batch(b, n, e, seed)
    _assert_matches(selfment_loss(logits, emb, labels), _reference(logits, emb, labels))


@pytest.mark.parametrize(
    "b,n,e,seed", [(4, 23, 8, 0), (3, 40, 16, 1), (1, 12, 4, 2), (2, 1, 8, 3), (2, 2, 5, 5)]
)
def test_loss_matches_official_in_float64(b, n, e, seed):
    logits, emb, labels = _batch(b, n, e, seed)
    out = selfment_loss(logits.double(), emb.double(), labels)
    _assert_matches(out, _reference(logits, emb, labels), dtype=torch.float64)


def test_loss_all_foreground_and_all_background_images():
    logits, emb, labels = _batch(6, 15, 6, 7)
    labels[0] = True   # all foreground
    labels[1] = False  # all background
    labels[2] = False
    labels[2, 4] = True  # a single foreground patch: no contrastive term for the image
    labels[3] = True
    labels[3, :2] = False  # exactly two background patches: the term is there
    labels[4] = True
    labels[4, 7] = False  # a single background patch
    labels[5, :] = False
    labels[5, :2] = True   # two foreground patches
    out = selfment_loss(logits, emb, labels)
    _assert_matches(out, _reference(logits, emb, labels))
    _assert_matches(selfment_loss(logits.double(), emb.double(), labels),
                    _reference(logits, emb, labels), dtype=torch.float64)
    # Per image: the one-patch classes give exactly 0, the two-patch ones do not.
    per_image = [selfment_loss(logits[i:i + 1], emb[i:i + 1], labels[i:i + 1])["contrastive"].item()
                 for i in range(6)]
    assert per_image[0] == per_image[1] == per_image[2] == per_image[4] == 0.0
    assert per_image[3] > 0 and per_image[5] > 0


def test_dice_smoothing_is_official():
    # An empty mask with p = 0.5 everywhere: 1 - s / (2 + s) is ~1 with s = 1e-6 and 2/3 with the
    # old s = 1. Pins the constant through behaviour.
    logits = torch.zeros(1, 4, 2, dtype=torch.float64)
    emb = torch.randn(1, 4, 3, dtype=torch.float64)
    labels = torch.zeros(1, 4, dtype=torch.bool)
    expected = 1 - OFFICIAL_DICE_SMOOTH / (2.0 + OFFICIAL_DICE_SMOOTH)
    got = selfment_loss(logits, emb, labels)["dice"].item()
    assert got == pytest.approx(expected, rel=1e-12)


def test_supcon_variant_is_kept_as_an_option():
    logits, emb, labels = _batch(4, 23, 8, 0)
    labels[1] = False
    labels[1, 3] = True  # one-patch class: SupCon still scores the other class's anchors
    out = selfment_loss(logits.double(), emb.double(), labels, contrastive="supcon")
    _assert_matches(out, _reference(logits, emb, labels, variant="supcon"), dtype=torch.float64)
    official = selfment_loss(logits, emb, labels)["contrastive"].item()
    assert abs(out["contrastive"].item() - official) > 0.1
    with pytest.raises(ValueError, match="contrastive"):
        selfment_loss(logits, emb, labels, contrastive="nope")


def test_loss_options_and_label_dtypes():
    logits, emb, labels = _batch(3, 18, 8, 8)
    out = selfment_loss(logits, emb, labels, sim_weight=0.5, temperature=0.2)
    _assert_matches(out, _reference(logits, emb, labels, sim_weight=0.5, temperature=0.2))
    for as_type in (torch.int64, torch.uint8, torch.float32):
        other = selfment_loss(logits, emb, labels.to(as_type), sim_weight=0.5, temperature=0.2)
        for key in out:
            _assert_close(other[key], out[key])


def test_loss_valid_mask_matches_unpadded_reference():
    logits, emb, labels = _batch(3, 20, 8, 9)
    valid = torch.ones(3, 20, dtype=torch.bool)
    valid[0, 12:] = False
    valid[1, :3] = False
    valid[2] = False  # a fully padded image leaves the batch averages
    out = selfment_loss(logits, emb, labels, valid=valid)
    _assert_matches(out, _reference(logits, emb, labels, valid=valid))
    # Padding values do not matter.
    logits2, emb2 = logits.clone(), emb.clone()
    logits2[~valid] = 100.0
    emb2[~valid] = -3.0
    for key, value in selfment_loss(logits2, emb2, labels, valid=valid).items():
        _assert_close(value, out[key])


@pytest.mark.parametrize("b,n,fill", [(3, 17, None), (2, 1, None), (2, 9, True), (2, 9, False)])
def test_loss_gradients_finite(b, n, fill):
    logits, emb, labels = _batch(b, n, 8, 10)
    if fill is not None:
        labels[:] = fill
    logits.requires_grad_(True)
    emb.requires_grad_(True)
    selfment_loss(logits, emb, labels)["total"].backward()
    assert torch.isfinite(logits.grad).all() and torch.isfinite(emb.grad).all()
    assert logits.grad.abs().sum() > 0


def test_loss_gradients_through_head():
    head = PatchHead(12, embed_dim=8)
    feats = torch.randn(2, 30, 12)
    labels = torch.rand(2, 30) < 0.5
    logits, emb = head(feats)
    selfment_loss(logits, emb, labels)["total"].backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_contrastive_invariant_to_embedding_scale():
    logits, emb, labels = _batch(3, 25, 8, 11)
    base = selfment_loss(logits, emb, labels)["contrastive"]
    for scale in (1e-3, 0.5, 7.3, 1e3):
        _assert_close(selfment_loss(logits, emb * scale, labels)["contrastive"], base)


def test_contrastive_prefers_separated_embeddings():
    labels = torch.tensor([[True] * 6 + [False] * 6])
    logits = torch.zeros(1, 12, 2)
    separated = torch.where(labels[..., None], torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))
    mixed = torch.randn(1, 12, 2, generator=torch.Generator().manual_seed(0))
    assert (
        selfment_loss(logits, separated, labels)["contrastive"]
        < selfment_loss(logits, mixed, labels)["contrastive"]
    )


def test_loss_under_autocast_is_float32():
    logits, emb, labels = _batch(2, 16, 8, 12)
    low_logits, low_emb = logits.bfloat16(), emb.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = selfment_loss(low_logits, low_emb, labels)
    ref = selfment_loss(low_logits.float(), low_emb.float(), labels)
    for key in out:
        assert out[key].dtype == torch.float32
        _assert_close(out[key], ref[key])


def test_loss_shape_errors():
    logits, emb, labels = _batch(2, 5, 4, 13)
    with pytest.raises(ValueError, match="logits"):
        selfment_loss(logits[..., :1], emb, labels)
    with pytest.raises(ValueError, match="emb"):
        selfment_loss(logits, emb[:, :4], labels)
    with pytest.raises(ValueError, match="labels"):
        selfment_loss(logits, emb, labels[:, :4])
    with pytest.raises(ValueError, match="valid"):
        selfment_loss(logits, emb, labels, valid=labels[:1])
    with pytest.raises(ValueError, match="temperature"):
        selfment_loss(logits, emb, labels, temperature=0.0)
