"""Our defaults against the official Selfment code (geshang777/Selfment), restated plainly here:
IPO's degenerate updates, the importable head checkpoint, and ``selfment evaluate``'s fmax.

Losses: tests/test_head_losses.py; per-image metrics: tests/test_metrics.py.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from cli_output import printed_summary
from PIL import Image

from selfment_dist import ipo_refine
from selfment_dist.model.artifact import load_artifact
from selfment_dist.cli import main as cli_main
from selfment_dist.model.official_checkpoint import official_state_to_head
from selfment_dist.algorithm.reference import reference_ipo
from selfment_dist.model.segmenter import Segmenter
from selfment_dist.data.synthetic import make_patch_feature_batch

DINO = "vit_small_patch16_dinov3.lvd1689m"  # 384-channel features


# ----------------------------------------------------------------------------------------------
# IPO, as the official `_unsupervised_saliency_labels` after the NCut labels


def official_ipo(feats: np.ndarray, labels: np.ndarray, n_iter=20, sample_size=10) -> np.ndarray:
    """Plain restatement of the official loop (one image; feats (N, C), labels (N,) 0/1)."""
    x = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    labels = labels.astype(np.int64).copy()
    if labels.sum() == 0 or labels.sum() == labels.size:
        return labels
    ref = x[labels == 1].mean(0) - x[labels == 0].mean(0)
    for _ in range(n_iter):
        if (labels == 1).sum() < sample_size or (labels == 0).sum() < sample_size:
            break
        fg_mean, bg_mean = x[labels == 1].mean(0), x[labels == 0].mean(0)
        labels = (x @ fg_mean > x @ bg_mean).astype(np.int64)
        if labels.sum() == 0 or labels.sum() == labels.size:
            break
        if (x[labels == 1].mean(0) - x[labels == 0].mean(0)) @ ref < 0:
            labels = 1 - labels
    return labels


def _emptying_case(seed, n_fg=12, n_bg=28):
    """An update that makes every patch foreground: the start's foreground sits on direction
    e0, its background is split between +-80 degrees around e0, so every patch (all have a
    positive e0 component) is closer to the foreground mean than to the background mean."""
    rng = np.random.default_rng(seed)
    angle = np.deg2rad(80 + rng.uniform(-5, 5))
    sides = np.where(np.arange(n_bg) % 2 == 0, angle, -angle)
    fg = np.stack([np.ones(n_fg), np.zeros(n_fg)], 1)
    bg = np.stack([np.cos(sides), np.sin(sides)], 1)
    feats = np.concatenate([fg, bg]) + 0.02 * rng.normal(size=(n_fg + n_bg, 2))
    start = np.arange(n_fg + n_bg) < n_fg
    perm = rng.permutation(n_fg + n_bg)
    return feats[perm], start[perm]


def test_ipo_returns_degenerate_update_like_official():
    hits = 0
    for seed in range(40):
        feats, start = _emptying_case(seed=seed)
        want = official_ipo(feats, start).astype(bool)
        ours = ipo_refine(torch.from_numpy(feats[None, :, None]), torch.from_numpy(start[None, :, None]))
        np.testing.assert_array_equal(ours[0, :, 0].numpy(), want)
        np.testing.assert_array_equal(reference_ipo(feats[:, None], start[:, None])[:, 0], want)
        if want.all() or not want.any():
            hits += 1
    assert hits == 40  # the emptying update really happened in every case


@pytest.mark.parametrize("sample_size", [1, 10])
def test_ipo_matches_official_on_random_starts_and_empty_full_masks(sample_size):
    rng = np.random.default_rng(100 + sample_size)
    feats = make_patch_feature_batch(rng, 8, 9, 11, 16, noise=1.2)
    starts = rng.random((8, 9, 11)) > rng.uniform(0.1, 0.9, size=(8, 1, 1))
    starts[0] = True
    starts[1] = False
    starts[2] = False
    starts[2, 4, 4] = True  # one patch of foreground
    ours = ipo_refine(torch.from_numpy(feats), torch.from_numpy(starts), sample_size=sample_size)
    for f, s, o in zip(feats, starts, ours.numpy()):
        want = official_ipo(f.reshape(-1, 16).astype(np.float64), s.reshape(-1), sample_size=sample_size)
        np.testing.assert_array_equal(o.reshape(-1), want.astype(bool))


# ----------------------------------------------------------------------------------------------
# The official head checkpoint


class OfficialHead(torch.nn.Module):
    """The official architecture, written out: proj = Linear, ReLU, Linear; classifier."""

    def __init__(self, in_dim, embed_dim):
        super().__init__()
        self.proj = torch.nn.Sequential(torch.nn.Linear(in_dim, embed_dim), torch.nn.ReLU(),
                                        torch.nn.Linear(embed_dim, embed_dim))
        self.classifier = torch.nn.Linear(embed_dim, 2)

    def forward(self, x):
        emb = self.proj(x)
        return self.classifier(emb), emb


def _official(in_dim=384, embed_dim=64, seed=0) -> OfficialHead:
    torch.manual_seed(seed)
    head = OfficialHead(in_dim, embed_dim)
    with torch.no_grad():
        for p in head.parameters():  # random and non-zero everywhere (biases included)
            p.copy_(torch.randn_like(p) * 0.3 + 0.05)
    return head


def _save(path, head, **args):
    torch.save({"epoch": 3, "model_state": head.state_dict(), "optimizer_state": {},
                "args": {"dino_model_name": "dinov3_vits16", "img_size": 32, "embed_dim": 64,
                         "dino_type": "dinov3", **args}}, path)


def test_official_state_maps_to_identical_outputs():
    official = _official()
    ours = official_state_to_head(official.state_dict())
    feats = torch.nn.functional.normalize(torch.randn(5, 7, 384), dim=-1)
    (lo, eo), (lw, ew) = official(feats), ours(feats)
    torch.testing.assert_close(lw, lo, rtol=0, atol=0)
    torch.testing.assert_close(ew, eo, rtol=0, atol=0)


@pytest.mark.parametrize("key", ["proj.0.weight", "proj.0.bias", "proj.2.weight", "proj.2.bias",
                                 "classifier.weight", "classifier.bias"])
def test_every_tensor_must_map(key):
    state = _official().state_dict()
    dropped = {k: v for k, v in state.items() if k != key}
    with pytest.raises(ValueError, match=f"lacks {key}"):
        official_state_to_head(dropped)
    extra = {**state, "proj.4.weight": torch.ones(2, 2)}
    with pytest.raises(ValueError, match="not part of the official head: proj.4.weight"):
        official_state_to_head(extra)


def test_import_checkpoint_cli_then_segment(tmp_path, capsys):
    official = _official()
    ckpt = tmp_path / "checkpoint_epoch3.pth"
    _save(ckpt, official)
    out = tmp_path / "model"
    assert cli_main(["import-checkpoint", "--head", str(ckpt), "--output", str(out),
                     "--weights", "random"]) == 0
    summary = printed_summary(capsys.readouterr().out)
    assert summary["backbone"] == DINO and summary["embed_dim"] == 64
    assert summary["inference_image_size"] == 64  # twice the checkpoint's img_size

    head, meta = load_artifact(str(out))
    assert meta["inference_image_size"] == 64 and meta["image_size"] == 32
    feats = torch.nn.functional.normalize(torch.randn(3, 384), dim=-1)
    torch.testing.assert_close(head(feats)[0], official(feats)[0], rtol=0, atol=0)

    # It segments: the segmenter's saliency is the official head's softmax on the same features.
    seg = Segmenter.from_artifact(str(out))
    assert seg.image_size == 64
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(2, 64, 64, 3), dtype=np.uint8)
    sal = seg.saliency(images)
    with torch.no_grad():
        logits, _ = official(seg.backbone(images))
    np.testing.assert_allclose(sal, torch.softmax(logits, -1)[..., 1].numpy(), atol=1e-6)
    maps = seg.predict([Image.fromarray(images[0]).resize((50, 40))])
    assert maps[0].shape == (40, 50) and maps[0].dtype == np.uint8


def test_import_checkpoint_errors(tmp_path):
    from selfment_dist.model.official_checkpoint import import_official_checkpoint

    wrong_dim = tmp_path / "wrong.pth"
    _save(wrong_dim, _official(in_dim=768))
    with pytest.raises(ValueError, match="768-channel features but vit_small_patch16_dinov3"):
        import_official_checkpoint(head=str(wrong_dim), output=str(tmp_path / "m1"))
    pickled = tmp_path / "code.pth"
    torch.save({"model_state": _official().state_dict(), "args": object()}, pickled)
    with pytest.raises(ValueError, match="weights_only=True"):
        import_official_checkpoint(head=str(pickled), output=str(tmp_path / "m2"))
    with pytest.raises(FileNotFoundError):
        import_official_checkpoint(head=str(tmp_path / "nope.pth"), output=str(tmp_path / "m3"))
    # A bare state dict (no wrapper) is accepted; an explicit size wins.
    bare = tmp_path / "bare.pth"
    torch.save(_official().state_dict(), bare)
    summary = import_official_checkpoint(head=str(bare), output=str(tmp_path / "m4"),
                                         backbone=DINO, weights="random", image_size=48)
    assert summary["inference_image_size"] == 48


# ----------------------------------------------------------------------------------------------
# `selfment evaluate`: fmax is the official per-image mean


def official_fmax(preds, gts) -> float:
    """Official `compute_simple_metrics` F_max: per image, float32 maps in [0, 1], max over
    thresholds arange(0, 1, 1/255) of F (beta^2 = 0.3^2, eps 1e-7); summed, over n."""
    total = 0.0
    thresholds = torch.arange(0, 1, 1 / 255)
    for p, g in zip(preds, gts):
        pm = torch.from_numpy(p).float() / 255.0
        gm = torch.from_numpy(g).float() / 255.0 > 0.5
        best = 0.0
        for t in thresholds:
            b = pm > t
            tp = (b & gm).sum()
            prec, rec = tp / (b.sum() + 1e-7), tp / (gm.sum() + 1e-7)
            best = max(best, float((1 + 0.09) * prec * rec / (0.09 * prec + rec + 1e-7)))
        total += best
    return total / len(preds)


def test_evaluate_cli_fmax_is_official_per_image_mean(ray_local, tmp_path, capsys):
    rng = np.random.default_rng(3)
    preds, gts = [], []
    for i in range(10):
        h, w = 30, 40
        yy, xx = np.mgrid[:h, :w]
        d = np.hypot(yy - rng.uniform(8, 22), xx - rng.uniform(10, 30)) / rng.uniform(5, 12)
        gt = np.where(d < 1, 255, 0).astype(np.uint8)
        if i == 0:
            gt[:] = 0  # an empty ground truth
        # Very different confidence scales per image: per-image maxima and the averaged curve
        # disagree strongly.
        scale = rng.uniform(0.2, 1.0)
        pred = np.clip(255 * scale / (1 + np.exp(3 * (d - 1))) + rng.normal(0, 10, (h, w)), 0, 255)
        preds.append(pred.astype(np.uint8))
        gts.append(gt)
        (tmp_path / "preds").mkdir(exist_ok=True)
        (tmp_path / "masks").mkdir(exist_ok=True)
        Image.fromarray(preds[-1]).save(tmp_path / "preds" / f"k{i}.png")
        Image.fromarray(gt).save(tmp_path / "masks" / f"k{i}.png")
    assert cli_main(["evaluate", "--predictions", str(tmp_path / "preds"), "--masks",
                     str(tmp_path / "masks"), "--output", str(tmp_path / "out"),
                     "--num-shards", "3"]) == 0
    result = printed_summary(capsys.readouterr().out)
    scores = result["datasets"]["default"]["scores"]
    want = official_fmax(preds, gts)
    assert scores["fmax"] == pytest.approx(want, abs=1e-6)
    assert scores["fmax"] - scores["fmax_curve"] > 1e-3  # the two figures are told apart
