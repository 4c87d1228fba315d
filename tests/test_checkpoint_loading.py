"""Backbone checkpoints as the official runs hold them: the official DINOv3 layout with q/v
biases (ViT-S/B/L: ``qkv_bias=True, mask_k_bias=True``), and files as large as a 7B checkpoint
read without a second copy in memory."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import timm
import torch

from selfment_dist.model.backbone import CheckpointError, _FAMILIES, _load_into

DINOV3 = next(f for f in _FAMILIES if f.version == "dinov3")


def _tiny(arch: str) -> torch.nn.Module:
    """The timm model at one block and 32 px: the layout of the full model, cheap to build."""
    torch.manual_seed(0)
    return timm.create_model(arch, pretrained=False, num_classes=0, img_size=32, depth=1)


def official_layout(model: torch.nn.Module, *, seed: int = 1) -> dict[str, torch.Tensor]:
    """facebookresearch/dinov3 keys for ``model``'s tensors, with a masked ``qkv.bias`` whose q
    and v thirds are non-zero (and a non-zero k third that the mask removes)."""
    g = torch.Generator().manual_seed(seed)
    dim = model.embed_dim
    state: dict[str, torch.Tensor] = {"mask_token": torch.randn(1, dim, generator=g)}
    for key, value in model.state_dict().items():
        if key.endswith(("attn.q_bias", "attn.v_bias", "attn.k_bias")):
            continue
        key = (key.replace("reg_token", "storage_tokens")
               .replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma"))
        state[key] = torch.randn(value.shape, generator=g) * 0.02
        if key.endswith("attn.qkv.weight"):
            mask = torch.ones(3 * dim)
            mask[dim:2 * dim] = 0
            state[key.replace("weight", "bias")] = torch.randn(3 * dim, generator=g)
            state[key.replace("weight", "bias_mask")] = mask
    return state


@pytest.mark.parametrize("size", ["small", "base", "large"])
def test_official_qv_bias_is_loaded_or_refused_by_name(size):
    arch = f"vit_{size}_patch16_dinov3"
    name, qkvb_name = f"{arch}.lvd1689m", f"{arch}_qkvb.lvd1689m"
    state = official_layout(_tiny(f"{arch}_qkvb"))

    # The timm model without q/v biases refuses them, naming the one that has them.
    with pytest.raises(CheckpointError, match=f"non-zero q/v biases.*'{qkvb_name}'"):
        _load_into(_tiny(arch), dict(state), DINOV3, name=name, source="official.pth")

    # The _qkvb model takes them: q and v thirds as they are, k (masked, softmax-invariant) not.
    model = _tiny(f"{arch}_qkvb")
    _load_into(model, dict(state), DINOV3, name=qkvb_name, source="official.pth")
    bias, dim = state["blocks.0.attn.qkv.bias"], model.embed_dim
    assert torch.equal(model.blocks[0].attn.q_bias, bias[:dim])
    assert torch.equal(model.blocks[0].attn.v_bias, bias[2 * dim:])


def test_a_k_bias_alone_is_harmless():
    """Only the k third non-zero (and no mask): it adds q.b_k to a whole softmax row, so the
    model without biases loads it (timm drops it) with identical attention."""
    arch = "vit_small_patch16_dinov3"
    state = official_layout(_tiny(f"{arch}_qkvb"))
    for key in [k for k in state if k.endswith("qkv.bias_mask")]:
        del state[key]
    for key in [k for k in state if k.endswith("qkv.bias")]:
        dim = state[key].numel() // 3
        state[key] = torch.cat([torch.zeros(dim), torch.randn(dim), torch.zeros(dim)])
    _load_into(_tiny(arch), state, DINOV3, name=f"{arch}.lvd1689m", source="official.pth")


_WRITE = """
import sys, torch
n, numel = int(sys.argv[2]), int(sys.argv[3])
torch.save({"teacher": {f"blocks.{i}.w": torch.full((numel,), float(i)) for i in range(n)}},
           sys.argv[1])
"""

_READ = """
import resource, sys, torch
from selfment_dist.model.backbone import _read_checkpoint
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
state = _read_checkpoint(sys.argv[1], None)
mapped = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
total = sum(float(t[-1]) for t in state.values())  # every tensor reached
touched = sum(float(t.sum()) for t in state.values())  # every page read
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(len(state), total, (mapped - before) * 1024, (after - before) * 1024)
"""


@pytest.mark.slow  # writes and reads a 400 MB file
def test_a_large_checkpoint_is_mapped_not_read_twice(tmp_path):
    """A 400 MB torch.save file (a 7B checkpoint is 65 times that): opening it costs almost no
    memory, and reading every tensor costs at most about its size once (the old path held the
    bytes and the unpickled copy: twice the size)."""
    path = tmp_path / "big.pth"
    n, numel = 100, 1_000_000  # 100 tensors of 4 MB
    size = n * numel * 4
    subprocess.run([sys.executable, "-c", _WRITE, str(path), str(n), str(numel)], check=True,
                   timeout=300)
    assert path.stat().st_size >= size
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(_READ), str(path)], check=True,
                         capture_output=True, text=True, timeout=300).stdout.split()
    count, total, opened, touched = int(out[0]), float(out[1]), int(out[2]), int(out[3])
    assert count == n and total == sum(range(n))
    assert opened < 0.1 * size, f"opening grew the peak RSS by {opened / 2**20:.0f} MiB"
    assert touched < 1.25 * size, f"reading grew the peak RSS by {touched / 2**20:.0f} MiB"


def test_a_remote_checkpoint_goes_through_a_local_file():
    """fsspec URIs (memory:// here, s3:// in use) are streamed to a temporary file and mapped."""
    import io

    import fsspec

    from selfment_dist.model.backbone import _read_checkpoint

    buf = io.BytesIO()
    torch.save({"model": {"a": torch.arange(6.0), "b": torch.ones(2, 2)}}, buf)
    fs = fsspec.filesystem("memory")
    fs.pipe_file("/ckpt/remote.pth", buf.getvalue())
    state = _read_checkpoint("memory://ckpt/remote.pth", None)
    assert torch.equal(state["a"], torch.arange(6.0)) and torch.equal(state["b"], torch.ones(2, 2))
