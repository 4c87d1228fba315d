"""Backbone: every DINO family builds and gives unit-norm (B,h,w,C) features; random weights are
deterministic; checkpoints (timm and original-repo layouts; local and S3) load safely."""
from __future__ import annotations

import argparse
import functools
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from selfment_dist.model import backbone as bb
from selfment_dist.model.backbone import (DEFAULT_BACKBONE, Backbone, CheckpointError, backbone_family,
                                    build_backbone, check_image_size, resize_square,
                                    supported_backbones)
from selfment_dist.model.backbone_names import KNOWN_BACKBONES, patch_size
from selfment_dist.validation import check_backbone_size

DINO = "vit_small_patch16_224.dino"
DINO8 = "vit_small_patch8_224.dino"
DINOV2 = "vit_small_patch14_dinov2.lvd142m"
DINOV2_REG = "vit_small_patch14_reg4_dinov2.lvd142m"

FAMILIES = [  # name, image_size, patch, prefix tokens (cls + registers)
    (DINO, 64, 16, 1),
    (DINO8, 32, 8, 1),
    (DINOV2, 56, 14, 1),
    (DINOV2_REG, 56, 14, 5),
    (DEFAULT_BACKBONE, 64, 16, 5),
]


@functools.lru_cache(maxsize=None)
def _random(name: str, image_size: int) -> Backbone:
    """One random-weight build per (name, size) for the whole module (builds cost ~1 s)."""
    return build_backbone(name, weights="random", image_size=image_size, device="cpu")


def _images(size: int, n: int = 2, seed: int = 0) -> np.ndarray:
    """uint8 (n, size, size, 3): a bright square on a noisy background."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 90, (n, size, size, 3), dtype=np.uint8)
    img[:, size // 4: 3 * size // 4, size // 4: 3 * size // 4] = (230, 60, 40)
    return img


def _state(backbone: Backbone) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in backbone.model.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# Families, shapes, determinism
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,size,patch,prefix", FAMILIES)
def test_family_builds_with_random_weights(name, size, patch, prefix):
    b = _random(name, size)
    grid = (size // patch, size // patch)
    assert (b.patch_size, b.embed_dim, b.grid, b.image_size) == (patch, 384, grid, size)
    assert b.model.num_prefix_tokens == prefix
    assert b.device == torch.device("cpu")
    assert not b.model.training and not any(p.requires_grad for p in b.model.parameters())
    assert b.describe() == {"name": name, "weights": "random", "image_size": size,
                            "patch_size": patch, "embed_dim": 384}

    feats = b(_images(size, n=3))
    assert feats.shape == (3, *grid, 384) and feats.dtype == torch.float32
    assert torch.allclose(feats.norm(dim=-1), torch.ones(3, *grid), atol=1e-5)
    assert not feats.is_inference()  # usable by a trainable head downstream
    assert name in supported_backbones()


def test_family_names():
    assert backbone_family(DINO) == "dino"
    assert backbone_family(DINOV2_REG) == "dinov2"
    assert backbone_family("vit_base_patch16_dinov3.lvd1689m") == "dinov3"
    with pytest.raises(ValueError, match="did you mean"):
        build_backbone("vit_small_patch16_dinov3.lvd1689", weights="random")
    with pytest.raises(ValueError, match="unsupported backbone"):
        build_backbone("resnet50.a1_in1k", weights="random")


def test_random_weights_are_deterministic_and_leave_caller_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    fresh = build_backbone(DEFAULT_BACKBONE, weights="random", image_size=64, device="cpu")
    assert torch.equal(torch.rand(3), expected)  # the caller's RNG stream is untouched

    cached = _random(DEFAULT_BACKBONE, 64)
    x = _images(64)
    assert torch.equal(fresh(x), cached(x))
    for (k, v), (k2, v2) in zip(_state(fresh).items(), _state(cached).items()):
        assert k == k2 and torch.equal(v, v2), k


def test_random_weights_do_not_depend_on_image_size():
    """Built at timm's default size and resampled: only the position embedding differs."""
    small, large = _random(DINOV2, 56), _random(DINOV2, 112)
    s, l = _state(small), _state(large)
    assert s.keys() == l.keys()
    assert s["pos_embed"].shape != l["pos_embed"].shape
    assert all(torch.equal(s[k], l[k]) for k in s if k != "pos_embed")
    assert large(_images(112)).shape == (2, 8, 8, 384)


