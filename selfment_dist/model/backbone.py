"""Frozen DINO ViT backbones from timm: building, weight loading and patch features.

Three families are supported by their timm names (``supported_backbones()`` lists them all):

- DINO v1: ``vit_small_patch16_224.dino``, ``vit_base_patch16_224.dino`` and the patch8 variants;
- DINOv2: ``vit_{small,base,large,giant}_patch14[_reg4]_dinov2.lvd142m``;
- DINOv3: ``vit_*_patch16_dinov3*.lvd1689m`` / ``.sat493m`` (timm's Eva architecture).

Weights come from the model hub (``"hub"``), a deterministic random init (``"random"``: tests
and demos) or a checkpoint path / fsspec URI in timm's layout or the original repositories'
(facebookresearch dino / dinov2 / dinov3), converted with timm's family ``checkpoint_filter_fn``.

Features follow the DESIGN: square ``image_size`` input, ImageNet mean/std, patch tokens of the
last block after the final norm, prefix tokens (cls, registers) dropped, L2-normalised.

Preprocessing in the official order (torchvision ``ToTensor`` then ``Resize((s, s),
antialias=True)`` then ``Normalize``): :func:`resize_square` turns each decoded image into a
float32 tensor in [0, 1] and resizes *that* bilinearly with antialias (it runs where images are
decoded: Ray Data's CPU tasks, which ship float32 (S, S, 3) arrays, 4 bytes a value, to the
model actors); :class:`Backbone` normalises the batch on its device.
"""
from __future__ import annotations

import difflib
import hashlib
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import eva, vision_transformer

from selfment_dist.model.backbone_names import FAMILY_PATTERNS, image_size_problem, patch_size
from selfment_dist.model.checkpoint_files import CheckpointError  # noqa: F401 (re-exported)
from selfment_dist.model.checkpoint_files import read_checkpoint as _read_checkpoint
from selfment_dist.defaults import DEFAULT_BACKBONE, PRECISIONS, resolve_precision  # noqa: F401 (re-exported)
from selfment_dist.model.numerics import float32_matmuls
from selfment_dist.model.resize import resize_square  # noqa: F401 (re-exported)
from selfment_dist.errors import UserInputNotFoundError, UserValueError

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_BACKBONE",
    "Backbone",
    "CheckpointError",
    "backbone_family",
    "build_backbone",
    "resize_square",
    "supported_backbones",
]


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Family:
    version: str                    # "dino" | "dinov2" | "dinov3"
    pattern: re.Pattern             # timm names (architecture.tag) of this family
    filter_fn: Callable[[dict, torch.nn.Module], dict]  # timm's converter of foreign layouts


_FAMILIES: tuple[_Family, ...] = (
    _Family("dino", FAMILY_PATTERNS["dino"], vision_transformer.checkpoint_filter_fn),
    _Family("dinov2", FAMILY_PATTERNS["dinov2"], vision_transformer.checkpoint_filter_fn),
    _Family("dinov3", FAMILY_PATTERNS["dinov3"], eva.checkpoint_filter_fn),
)


def supported_backbones() -> list[str]:
    """All timm names (``architecture.tag``) of DINO v1/v2/v3 ViTs this module can build."""
    return [n for n in timm.list_pretrained() if any(f.pattern.match(n) for f in _FAMILIES)]


def _family(name: str) -> _Family:
    for family in _FAMILIES:
        if family.pattern.match(name) and name in timm.list_pretrained(name):
            return family
    close = difflib.get_close_matches(name, supported_backbones(), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise UserValueError(
        f"unsupported backbone {name!r}: expected a timm DINO ViT name with its pretrained tag, "
        f"e.g. {DEFAULT_BACKBONE!r} (see selfment_dist.model.backbone.supported_backbones()){hint}")


def backbone_family(name: str) -> str:
    """``"dino"``, ``"dinov2"`` or ``"dinov3"`` for a supported timm name; ValueError otherwise."""
    return _family(name).version


def check_image_size(name: str, image_size: int) -> None:
    """Raise ValueError unless ``name`` is a supported backbone and ``image_size`` a positive
    multiple of its patch size (drivers call this so they fail with the message actors give)."""
    _family(name)
    _check_image_size(name, image_size, patch_size(name))


def _check_image_size(name: str, image_size: int, patch: int) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)):
        raise UserValueError(f"image_size must be an int, got {image_size!r}")
    problem = image_size_problem(name, int(image_size), patch)
    if problem:
        raise UserValueError(problem)


