"""Assumed throughputs of the model stages, by backbone, precision and image size.

The planner (``selfment plan`` and every run's :mod:`.plan`) sizes decode concurrency and
reports the expected images/s from these figures. They are *assumptions*, stated once here:
``benchmarks/gpu_check.sh`` measures the real ones on a GPU (its ``RESULT backbone_*`` and
``RESULT ncut_ipo_ms`` lines) and ``benchmarks/transport.py`` the decode rate on a CPU; replace
the reference figures below with those when they differ.

Model: one image costs ``backbone_ms × size_factor × token_factor + ncut_ms × r²`` on the
reference GPU, where ``r`` is the patch count relative to ViT-S/16 at 768 px (2304 patches):

- the backbone's cost splits about evenly between token-linear work (projections, MLP) and
  attention (quadratic in tokens) for ViT-S/16 at 768 px: ``token_factor = (r + r²) / 2``;
- ``size_factor`` is the FLOP ratio of a larger ViT to ViT-S at that size (width and depth);
- NCut + IPO (always IEEE float32, whatever the precision) is dominated by the patches ×
  patches affinity and Lanczos products: ``r²``.

Reference: an A10G-class GPU, ViT-S/16 at 768 px, batch 32: bf16 120 images/s (the figure the
README's projection assumed), fp32 ~70, tf32 ~98. A CPU model actor: 1 image/s per thread in
fp32 (this repository's CPU benchmarks), bf16 ~1.4x on CPUs with AMX/AVX512-BF16, tf32 = fp32.
"""
from __future__ import annotations

from selfment_dist.pipeline._internal.plan import ASSUMED_RATES

from selfment_dist.defaults import resolve_precision

__all__ = ["BACKBONE_MS", "NCUT_MS", "SIZE_FACTORS", "DECODE_IMAGES_PER_S_PER_CPU",
           "model_images_per_s", "decode_images_per_s_per_cpu"]

#: Backbone milliseconds per image on the reference GPU, ViT-S/16 at 768 px, by precision.
BACKBONE_MS = {"fp32": 10.0, "tf32": 6.0, "bf16": 4.0}
#: NCut + IPO milliseconds per image on the reference GPU at 2304 patches (IEEE fp32).
NCUT_MS = 4.3
#: CPU model actor: images/s per torch thread for ViT-S/16 at 768 px with NCut + IPO.
CPU_IMAGES_PER_S_PER_THREAD = {"fp32": 1.0, "tf32": 1.0, "bf16": 1.4}
#: Backbone FLOPs relative to ViT-S at 768 px (width² × depth for the linear half, width ×
#: depth for the attention half), by the size word of the timm name.
SIZE_FACTORS = {"tiny": 0.4, "small": 1.0, "small_plus": 1.3, "base": 3.0, "large": 9.8,
                "huge_plus": 19.0, "giant": 33.0, "7b": 207.0}
#: Images per second one CPU decodes (small web JPEGs, ~640x480): with the antialiased resize
#: to 768 px on the CPU (the old transport, float32 at 768 px) and without it (uint8 at the
#: decoded size, resized on the model's device). benchmarks/transport.py measures both.
DECODE_IMAGES_PER_S_PER_CPU = {"host_resize": ASSUMED_RATES["decode_images_per_s_per_cpu"],
                               "device_resize": ASSUMED_RATES["decode_uint8_images_per_s_per_cpu"]}
_REFERENCE_PATCHES = (768 // 16) ** 2


def _size_factor(backbone: str) -> float:
    arch = backbone.split(".")[0].removeprefix("vit_")
    size = arch.split("_patch")[0]
    return SIZE_FACTORS.get(size, 1.0)  # an unknown size word: assume ViT-S


def _patch(backbone: str) -> int:
    for part in backbone.split(".")[0].split("_"):
        if part.startswith("patch") and part[5:].isdigit():
            return int(part[5:])
    return 16


def model_images_per_s(backbone: str, precision: str, image_size: int, *, gpu: bool = True,
                       threads: int = 1) -> float:
    """Assumed images/s of one model actor (backbone + NCut + IPO) at batch 32.

    Args:
        backbone: timm name, e.g. ``vit_small_patch16_dinov3.lvd1689m``.
        precision: a ``--precision`` value (``auto`` = fp32; tf32 = fp32 on a CPU).
        image_size: the square input side.
        gpu: one reference GPU (True) or a CPU actor with ``threads`` torch threads.
    """
    precision = resolve_precision(precision, "cuda" if gpu else "cpu")
    r = (image_size // _patch(backbone)) ** 2 / _REFERENCE_PATCHES
    token_factor = (r + r * r) / 2
    if not gpu:
        # CPU: the same cost model, scaled from the per-thread reference at ViT-S/16 768 px.
        ref_ms = BACKBONE_MS["fp32"] + NCUT_MS
        ms = BACKBONE_MS["fp32"] * _size_factor(backbone) * token_factor + NCUT_MS * r * r
        return CPU_IMAGES_PER_S_PER_THREAD[precision] * max(1, threads) * ref_ms / ms
    ms = BACKBONE_MS[precision] * _size_factor(backbone) * token_factor + NCUT_MS * r * r
    return 1000.0 / ms


def decode_images_per_s_per_cpu(*, resize_on_device: bool = True) -> float:
    """Assumed images/s one CPU decodes, with the resize on the model's device or on the CPU."""
    return DECODE_IMAGES_PER_S_PER_CPU["device_resize" if resize_on_device else "host_resize"]
