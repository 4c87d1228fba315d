"""The model artifact: a folder holding ``head.safetensors`` and ``model.json``.

    <uri>/head.safetensors   PatchHead state dict (float tensors, CPU, safetensors format)
    <uri>/model.json         metadata: what the caller passed (backbone, weights, image_size,
                             feature dim, training summary, ...) plus ``in_dim``, ``embed_dim``,
                             ``format`` and ``format_version`` written by ``save_artifact``

``uri`` is a local path or any fsspec URL (``s3://bucket/models/run1``); ``storage_options``
go to fsspec unchanged. ``model.json`` is written last, so in a fresh folder its presence marks a
complete artifact.
"""
from __future__ import annotations

import json
import logging
import struct
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from selfment_dist.model.head import HIDDEN_DIM, PatchHead
from selfment_dist.io.storage import read_file, url_to_fs
from selfment_dist.stages import MODEL_META_NAME
from selfment_dist.errors import UserValueError

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "head.safetensors"
META_NAME = MODEL_META_NAME
FORMAT = "selfment-dist/patch-head"
FORMAT_VERSION = 1


def save_artifact(
    uri: str,
    head: PatchHead,
    meta: dict[str, Any],
    *,
    storage_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``head`` and ``meta`` as a model artifact folder at ``uri`` (created if needed).

    ``meta`` must be JSON-serialisable (numpy scalars and arrays are converted). Its keys
    ``in_dim``/``embed_dim``, if present, must agree with the head. Returns the metadata as
    written to ``model.json``.
    """
    if not isinstance(head, PatchHead):
        raise TypeError(f"save_artifact expects a PatchHead, got {type(head).__name__}")
    meta = dict(meta)
    for key, value in (("in_dim", head.in_dim), ("embed_dim", head.embed_dim)):
        if key in meta and meta[key] != value:
            raise ValueError(f"meta[{key!r}] = {meta[key]!r} disagrees with the head's {key} = {value}")
    meta.update(in_dim=head.in_dim, embed_dim=head.embed_dim, format=FORMAT, format_version=FORMAT_VERSION)
    try:
        meta_bytes = json.dumps(meta, indent=2, sort_keys=True, default=_json_default).encode()
    except (TypeError, ValueError) as exc:
        raise TypeError(f"artifact metadata is not JSON-serialisable: {exc}") from exc

    state = {k: v.detach().to("cpu").contiguous() for k, v in head.state_dict().items()}
    weights_bytes = st_save(state, metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})

    fs, root = url_to_fs(uri, storage_options)
    fs.makedirs(root, exist_ok=True)
    fs.pipe_file(_join(root, WEIGHTS_NAME), weights_bytes)
    fs.pipe_file(_join(root, META_NAME), meta_bytes)  # last: marks the artifact complete
    logger.info("saved model artifact to %s (in_dim=%d, embed_dim=%d)", uri, head.in_dim, head.embed_dim)
    return json.loads(meta_bytes)


def load_artifact(
    uri: str,
    *,
    storage_options: dict[str, Any] | None = None,
    device: str | torch.device | None = None,
) -> tuple[PatchHead, dict[str, Any]]:
    """Read the artifact at ``uri``; returns (PatchHead in eval mode on ``device`` (CPU if None), meta).

    Raises ``FileNotFoundError`` when a file is missing and ``ValueError`` when ``model.json`` is
    malformed or the weights do not match the dimensions it records.
    """
    fs, root = url_to_fs(uri, storage_options)
    meta_bytes = _read(fs, root, META_NAME, uri)
    try:
        meta = json.loads(meta_bytes)
    except ValueError as exc:
        raise UserValueError(f"model artifact {uri}: {META_NAME} is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise UserValueError(f"model artifact {uri}: {META_NAME} must hold a JSON object")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise UserValueError(
            f"model artifact {uri}: unsupported format_version {version!r} (this library reads {FORMAT_VERSION})"
        )
    try:
        in_dim, embed_dim = int(meta["in_dim"]), int(meta["embed_dim"])
    except (KeyError, TypeError, ValueError) as exc:
        raise UserValueError(f"model artifact {uri}: {META_NAME} needs integer in_dim and embed_dim") from exc

    try:
        hidden_dim = int(meta.get("hidden_dim", HIDDEN_DIM))  # recorded by imported official heads
    except (TypeError, ValueError) as exc:
        raise UserValueError(f"model artifact {uri}: {META_NAME} has a non-integer hidden_dim") from exc
    if min(in_dim, embed_dim, hidden_dim) < 1:
        raise UserValueError(f"model artifact {uri}: {META_NAME} needs in_dim, embed_dim and "
                         f"hidden_dim >= 1, got {in_dim}, {embed_dim}, {hidden_dim}")
    weights_bytes = _read(fs, root, WEIGHTS_NAME, uri)
    # Shapes from the safetensors header against model.json, before any tensor is allocated:
    # an untrusted model.json must not size the head.
    _check_shapes(uri, _header_shapes(uri, weights_bytes),
                  _expected_shapes(in_dim, embed_dim, hidden_dim), in_dim, embed_dim)
    try:
        state = st_load(weights_bytes)
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise UserValueError(f"model artifact {uri}: {WEIGHTS_NAME} is not a valid safetensors file: {exc}") from exc

    head = PatchHead(in_dim, embed_dim, hidden_dim=hidden_dim)
    try:
        head.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise UserValueError(
            f"model artifact {uri}: {WEIGHTS_NAME} does not match {META_NAME} "
            f"(in_dim={in_dim}, embed_dim={embed_dim}, hidden_dim={hidden_dim}): {exc}"
        ) from exc
    head.eval()
    if device is not None:
        head.to(device)
    return head, meta


def _header_shapes(uri: str, data: bytes) -> dict[str, tuple[int, ...]]:
    """Tensor name → shape, from a safetensors file's JSON header (no tensor is read)."""
    bad = f"model artifact {uri}: {WEIGHTS_NAME} is not a valid safetensors file"
    if len(data) < 8:
        raise UserValueError(f"{bad} ({len(data)} bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise UserValueError(f"{bad} (header of {n} bytes in a {len(data)}-byte file)")
    try:
        header = json.loads(data[8:8 + n])
        return {name: tuple(int(d) for d in info["shape"]) for name, info in header.items()
                if name != "__metadata__"}
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise UserValueError(f"{bad} (unreadable header: {exc})") from None


def _expected_shapes(in_dim: int, embed_dim: int,
                     hidden_dim: int = HIDDEN_DIM) -> dict[str, tuple[int, ...]]:
    """The state dict shapes of ``PatchHead(in_dim, embed_dim, hidden_dim=...)``, built on the
    meta device (shapes only, no memory)."""
    with torch.device("meta"):
        head = PatchHead(in_dim, embed_dim, hidden_dim=hidden_dim)
    return {k: tuple(v.shape) for k, v in head.state_dict().items()}


def _check_shapes(uri: str, found: dict, expected: dict, in_dim: int, embed_dim: int) -> None:
    problems = [f"{k}: missing" for k in expected if k not in found]
    problems += [f"{k}: unexpected" for k in found if k not in expected]
    problems += [f"{k}: shape {list(found[k])}, expected {list(v)}" for k, v in expected.items()
                 if k in found and tuple(found[k]) != v]
    if problems:
        raise UserValueError(f"model artifact {uri}: {WEIGHTS_NAME} does not match {META_NAME} "
                         f"(in_dim={in_dim}, embed_dim={embed_dim}): " + "; ".join(problems[:6]))


def _read(fs, root: str, name: str, uri: str) -> bytes:
    path = _join(root, name)
    return read_file(fs, path, f"model artifact {uri}: {name} ({path})")


def _join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}"


def _json_default(obj: Any) -> Any:
    # numpy scalars/arrays and 0-d tensors show up in training summaries.
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serializable")
