"""Assumed throughputs of the model stages, and how they scale with backbone, size and stage.

The planner (``selfment plan`` and every run's :mod:`.plan`) sizes decode concurrency and
reports the expected images/s from :data:`ASSUMED_RATES`, stated for the *reference model*:
ViT-S/16 at 768 px with NCut + IPO (pseudo-label). They are assumptions, stated once here;
``benchmarks/gpu_check.sh`` measures the real ones on a GPU (docs/cluster.md says which
``RESULT`` line replaces which rate: ``selfment plan --rate NAME=VALUE``) and
``benchmarks/transport.py`` the decode rate on a CPU.

A run's model is rarely the reference: :func:`speed_factor` scales a reference rate to the
run's backbone, image size and stage with a cost model. One image costs
``backbone_ms × size_factor × token_factor + ncut_ms × r²`` (``r``: the patch count relative to
2304, ViT-S/16 at 768 px):

- the backbone's cost splits about evenly between token-linear work (projections, MLP) and
  attention (quadratic in tokens) for ViT-S/16 at 768 px: ``token_factor = (r + r²) / 2``;
- ``size_factor`` is the FLOP ratio of a larger ViT to ViT-S (width and depth);
- NCut + IPO (always IEEE float32, whatever the precision) is dominated by the patches ×
  patches affinity and Lanczos products: ``r²``; segment runs no NCut (its head is negligible).

The reference split: on a GPU, NCut + IPO take :data:`NCUT_MS` and the backbone the rest of
``1000 / rate`` (the assumed rate of the precision); on a CPU, NCut + IPO are :data:`CPU_NCUT_SHARE` of an image's time (this
repository's CPU benchmarks: 0.08 of 2.14 s per image).
"""
from __future__ import annotations

__all__ = ["ASSUMED_RATES", "REFERENCE_BACKBONE", "REFERENCE_IMAGE_SIZE", "NCUT_MS",
           "SIZE_FACTORS", "speed_factor"]

#: The model the rates are stated for.
REFERENCE_BACKBONE = "vit_small_patch16_dinov3.lvd1689m"
REFERENCE_IMAGE_SIZE = 768
#: Assumed rates (the README's projection, benchmarks/scale.py), to be replaced by measured ones:
#: images per second one CPU decodes (small web JPEGs, ~640x480, to uint8: the model actor
#: resizes on its device), one GPU actor labels with the reference model per backbone precision
#: (on an A10G-class GPU: bf16 is the figure the projection used; fp32 and tf32 are guesses
#: scaled from it until measured), and one CPU actor thread (fp32; bf16 ~1.4x on CPUs with
#: AMX/AVX512-BF16; tf32 is fp32 on a CPU).
ASSUMED_RATES = {
    "decode_images_per_s_per_cpu": 240.0,
    "gpu_actor_images_per_s_bf16": 120.0,
    "gpu_actor_images_per_s_tf32": 90.0,
    "gpu_actor_images_per_s_fp32": 60.0,
    "cpu_actor_images_per_s_per_thread": 1.0,
}
#: NCut + IPO milliseconds per image on the reference GPU at 2304 patches (IEEE fp32).
NCUT_MS = 4.3
#: NCut + IPO's share of a reference image's time in a CPU actor.
CPU_NCUT_SHARE = 0.04
#: Backbone FLOPs relative to ViT-S (width² × depth for the linear half, width × depth for the
#: attention half), by the size word of the timm name.
SIZE_FACTORS = {"tiny": 0.4, "small": 1.0, "small_plus": 1.3, "base": 3.0, "large": 9.8,
                "huge_plus": 19.0, "giant": 33.0, "7b": 207.0}
_REFERENCE_PATCHES = (REFERENCE_IMAGE_SIZE // 16) ** 2


def _size_factor(backbone: str) -> float:
    arch = backbone.split(".")[0].removeprefix("vit_")
    size = arch.split("_patch")[0]
    return SIZE_FACTORS.get(size, 1.0)  # an unknown size word: assume ViT-S


def _patch(backbone: str) -> int:
    for part in backbone.split(".")[0].split("_"):
        if part.startswith("patch") and part[5:].isdigit():
            return int(part[5:])
    return 16


def _image_cost(backbone: str, image_size: int, ncut: bool, split: tuple[float, float]) -> float:
    backbone_cost, ncut_cost = split
    r = (int(image_size) // _patch(backbone)) ** 2 / _REFERENCE_PATCHES
    cost = backbone_cost * _size_factor(backbone) * (r + r * r) / 2
    return cost + (ncut_cost * r * r if ncut else 0.0)


def speed_factor(backbone: str | None, image_size: int | None, *, precision: str = "fp32",
                 gpu: bool = True, ncut: bool = True) -> float:
    """How much faster (> 1) or slower (< 1) one model actor runs the given model than the
    reference: multiply a reference rate (:data:`ASSUMED_RATES`, or a measured one) by it.

    Args:
        backbone: timm name (None: the reference's).
        image_size: the square input side (None: the reference's).
        precision: ``fp32``, ``tf32`` or ``bf16``: on a GPU, the assumed rate of that
            precision splits a reference image between backbone and NCut (a measured rate
            scales the whole, not the split).
        gpu: a GPU actor (else a CPU one).
        ncut: the stage runs NCut + IPO (pseudo-label) or not (segment).
    """
    backbone = backbone or REFERENCE_BACKBONE
    image_size = image_size or REFERENCE_IMAGE_SIZE
    if gpu:
        image_ms = 1000.0 / ASSUMED_RATES[f"gpu_actor_images_per_s_{precision}"]
        split = (image_ms - NCUT_MS, NCUT_MS)
    else:
        split = (1.0 - CPU_NCUT_SHARE, CPU_NCUT_SHARE)
    reference = _image_cost(REFERENCE_BACKBONE, REFERENCE_IMAGE_SIZE, True, split)
    return reference / _image_cost(backbone, image_size, ncut, split)
