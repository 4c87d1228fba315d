"""Import a head checkpoint of the official Selfment code as our model artifact.

The official ``train.py`` saves ``torch.save({"epoch", "model_state", "optimizer_state",
"args"})`` where ``model_state`` is the state dict of its head::

    proj.0  Linear(in_dim, embed_dim)   ─► ReLU ─►   proj.2  Linear(embed_dim, embed_dim) = emb
    classifier  Linear(embed_dim, 2) = logits

and ``args`` the training arguments (``dino_model_name``, ``img_size``, ``embed_dim``, ...).
Our :class:`~selfment_dist.model.head.PatchHead` is the same network (``mlp.0``, ``mlp.2``,
``classifier``; its hidden width is the official ``embed_dim``), so the import is a renaming plus
checks: every tensor must map, every one of ours must be filled, and the input width must be the
backbone's feature width. The artifact records the official inference size, twice ``img_size``.
"""
from __future__ import annotations

import io
import logging
from typing import Any

import torch

from selfment_dist.model.artifact import save_artifact
from selfment_dist.model.backbone import DEFAULT_BACKBONE, _create, backbone_family, check_image_size
from selfment_dist.model.head import PatchHead
from selfment_dist.io.output_access import disk_fault, prepare_output
from selfment_dist.io.storage import read_file, url_to_fs
from selfment_dist.model.segmenter import default_inference_size
from selfment_dist.errors import UserValueError

logger = logging.getLogger(__name__)

__all__ = ["import_official_checkpoint", "official_state_to_head", "OFFICIAL_KEY_MAP"]

#: Official head parameter → ours.
OFFICIAL_KEY_MAP = {
    "proj.0.weight": "mlp.0.weight",
    "proj.0.bias": "mlp.0.bias",
    "proj.2.weight": "mlp.2.weight",
    "proj.2.bias": "mlp.2.bias",
    "classifier.weight": "classifier.weight",
    "classifier.bias": "classifier.bias",
}

# The official code loads DINOv3 through its torch.hub names; timm names the same models so.
_HUB_TO_TIMM = {
    "dinov3_vits16": "vit_small_patch16_dinov3.lvd1689m",
    "dinov3_vits16plus": "vit_small_plus_patch16_dinov3.lvd1689m",
    "dinov3_vitb16": "vit_base_patch16_dinov3.lvd1689m",
    "dinov3_vitl16": "vit_large_patch16_dinov3.lvd1689m",
    "dinov3_vith16plus": "vit_huge_plus_patch16_dinov3.lvd1689m",
    "dinov3_vit7b16": "vit_7b_patch16_dinov3.lvd1689m",
    "dino_vits16": "vit_small_patch16_224.dino",
    "dino_vits8": "vit_small_patch8_224.dino",
    "dino_vitb16": "vit_base_patch16_224.dino",
    "dino_vitb8": "vit_base_patch8_224.dino",
}


def official_state_to_head(state: dict[str, Any], *, source: str = "checkpoint") -> PatchHead:
    """An official ``model_state`` → our :class:`PatchHead` holding the same weights.

    Raises:
        ValueError: a tensor that cannot be mapped, a missing tensor, or shapes that do not
            make the official architecture.
    """
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    unknown = sorted(k for k in state if k not in OFFICIAL_KEY_MAP)
    if unknown:
        raise UserValueError(f"{source}: tensors that are not part of the official head: "
                         f"{', '.join(unknown)} (expected {', '.join(OFFICIAL_KEY_MAP)})")
    missing = sorted(k for k in OFFICIAL_KEY_MAP if k not in state)
    if missing:
        raise UserValueError(f"{source}: the head lacks {', '.join(missing)}")
    for key, value in state.items():
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise UserValueError(f"{source}: {key} is not a float tensor")
    w0, w2, wc = state["proj.0.weight"], state["proj.2.weight"], state["classifier.weight"]
    if w0.dim() != 2 or w2.dim() != 2 or wc.dim() != 2:
        raise UserValueError(f"{source}: proj.0/proj.2/classifier weights must be matrices")
    hidden, in_dim = w0.shape
    embed_dim = w2.shape[0]
    expected = {"proj.0.bias": (hidden,), "proj.2.weight": (embed_dim, hidden),
                "proj.2.bias": (embed_dim,), "classifier.weight": (2, embed_dim),
                "classifier.bias": (2,)}
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise UserValueError(f"{source}: {key} has shape {tuple(state[key].shape)}, the official "
                             f"head with in_dim={in_dim}, embed_dim={hidden} needs {shape}")
    head = PatchHead(in_dim, embed_dim, hidden_dim=hidden)
    head.load_state_dict({OFFICIAL_KEY_MAP[k]: v.float() for k, v in state.items()}, strict=True)
    return head.eval()