# ---------------------------------------------------------------------------------------------
# The backbone
# ---------------------------------------------------------------------------------------------

class Backbone:
    """A frozen timm DINO ViT mapping square uint8 RGB images to unit-norm patch features.

    Attributes:
        name: timm model name, e.g. ``"vit_small_patch16_dinov3.lvd1689m"``.
        weights: ``"hub"``, ``"random"`` or the checkpoint path/URI the weights came from.
        image_size: side S of the square input, a multiple of ``patch_size``.
        patch_size: ViT patch side in pixels.
        embed_dim: channels C of the features.
        grid: ``(h, w) = (S // patch_size, S // patch_size)``.
        device: the ``torch.device`` holding the model and the returned features.
        precision: ``"fp32"``, ``"tf32"`` (TF32 matmuls in the forward pass, CUDA only) or
            ``"bf16"`` (autocast), resolved for the device (``auto`` is fp32).
        model: the timm module (eval mode, ``requires_grad`` off).
    """

    def __init__(self, model: torch.nn.Module, *, name: str, weights: str, image_size: int,
                 device: torch.device, precision: str = "fp32"):
        self.model = model
        self.precision = resolve_precision(precision, device)
        self.name = name
        self.weights = weights
        self.image_size = int(image_size)
        self.device = torch.device(device)
        self.patch_size = int(model.patch_embed.patch_size[0])
        self.embed_dim = int(model.embed_dim)
        side = self.image_size // self.patch_size
        self.grid = (side, side)
        self._num_prefix = int(model.num_prefix_tokens)
        # (1, 3, 1, 1) float32 on device, so normalisation happens where the pixels land.
        self._mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_DEFAULT_STD, device=self.device).view(1, 3, 1, 1)

    def __repr__(self) -> str:
        return (f"Backbone(name={self.name!r}, weights={self.weights!r}, "
                f"image_size={self.image_size}, grid={self.grid}, device={str(self.device)!r}, "
                f"precision={self.precision!r})")

    def describe(self) -> dict:
        """JSON-ready identity for manifests / ``model.json``:
        ``{name, weights, image_size, patch_size, embed_dim}``."""
        return {"name": self.name, "weights": self.weights, "image_size": self.image_size,
                "patch_size": self.patch_size, "embed_dim": self.embed_dim}

    def __call__(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Patch features of a batch of images.

        Args:
            images: float32 (B, S, S, 3) RGB in [0, 1], HWC, S == ``image_size``, as
                :func:`resize_square` makes them (the official preprocessing); or uint8
                (B, S, S, 3) already at size S (scaled by 1/255). A numpy array or a torch
                tensor on any device.

        Returns:
            float32 (B, h, w, C) on ``self.device``, L2-normalised over C, where
            ``(h, w) == self.grid`` and ``C == self.embed_dim``. An ordinary tensor (not an
            inference tensor), so it may feed autograd-recorded ops such as a trainable head.
        """
        x = self._as_tensor(images)
        h, w = self.grid
        if x.shape[0] == 0:
            return torch.empty((0, h, w, self.embed_dim), dtype=torch.float32, device=self.device)
        with torch.inference_mode():
            # Normalise on device: (B,S,S,3) in [0, 1] -> float32 (B,3,S,S).
            scale = 1 / 255 if x.dtype == torch.uint8 else 1.0
            x = x.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float() * scale
            x = (x - self._mean) / self._std
            with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16,
                                enabled=self.precision == "bf16"), \
                    float32_matmuls(tf32=self.precision == "tf32"):
                tokens = self.model.forward_features(x)  # (B, prefix + h*w, C), final norm applied
            patches = tokens[:, self._num_prefix:].float()
            feats = F.normalize(patches, dim=-1).reshape(x.shape[0], h, w, self.embed_dim)
        return feats.clone()  # leave inference mode: a normal tensor for downstream autograd

    def _as_tensor(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        if isinstance(images, np.ndarray):
            if images.dtype not in (np.uint8, np.float32):
                raise ValueError(f"images must be float32 in [0, 1] or uint8, got numpy {images.dtype}")
            images = torch.from_numpy(np.ascontiguousarray(images))
        elif isinstance(images, torch.Tensor):
            if images.dtype not in (torch.uint8, torch.float32):
                raise ValueError(f"images must be float32 in [0, 1] or uint8, got torch {images.dtype}")
        else:
            raise TypeError(f"images must be a numpy array or torch tensor, got {type(images)}")
        s = self.image_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (s, s, 3):
            raise ValueError(f"images must have shape (B, {s}, {s}, 3) (RGB, HWC, resized to "
                             f"image_size), got {tuple(images.shape)}")
        return images


# ---------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------

def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _name_seed(name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"selfment-random:{name}".encode()).digest()[:8],
                          "little") & (2**63 - 1)


def build_backbone(name: str = DEFAULT_BACKBONE, *, weights: str | os.PathLike = "hub",
                   image_size: int = 768, device: str | torch.device | None = None,
                   storage_options: dict | None = None, precision: str = "fp32") -> Backbone:
    """Build a frozen DINO backbone.

    Args:
        name: timm name with its pretrained tag (see :func:`supported_backbones`).
        weights: ``"hub"`` (timm pretrained weights), ``"random"`` (random init, identical in
            every process for a given ``name``: seeded from the name, built at the model's
            default size and position embeddings resampled like a checkpoint's), or a checkpoint
            path / fsspec URI (``.safetensors``, or a ``torch.save`` file read with
            ``weights_only=True``) in timm's layout or the original dino/dinov2/dinov3 layout.
        image_size: square input side; must be a multiple of the patch size.
        device: where the model runs; default ``cuda`` if available, else ``cpu``.
        storage_options: fsspec options for a checkpoint URI (e.g. ``endpoint_url``).
        precision: ``fp32`` (as the official code; ``auto`` is an alias), ``tf32`` (CUDA matmuls
            and convolutions of the forward pass in TF32; fp32 on a CPU) or ``bf16``. On
            CPUs with native bf16 (AVX512-BF16, AMX) ``bf16`` is about 1.4x faster for ViT-S at
            768 px; features then differ from fp32 ones like on a GPU.

    Returns:
        A :class:`Backbone` in eval mode with gradients off.

    Raises:
        ValueError: unknown name, ``image_size`` not a multiple of the patch size, or an
            unknown ``precision``.
        CheckpointError: a checkpoint holding pickled code, or not matching the model.
        FileNotFoundError: ``weights`` is neither ``hub``/``random`` nor an existing checkpoint.
    """
    family = _family(name)
    _check_image_size(name, image_size, patch_size(name))
    weights = os.fspath(weights)
    device = torch.device(device) if device is not None else _default_device()
    resolve_precision(precision, device)  # fail before the build
    start = time.perf_counter()

    # Model init draws from torch's global RNG: keep the caller's stream untouched.
    with torch.random.fork_rng(devices=[]):
        if weights == "hub":
            model = _create(name, image_size, pretrained=True)
        elif weights == "random":
            model = _create(name, image_size)
            torch.manual_seed(_name_seed(name))
            reference = _create(name, None)  # default size: weights independent of image_size
            _load_into(model, reference.state_dict(), family, name=name, source="random init")
            del reference
        else:
            state = _read_checkpoint(weights, storage_options)  # fail fast, before the build
            model = _create(name, image_size)
            _load_into(model, state, family, name=name, source=weights)

    model.eval().requires_grad_(False).to(device)
    device = next(model.parameters()).device  # "cuda" resolves to the current index, e.g. cuda:1
    logger.info("built backbone %s (weights=%s, image_size=%d, device=%s) in %.1fs",
                name, weights, image_size, device, time.perf_counter() - start)
    return Backbone(model, name=name, weights=weights, image_size=image_size, device=device,
                    precision=precision)


def _create(name: str, image_size: int | None, *, pretrained: bool = False) -> torch.nn.Module:
    """timm model on CPU without classifier; ``image_size=None`` keeps timm's default size."""
    kwargs: dict[str, Any] = {"num_classes": 0}
    if image_size is not None:
        kwargs["img_size"] = image_size
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except Exception as e:
        if not pretrained:
            raise
        raise RuntimeError(
            f"could not fetch pretrained weights for {name} from the model hub ({e}); without "
            f"network access pass weights=<checkpoint path or URI> (or 'random' for tests)") from e


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------

def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map original-repo key layouts onto the bare backbone's keys.

    Selects ``teacher.`` (else ``student.``) and ``backbone.`` sub-trees (dropping DINO heads),
    removes ``module.`` (DDP) and ``_orig_mod.`` (torch.compile), unchunks DINOv2's
    ``blocks.<chunk>.<i>.`` into ``blocks.<i>.`` and drops classifier ``head.*`` weights.
    """
    def select(prefix: str) -> bool:
        nonlocal state
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            return True
        return False

    for wrapper in ("module.", "_orig_mod."):
        state = {k.removeprefix(wrapper): v for k, v in state.items()}
    select("teacher.") or select("student.")
    for wrapper in ("module.", "_orig_mod."):
        state = {k.removeprefix(wrapper): v for k, v in state.items()}
    select("backbone.")
    chunked = re.compile(r"^blocks\.\d+\.(\d+)\.")
    return {chunked.sub(r"blocks.\1.", k): v for k, v in state.items()
            if not k.startswith("head.")}


def _qkvb_variant(name: str) -> str | None:
    """The timm DINOv3 model of ``name``'s size that has q/v biases (``..._qkvb``), or None."""
    arch, dot, tag = name.partition(".")
    if arch.endswith("_qkvb"):
        return None
    variant = arch + "_qkvb"
    return variant + dot + tag if timm.is_model(variant) else None


def _check_dropped_tensors(state: dict[str, torch.Tensor], model: torch.nn.Module, *, name: str,
                           source: str) -> None:
    """timm's DINOv3 filter drops some tensors of the original layout without a look: the rope
    periods (recomputed by the model) and, for models without a qkv bias, ``qkv.bias``. Dropping
    them is only right when they hold what the model assumes; otherwise the features would be
    wrong with no error, so say so instead.

    The official ViT-S/B/L have ``qkv_bias=True, mask_k_bias=True``: ``qkv.bias`` (q, k, v
    thirds) times ``qkv.bias_mask`` (k third zero). The k bias never matters (it adds the same
    ``q . b_k`` to every logit of a softmax row); q and v biases do. timm's ``*_dinov3`` models
    have none, its ``*_dinov3_qkvb`` models load them (the filter splits them into ``q_bias`` and
    ``v_bias``). A checkpoint with a non-zero q or v bias is refused for a model without them,
    naming the ``_qkvb`` model that takes it."""
    if "storage_tokens" not in state:  # not the original DINOv3 layout
        return
    has_q_bias = any(n.endswith("q_bias") for n, _ in model.named_parameters())
    for key, value in state.items():
        if key.endswith("qkv.bias") and not has_q_bias:
            mask = state.get(key.replace("qkv.bias", "qkv.bias_mask"))
            effective = value * mask if mask is not None and mask.shape == value.shape else value
            q, _k, v = effective.float().chunk(3, dim=-1)
            if bool(q.abs().max() > 0) or bool(v.abs().max() > 0):
                variant = _qkvb_variant(name)
                fix = (f"build it as '{variant}' (timm's variant with q/v biases)" if variant
                       else "no timm variant of this size has q/v biases")
                raise CheckpointError(
                    f"{source}: {key} holds non-zero q/v biases but {name} has no qkv bias (timm "
                    f"would drop them and the features would be wrong); {fix}")
        elif key.endswith("rope_embed.periods"):
            rope = getattr(model, "rope", None)
            ours = getattr(rope, "periods", None)
            if ours is None or ours.shape != value.shape or not torch.allclose(
                    ours.float().cpu(), value.float(), rtol=1e-5, atol=0):
                raise CheckpointError(
                    f"{source}: {key} differs from the rope periods {name} computes (timm would "
                    f"drop it and the features would be wrong)")


def _load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], family: _Family, *,
               name: str, source: str) -> None:
    """Convert ``state`` with timm's family filter and load it strictly into ``model``."""
    state = _strip_prefixes(state)
    _check_dropped_tensors(state, model, name=name, source=source)
    try:
        state = family.filter_fn(state, model)
    except Exception as e:  # timm's converters assume well-formed tensors
        raise CheckpointError(f"{source}: cannot convert to {name}'s layout ({e})") from e
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or mismatched:
        def show(keys: list[str]) -> str:
            more = f", … ({len(keys)} in all)" if len(keys) > 5 else ""
            return ", ".join(keys[:5]) + more
        problems = [f"{label} {show(keys)}" for label, keys in
                    (("missing keys:", missing), ("unexpected keys:", unexpected),
                     ("shape mismatches:", mismatched)) if keys]
        raise CheckpointError(
            f"{source} does not match {name} ({family.version} family): " + "; ".join(problems))
    model.load_state_dict(state, strict=True)