@pytest.mark.parametrize("name,size,hint", [
    (DEFAULT_BACKBONE, 100, "96 or 112"),
    (DINOV2, 500, "490 or 504"),
    (DINO8, 4, "use 8"),
    (DINO, 0, "use 16"),
])
def test_bad_image_size(name, size, hint):
    with pytest.raises(ValueError, match=f"image_size {size} .*patch size .*{hint}"):
        build_backbone(name, weights="random", image_size=size)
    # The driver's torch-free check (a name timm knew) says the same (a size below 1 is the
    # settings model's to report).
    assert check_backbone_size(name, size) == ([_message(name, size)] if size >= 1 else [])


def _message(name: str, size: int) -> str:
    with pytest.raises(ValueError) as info:
        check_image_size(name, size)
    return str(info.value)


def test_the_drivers_list_of_names_is_what_timm_builds():
    """backbone_names.KNOWN_BACKBONES answers drivers without timm: each name must be one the
    installed timm builds (a newer timm may build more: those go to timm); names not on the
    list, typos among them, get timm's answer with its hint."""
    assert KNOWN_BACKBONES <= set(supported_backbones())
    assert {patch_size(n) for n in KNOWN_BACKBONES} == {8, 14, 16}
    assert check_backbone_size("vit_small_patch16_224.dinoo", 64)[0].startswith(
        "unsupported backbone 'vit_small_patch16_224.dinoo'")  # through timm: with its hint
    assert "did you mean vit_small_patch16_224.dino" in check_backbone_size(
        "vit_small_patch16_224.dinoo", 64)[0]


# ---------------------------------------------------------------------------------------------
# Inputs and preprocessing
# ---------------------------------------------------------------------------------------------

def test_numpy_and_torch_inputs_agree():
    b = _random(DEFAULT_BACKBONE, 64)
    x = _images(64)
    from_numpy = b(x)
    assert torch.equal(b(torch.from_numpy(x)), from_numpy)
    assert torch.equal(b(np.asfortranarray(x)), from_numpy)  # non-contiguous is fine
    assert b(x[:0]).shape == (0, 4, 4, 384)


def test_precision():
    fp32 = _random(DEFAULT_BACKBONE, 64)
    assert fp32.precision == "fp32" and "precision='fp32'" in repr(fp32)  # auto on CPU
    bf16 = Backbone(fp32.model, name=fp32.name, weights="random", image_size=64, device="cpu",
                    precision="bf16")
    x = _images(64)
    a, b = fp32(x), bf16(x)
    assert b.dtype == torch.float32 and torch.allclose(b.norm(dim=-1), torch.ones(2, 4, 4))
    assert not torch.equal(a, b)  # really ran in bf16 ...
    assert (a * b).sum(-1).min() > 0.98  # ... and gives nearly the same features
    assert bb.resolve_precision("auto", "cuda") == "fp32"  # official numerics on GPUs too
    with pytest.raises(ValueError, match="precision must be one of fp32, tf32, bf16, auto, got 'fp16'"):
        build_backbone(DINO, weights="random", image_size=64, precision="fp16")


@pytest.mark.parametrize("bad,err", [
    (np.zeros((2, 64, 64, 3), np.float64), "float32 in \\[0, 1\\] or uint8"),
    (torch.zeros((2, 64, 64, 3), dtype=torch.float16), "float32 in \\[0, 1\\] or uint8"),
    (np.zeros((64, 64, 3), np.uint8), r"\(B, 64, 64, 3\)"),
    (np.zeros((2, 3, 64, 64), np.uint8), r"\(B, 64, 64, 3\)"),
    (np.zeros((2, 80, 80, 3), np.uint8), r"\(B, 64, 64, 3\)"),
])
def test_bad_inputs(bad, err):
    with pytest.raises(ValueError, match=err):
        _random(DEFAULT_BACKBONE, 64)(bad)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "I;16", "CMYK"])