def _read_checkpoint(uri: str, storage_options: dict | None) -> dict:
    data = read_file(*url_to_fs(uri, storage_options), f"head checkpoint {uri} (the official "
                     "train.py's HEAD.pth)")
    try:
        # weights_only: a checkpoint is data, never code to run.
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserValueError(f"{uri} is not a torch checkpoint that loads with weights_only=True: "
                         f"{type(exc).__name__}: {exc}") from None


def import_official_checkpoint(*, head: str, output: str, backbone: str | None = None,
                               weights: str = "hub", image_size: int | None = None,
                               storage_options: dict | None = None,
                               address: str | None = None, create_bucket: bool = False) -> dict:
    """Turn an official Selfment head checkpoint into a model artifact at ``output``.

    Args:
        head: the ``.pth`` file (local or fsspec URL): ``{"model_state": ..., "args": ...}``, or a
            bare state dict.
        output: the artifact folder to write.
        backbone: timm name of the DINO backbone; default: ``args["dino_model_name"]`` mapped to
            timm (e.g. ``dinov3_vit7b16`` → ``vit_7b_patch16_dinov3.lvd1689m``), else ours.
        weights: the backbone's weights (``hub``, ``random`` or a checkpoint path/URI, e.g. the
            official DINOv3 ``.pth``), recorded for ``segment``.
        image_size: the inference size; default: twice ``args["img_size"]`` (official: 1536).
        storage_options: fsspec options for ``head``, ``output`` and ``weights``.
        address: unused (every command takes it); the import runs on this machine.
        create_bucket: create the output's bucket when it does not exist (else refuse it).

    Returns:
        ``{"status": "imported", "output", "backbone", "weights", "in_dim", "embed_dim",
        "training_image_size", "inference_image_size", "args"}``.

    Raises:
        FileNotFoundError / ValueError: unreadable checkpoint, unmappable tensors, or a head
            whose input width differs from the backbone's feature width.
        OutputNotWritableError / MissingBucketError: ``output`` cannot be written (a file in
            the way, a parent that is a file, read-only) or its bucket is missing; checked
            once the checkpoint is, before anything is written.
    """
    ckpt = _read_checkpoint(head, storage_options)
    if not isinstance(ckpt, dict):
        raise UserValueError(f"{head}: expected a dict checkpoint, got {type(ckpt).__name__}")
    state = ckpt.get("model_state", ckpt)
    args = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {}
    if not isinstance(state, dict):
        raise UserValueError(f"{head}: model_state is not a state dict")
    patch_head = official_state_to_head(state, source=head)

    name = backbone or _HUB_TO_TIMM.get(str(args.get("dino_model_name", "")), None) or DEFAULT_BACKBONE
    backbone_family(name)  # ValueError naming the supported ones
    trained = int(args.get("img_size", 768))
    size = int(image_size) if image_size is not None else default_inference_size(trained)
    check_image_size(name, size)
    feature_dim = backbone_feature_dim(name)
    if patch_head.in_dim != feature_dim:
        raise UserValueError(
            f"{head}: the head takes {patch_head.in_dim}-channel features but {name} gives "
            f"{feature_dim}; pass the backbone it was trained on with --backbone "
            f"(checkpoint args: dino_model_name={args.get('dino_model_name')!r}, "
            f"dino_type={args.get('dino_type')!r})")
    meta = {"backbone": name, "weights": str(weights), "image_size": trained,
            "inference_image_size": size, "feature_dim": feature_dim,
            "hidden_dim": patch_head.hidden_dim,
            "imported_from": {"head": head, "format": "geshang777/Selfment train.py",
                              "epoch": ckpt.get("epoch"), "args": _jsonable(args)}}
    _save(output, patch_head, meta, storage_options, create_bucket)
    logger.info("imported %s -> %s (backbone %s, in_dim %d, embed_dim %d, inference at %d px)",
                head, output, name, patch_head.in_dim, patch_head.embed_dim, size)
    return {"status": "imported", "output": output, "backbone": name, "weights": str(weights),
            "in_dim": patch_head.in_dim, "embed_dim": patch_head.embed_dim,
            "training_image_size": trained, "inference_image_size": size,
            "args": _jsonable(args)}


def _save(output: str, head: PatchHead, meta: dict, storage_options: dict | None,
          create_bucket: bool) -> None:
    """The artifact at ``output``, prepared first (one line when it cannot be written); a
    disk that fills up or turns read-only meanwhile is one line too."""
    fs, root = url_to_fs(output, storage_options)
    prepare_output(fs, root, output, create_bucket=create_bucket)
    try:
        save_artifact(output, head, meta, storage_options=storage_options)
    except OSError as exc:
        fault = disk_fault(exc, output)
        if fault is None:
            raise
        raise fault from exc


def backbone_feature_dim(name: str) -> int:
    """Feature width C of a timm backbone, built on the meta device: no memory, no weights (a
    7B model is not needed to read one number)."""
    with torch.device("meta"):
        return int(_create(name, None).embed_dim)


def _jsonable(args: dict) -> dict:
    out = {}
    for key, value in args.items():
        out[str(key)] = value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
    return out
