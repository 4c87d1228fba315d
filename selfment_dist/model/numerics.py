"""Process-wide float32 matmul modes, set for one region of code and restored after.

torch keeps "may float32 matmuls use TF32?" as global flags (``torch.backends.<backend>.
fp32_precision``), not per tensor or per call.
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


#: (backend object, attribute) of the fp32 precision switches this module sets. torch 2.9+'s
#: per-backend API only: mixing it with the legacy one (``set_float32_matmul_precision``,
#: ``allow_tf32``) makes torch refuse to report the mode (a RuntimeError at the next legacy read).
_SWITCHES = (("cuda.matmul", "fp32_precision"), ("cudnn.conv", "fp32_precision"),
             ("mkldnn.matmul", "fp32_precision"))


def _backend(path: str):
    obj = torch.backends
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


@contextlib.contextmanager
def float32_matmuls(*, tf32: bool) -> Iterator[None]:
    """Inside: float32 matmuls and cuDNN convolutions may use TF32 (``tf32=True``) or must be
    IEEE float32 (``tf32=False``: also no reduced-precision oneDNN CPU kernels). Restored
    after."""
    switches = [(_backend(path), name) for path, name in _SWITCHES]
    saved = [getattr(obj, name) for obj, name in switches]
    for obj, name in switches:
        if obj is _backend("mkldnn.matmul"):
            if not tf32:
                setattr(obj, name, "ieee")  # TF32 is a CUDA mode; on the CPU only "ieee"
        else:
            setattr(obj, name, "tf32" if tf32 else "ieee")
    try:
        yield
    finally:
        for (obj, name), value in zip(switches, saved):
            setattr(obj, name, value)
