"""Reading backbone checkpoints (local files or fsspec URIs) without holding them twice.

A DINOv3 ViT-7B/16 checkpoint is ~26 GB: reading its bytes and then ``torch.load``-ing them
would need twice that in host memory per model replica. Here a local ``torch.save`` file is
memory-mapped (``torch.load(mmap=True)``), a remote one streamed to a local temporary file first
and mapped the same way; ``.safetensors`` files go through ``safetensors.torch.load_file``.
Only tensors and plain containers are loaded (``weights_only=True``), never pickled code.
"""
from __future__ import annotations

import argparse
import logging
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import fsspec
import torch

from selfment_dist.errors import SelfmentUserError, UserInputNotFoundError

logger = logging.getLogger(__name__)

__all__ = ["CheckpointError", "read_checkpoint"]


class CheckpointError(SelfmentUserError, ValueError):
    """A checkpoint could not be read safely or does not match the backbone."""


# Containers seen in the wild, best first: DINO v1 training checkpoints ({teacher, student, args,
# ...}), DINOv2/v3 teacher_checkpoint.pth ({teacher}), fvcore ({model}), generic trainers.
_WRAPPER_KEYS = ("teacher", "model_ema", "state_dict", "model", "module", "student")
# Non-tensor objects that legitimately appear in training checkpoints and hold only data.
_SAFE_GLOBALS = [argparse.Namespace]


def read_checkpoint(uri: str, storage_options: dict | None) -> dict[str, torch.Tensor]:
    """Read a checkpoint (local path or fsspec URI) into a flat ``{key: tensor}`` dict.

    The file is never held in memory twice (a 7B checkpoint is ~26 GB): a local ``torch.save``
    file is memory-mapped (``torch.load(mmap=True)``: tensors are views of the file's pages,
    read when the model copies them), a remote one is first streamed to a local temporary file
    (as much local disk as the checkpoint) and mapped the same way; ``.safetensors`` files are
    read with ``safetensors.torch.load_file``, which maps the file too.
    """
    try:
        fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    except (ValueError, ImportError) as e:
        raise UserInputNotFoundError(f"cannot open checkpoint {uri!r}: {e}") from e
    if not fs.isfile(path):
        raise UserInputNotFoundError(
            f"checkpoint {uri!r} not found (weights must be 'hub', 'random' or a checkpoint path "
            f"or URI)")
    if _is_local_fs(fs):
        return _load_local_checkpoint(path, uri)
    suffix = ".safetensors" if path.endswith(".safetensors") else ".pth"
    with tempfile.TemporaryDirectory(prefix="selfment-ckpt-") as tmp:
        local = os.path.join(tmp, "checkpoint" + suffix)
        logger.info("downloading checkpoint %s to %s", uri, local)
        fs.get_file(path, local)  # streamed in blocks, never whole in memory
        # The mapping keeps the pages reachable after the file is removed (POSIX); tensors the
        # model copies out of it stay valid.
        return _load_local_checkpoint(local, uri)


def _is_local_fs(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def _load_local_checkpoint(path: str, uri: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file as load_safetensors
        try:
            return load_safetensors(path)
        except Exception as e:
            raise CheckpointError(f"{uri}: not a valid safetensors file ({e})") from e
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):  # only the legacy (pre-zipfile) format cannot be mapped
                    raise
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"{uri}: refused or unreadable checkpoint. Only tensors and plain containers are "
            f"loaded (torch.load weights_only=True), never pickled code; convert it to "
            f".safetensors or save a plain state dict. Cause: {e}") from e
    return _flatten_state(obj, uri)


def _flatten_state(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """Descend checkpoint containers to the state dict; keep tensor entries only."""
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)} \
        if isinstance(obj, Mapping) else {}
    if not state:
        raise CheckpointError(f"{source}: no state dict of tensors found in the checkpoint")
    return state