def test_resize_square_any_mode(mode):
    image = Image.fromarray(_images(40, n=1)[0][:30]).convert(mode)  # 40x30, not square
    out = resize_square(image, 48)
    assert out.shape == (48, 48, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(out, resize_square(image.convert("RGB"), 48))


@pytest.mark.parametrize("size", [24, 48, 64])
def test_resize_square_is_the_official_transform(size):
    """torchvision's ToTensor then Resize((s, s), antialias=True), as the official code; down-
    and upsampling, from a non-square image."""
    tvt = pytest.importorskip("torchvision.transforms", reason="torchvision not installed")
    image = Image.fromarray(_images(40, n=1)[0][:30])
    expected = tvt.Compose([tvt.ToTensor(), tvt.Resize((size, size), antialias=True)])(image)
    np.testing.assert_allclose(resize_square(image, size), expected.permute(1, 2, 0).numpy(),
                               rtol=0, atol=1e-6)
    # Not the old path (uint8 bicubic, then /255): the order of the steps shows in the values.
    old = np.asarray(image.resize((size, size), Image.Resampling.BICUBIC), np.float32) / 255
    assert np.abs(resize_square(image, size) - old).max() > 1e-2


def test_backbone_takes_float_and_uint8_pixels_alike():
    backbone = _random(DEFAULT_BACKBONE, 64)
    u8 = _images(64)
    torch.testing.assert_close(backbone(u8), backbone(u8.astype(np.float32) / 255))


def test_hub_weights_go_through_timm_pretrained(monkeypatch):
    calls = []
    real = bb.timm.create_model

    def fake(name, pretrained=False, **kwargs):
        calls.append((name, pretrained, kwargs))
        return real(name, pretrained=False, **kwargs)

    monkeypatch.setattr(bb.timm, "create_model", fake)
    b = build_backbone(DINO, weights="hub", image_size=32, device="cpu")
    assert calls == [(DINO, True, {"num_classes": 0, "img_size": 32})]
    assert b.describe()["weights"] == "hub" and b.grid == (2, 2)

    def offline(name, pretrained=False, **kwargs):
        raise OSError("offline")

    monkeypatch.setattr(bb.timm, "create_model", offline)
    with pytest.raises(RuntimeError, match="pass weights=<checkpoint path or URI>"):
        build_backbone(DINO, weights="hub", image_size=32)


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------

def _save(state: dict, fs, path: str) -> None:
    if path.endswith(".safetensors"):
        from safetensors.torch import save
        data = save(state)
    else:
        import io
        buf = io.BytesIO()
        torch.save(state, buf)
        data = buf.getvalue()
    with fs.open(path, "wb") as f:
        f.write(data)


@pytest.mark.parametrize("name,size", [(DEFAULT_BACKBONE, 64), (DINO, 64)])
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_layout_checkpoint_local(tmp_path, name, size, suffix):
    src = _random(name, size)
    path = tmp_path / f"weights{suffix}"
    _save(_state(src), fsspec.filesystem("file"), str(path))
    loaded = build_backbone(name, weights=path, image_size=size, device="cpu")
    assert loaded.weights == str(path)
    x = _images(size)
    assert torch.equal(loaded(x), src(x))


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_layout_checkpoint_on_s3(s3_bucket, suffix):
    bucket, storage_options = s3_bucket
    src = _random(DEFAULT_BACKBONE, 64)
    uri = f"s3://{bucket}/ckpt/dinov3{suffix}"
    fs, path = fsspec.core.url_to_fs(uri, **storage_options)
    _save(_state(src), fs, path)
    loaded = build_backbone(DEFAULT_BACKBONE, weights=uri, image_size=64, device="cpu",
                            storage_options=storage_options)
    assert loaded.describe()["weights"] == uri
    x = _images(64)
    assert torch.equal(loaded(x), src(x))


def test_checkpoint_resamples_position_embedding(tmp_path):
    """A DINO v1 checkpoint at one size loads into a model at another (like 224 → 768)."""
    path = tmp_path / "dino64.safetensors"
    src = _random(DINO, 64)
    save_file(_state(src), str(path))
    loaded = build_backbone(DINO, weights=path, image_size=96, device="cpu")
    assert loaded(_images(96)).shape == (2, 6, 6, 384)
    # Values, not just the shape: the 4x4 patch grid of position embeddings resampled to 6x6
    # the way timm does it (bicubic, antialias), the cls slot untouched, the rest identical.
    from timm.layers import resample_abs_pos_embed

    pos = _state(src)["pos_embed"]
    want = resample_abs_pos_embed(pos, new_size=(6, 6), old_size=(4, 4), num_prefix_tokens=1,
                                  interpolation="bicubic", antialias=True)
    got = loaded.model.pos_embed.detach()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(got[:, :1], pos[:, :1], rtol=0, atol=0)
    assert not torch.allclose(got[:, 1:7], got[:, 7:13])  # a real 2-D resampling, not a copy
    state, ref = loaded.model.state_dict(), _state(src)
    assert all(torch.equal(state[k], ref[k]) for k in ref if k != "pos_embed")


def test_dino_v1_training_checkpoint(tmp_path):
    """facebookresearch/dino main_dino.py checkpoint: teacher (backbone.+head.), DDP student,
    optimizer, argparse args. The teacher backbone is what gets loaded."""
    src = _random(DINO, 64)
    state = _state(src)
    ckpt = {
        "student": {**{f"module.backbone.{k}": v + 1 for k, v in state.items()},
                    "module.head.mlp.0.weight": torch.zeros(8, 384)},
        "teacher": {**{f"backbone.{k}": v for k, v in state.items()},
                    "head.mlp.0.weight": torch.zeros(8, 384),
                    "head.last_layer.weight_g": torch.ones(16, 1)},
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]},
        "epoch": 100,
        "args": argparse.Namespace(arch="vit_small", patch_size=16, out_dim=65536),
        "dino_loss": {"center": torch.zeros(1, 65536)},
    }
    path = tmp_path / "checkpoint.pth"
    torch.save(ckpt, path)
    loaded = build_backbone(DINO, weights=path, image_size=64, device="cpu")
    x = _images(64)
    assert torch.equal(loaded(x), src(x))


