"""Defaults that the settings, the CLI and the heavy modules share.

They live here, free of torch and timm, so that parsing a command line or validating settings
does not import the model stack (seconds per process).
"""
from __future__ import annotations

#: The backbone used when none is named.
DEFAULT_BACKBONE = "vit_small_patch16_dinov3.lvd1689m"

#: Numerics of the backbone's forward pass (``--precision``):
#:
#: - ``fp32`` (default): IEEE float32 everywhere, TF32 off: the official numerics;
#: - ``tf32``: float32 tensors, but CUDA matmuls and cuDNN convolutions of the *backbone* may
#:   use TensorFloat-32 (10-bit mantissa inputs, float32 accumulation); on a CPU it is fp32;
#: - ``bf16``: autocast (matmuls, convolutions and attention in bfloat16; norms and softmax
#:   statistics in float32);
#: - ``auto``: an alias of ``fp32``, kept so that old configs and resumed outputs still work.
#:
#: NCut and IPO always run in IEEE float32 or higher, whatever the backbone's precision
#: (``algorithm._tensors.exact_math``): a lower-precision affinity can flip graph edges near
#: ``tau``. tf32/bf16 only change the features; ``benchmarks/pseudo_label.py`` reports their
#: mask agreement.
PRECISIONS = ("fp32", "tf32", "bf16", "auto")


def resolve_precision(precision: str, device=None) -> str:
    """``"fp32"``, ``"tf32"`` or ``"bf16"``: what ``precision`` means on ``device`` (a
    ``torch.device``, a device string, or None for "not known yet"): ``auto`` is fp32; ``tf32``
    is fp32 on any device but CUDA (no other device has TF32 matmuls). Here, free of torch, so
    that drivers can record what the actors will run."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return "fp32"
    if precision == "tf32" and device is not None and \
            str(getattr(device, "type", device)).split(":")[0] != "cuda":
        return "fp32"
    return precision


#: How model replicas run (see ``pipeline._warm``): Ray actors, or tasks on warm CPU workers.
MODEL_WORKERS = ("actors", "tasks")

#: Rows whose confidence is below this are flagged ``no_object`` (their mask is likely noise).
NO_OBJECT_THRESHOLD = 0.5

#: Largest ``image_size`` (pixels, square) any stage accepts; the official 768 (labels,
#: training) and 1536 (inference) are far below it. The bound is memory: at 4096 px and patch
#: 16 the grid is 256 x 256 = 65,536 patches, and NCut's dense affinity (patches x patches,
#: float32) is 16 GiB per image, beside a 192 MiB float32 image and the ViT's activations: one
#: image still fits an 80 GB GPU. At 8192 px the affinity alone is 256 GiB, more than any single
#: accelerator holds, so a run would only fail later, after Ray has started (docs/inputs.md).
MAX_IMAGE_SIZE = 4096

#: The official recipe infers at twice the training size (768 -> 1536 px).
INFERENCE_SCALE = 2


def default_inference_size(training_size: int) -> int:
    """The inference size an artifact records by default: twice the training size."""
    return INFERENCE_SCALE * int(training_size)
