"""Process-wide float32 matmul modes, set for one region of code and restored after.

torch keeps "may float32 matmuls use TF32?" as global flags (``torch.backends.cuda.matmul``,
``torch.backends.cudnn``, ``torch.set_float32_matmul_precision``), not per tensor or per call.
The backbone turns TF32 on for its forward pass only (``--precision tf32``) and NCut/IPO turn it
off for theirs (``algorithm._tensors.exact_math``), whatever the caller set: each region saves
the caller's flags and restores them on the way out, exceptions included.

The flags are per process, not per thread: two threads of one actor must not run regions with
different modes at once (the model actor runs its model calls one at a time, see
``model/preprocess.py``).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

__all__ = ["float32_matmuls"]


@contextlib.contextmanager
def float32_matmuls(*, tf32: bool) -> Iterator[None]:
    """Inside: float32 matmuls and cuDNN convolutions may use TF32 (``tf32=True``) or must be
    IEEE float32 (``tf32=False``: also no bf16x3 "high" CPU kernels). Restored after."""
    saved = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
    # "high" lets cuBLAS use TF32 (the same flag as torch.backends.cuda.matmul.allow_tf32);
    # "highest" forbids any reduced-precision algorithm on every device.
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = tf32
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32 = saved[1]