def test_dinov2_original_layout_with_registers_and_chunks(tmp_path):
    """facebookresearch/dinov2 teacher_checkpoint.pth: {teacher: backbone.* (chunked blocks,
    register_tokens, pos_embed with the cls slot, mask_token), dino_head.*, ibot_head.*}."""
    src = _random(DINOV2_REG, 56)
    state = _state(src)
    teacher = {
        "backbone.cls_token": state["cls_token"],  # cls + pos[:, 0]; pos[:, 0] = 0 keeps it exact
        "backbone.pos_embed": torch.cat([torch.zeros(1, 1, 384), state["pos_embed"]], dim=1),
        "backbone.register_tokens": state["reg_token"],
        "backbone.mask_token": torch.zeros(1, 384),
        "dino_head.mlp.0.weight": torch.zeros(8, 384),
        "ibot_head.mlp.0.weight": torch.zeros(8, 384),
    }
    for k, v in state.items():
        if k.startswith("blocks."):
            i = int(k.split(".")[1])
            teacher["backbone." + k.replace(f"blocks.{i}.", f"blocks.{i // 3}.{i}.", 1)] = v
        elif k.startswith(("patch_embed.", "norm.")):
            teacher["backbone." + k] = v
    path = tmp_path / "teacher_checkpoint.pth"
    torch.save({"teacher": teacher}, path)
    loaded = build_backbone(DINOV2_REG, weights=path, image_size=56, device="cpu")
    x = _images(56)
    assert torch.allclose(loaded(x), src(x), atol=1e-6)


def _dinov3_original(src, *, qkv_bias=None, periods=None) -> dict:
    """timm state of ``src`` → facebookresearch/dinov3 layout, with random non-zero values in
    every tensor that the conversion drops (mask token) or must check (rope periods, q/v bias)."""
    g = torch.Generator().manual_seed(1)
    model_periods = src.model.rope.periods.clone()
    original = {"mask_token": torch.randn(1, 384, generator=g),
                "rope_embed.periods": model_periods if periods is None else periods}
    for k, v in _state(src).items():
        k = (k.replace("reg_token", "storage_tokens")
             .replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma"))
        original[k] = v
        if k.endswith("attn.qkv.weight"):
            mask = torch.ones(3 * 384)
            mask[384:768] = 0  # the k part is masked out, as in DINOv3
            bias = torch.randn(3 * 384, generator=g) * (1 - mask) if qkv_bias is None else qkv_bias
            original[k.replace("weight", "bias")] = bias
            original[k.replace("weight", "bias_mask")] = mask
    return original


def test_dinov3_original_layout(tmp_path):
    """facebookresearch/dinov3 hub-style backbone: storage_tokens, ls1/ls2.gamma, masked qkv
    bias, rope_embed.periods, mask_token; random non-zero values everywhere, and a non-zero bias
    only where the mask zeroes it (k), so the features must be identical."""
    src = _random(DEFAULT_BACKBONE, 64)
    path = tmp_path / "dinov3_vits16_pretrain.pth"
    torch.save(_dinov3_original(src), path)
    loaded = build_backbone(DEFAULT_BACKBONE, weights=path, image_size=64, device="cpu")
    x = _images(64)
    assert torch.equal(loaded(x), src(x))


@pytest.mark.parametrize("what", ["qkv_bias", "periods"])
def test_dinov3_tensors_timm_would_drop_must_be_harmless(tmp_path, what):
    src = _random(DEFAULT_BACKBONE, 64)
    g = torch.Generator().manual_seed(2)
    if what == "qkv_bias":  # a real q/v bias: ViT-S without qkv bias cannot represent it
        state = _dinov3_original(src, qkv_bias=torch.randn(3 * 384, generator=g))
        match = "qkv.bias holds non-zero q/v biases.*vit_small_patch16_dinov3_qkvb.lvd1689m"
    else:
        state = _dinov3_original(src, periods=src.model.rope.periods * 1.5)
        match = "rope periods"
    path = tmp_path / "dinov3.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=match):
        build_backbone(DEFAULT_BACKBONE, weights=path, image_size=64, device="cpu")


class _Payload:
    """Pickles to a call of _touch: what a malicious checkpoint would run on load."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (_touch, (str(self.marker),))


def _touch(path: str) -> None:
    Path(path).write_text("code ran")


def test_pickled_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": _state(_random(DINO, 64)), "extra": _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        build_backbone(DINO, weights=path, image_size=64)
    assert not marker.exists()


def test_mismatched_checkpoint_names_the_keys(tmp_path):
    state = _state(_random(DINO, 64))
    state.pop("norm.weight")
    state["decoder.extra.weight"] = torch.zeros(3)
    state["blocks.0.norm1.bias"] = torch.zeros(10)
    path = tmp_path / "broken.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError) as info:
        build_backbone(DINO, weights=path, image_size=64)
    msg = str(info.value)
    assert "missing keys: norm.weight" in msg
    assert "unexpected keys: decoder.extra.weight" in msg
    assert "blocks.0.norm1.bias: checkpoint (10,) vs model (384,)" in msg
    assert str(path) in msg and DINO in msg


def test_missing_checkpoint_and_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="'hub', 'random' or a checkpoint"):
        build_backbone(DINO, weights=tmp_path / "nope.pth", image_size=64)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="safetensors"):
        build_backbone(DINO, weights=junk, image_size=64)
    garbled = tmp_path / "garbled.pth"
    torch.save({"patch_embed.proj.weight": torch.zeros(7)}, garbled)
    with pytest.raises(CheckpointError, match="cannot convert"):
        build_backbone(DINO, weights=garbled, image_size=64)
    empty = tmp_path / "empty.pth"
    torch.save({"epoch": 3}, empty)
    with pytest.raises(CheckpointError, match="no state dict"):
        build_backbone(DINO, weights=empty, image_size=64)
