"""Backbone + head → saliency maps: the library object a segmentation actor wraps.

Like segment-anything's predictor: :class:`Segmenter` holds a frozen DINO backbone and a trained
:class:`~selfment_dist.model.head.PatchHead` on one device, loaded once (usually from a model artifact),
and turns batches of images into foreground probabilities::

    seg = Segmenter.from_artifact("s3://bucket/models/run1", image_size=1024)
    sal = seg.saliency(images)                  # float32 (B, S, S, 3) in [0, 1] -> (B, h, w)
    full = upsample(sal[0], (H, W))             # float32 (H, W) in [0, 1]
    png = to_png_bytes(full)                    # 8-bit greyscale PNG, floor(255 * s)
    maps = seg.predict([pil_a, pil_b])          # uint8 (H, W) each, at the images' own sizes

The head works on per-patch features, so a model trained at one ``image_size`` runs at any other
multiple of the backbone's patch size (larger is usually better).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from selfment_dist.model.artifact import load_artifact
from selfment_dist.model.backbone import (Backbone, backbone_family, build_backbone, check_image_size,
                       resize_square)
from selfment_dist.defaults import INFERENCE_SCALE, default_inference_size  # noqa: F401 (re-exported)
from selfment_dist.model.head import PatchHead
from selfment_dist.model.maps import to_png_bytes, to_uint8, upsample  # noqa: F401 (re-exported)
from selfment_dist.errors import UserValueError

logger = logging.getLogger(__name__)

__all__ = ["Segmenter", "upsample", "to_uint8", "to_png_bytes", "resolve_image_size",
           "default_inference_size"]


# ---------------------------------------------------------------------------------------------
# Artifact metadata

def resolve_image_size(meta: dict[str, Any], image_size: int | None = None) -> int:
    """The inference size: ``image_size`` if given, else the artifact's ``inference_image_size``
    (for artifacts written before it was recorded: twice the training size, as the official
    recipe).

    Checked here, before any model is built, so a bad size fails fast with a clear message.

    Raises:
        ValueError: no size anywhere, or a size that is not a positive multiple of the
            backbone's patch size.
    """
    name = _meta_backbone(meta)
    backbone_family(name)  # ValueError naming the supported backbones
    size = image_size
    if size is None:
        size = meta.get("inference_image_size")
    if size is None:
        trained = meta.get("image_size")
        if trained is None and isinstance(meta.get("backbone"), dict):
            trained = meta["backbone"].get("image_size")
        if trained is None:
            raise UserValueError("the model artifact records no image_size; pass image_size=")
        size = default_inference_size(trained)
    try:
        check_image_size(name, size)
    except ValueError as exc:
        trained = meta.get("image_size", "an unrecorded size")
        raise UserValueError(f"inference image_size: {exc} (the model was trained at "
                         f"{trained}; any multiple of the patch size works)") from None
    return int(size)


def _meta_backbone(meta: dict[str, Any]) -> str:
    name = meta.get("backbone")
    if isinstance(name, dict):  # Backbone.describe() stored whole
        name = name.get("name")
    if not isinstance(name, str) or not name:
        raise UserValueError(f"the model artifact's model.json names no backbone (got {name!r})")
    return name


def _meta_weights(meta: dict[str, Any]) -> str:
    weights = meta.get("weights")
    if weights is None and isinstance(meta.get("backbone"), dict):
        weights = meta["backbone"].get("weights")
    if not weights:
        raise UserValueError("the model artifact's model.json records no backbone weights; "
                         "pass weights= ('hub', 'random' or a checkpoint path/URI)")
    return str(weights)


# ---------------------------------------------------------------------------------------------
# The segmenter

class Segmenter:
    """A frozen DINO backbone and a trained patch head on one device.

    Args:
        backbone: the :class:`~selfment_dist.model.backbone.Backbone` the head was trained on (any
            ``image_size`` that is a multiple of its patch size).
        head: the trained :class:`~selfment_dist.model.head.PatchHead`; moved to the backbone's device
            and put in eval mode.
        meta: the artifact's ``model.json`` (kept for reference; may be empty).

    Attributes:
        image_size: side S of the square input; ``grid`` = (h, w) of the saliency maps;
        device: where both models run.
    """

    def __init__(self, backbone: Backbone, head: PatchHead, *, meta: dict[str, Any] | None = None):
        if head.in_dim != backbone.embed_dim:
            raise UserValueError(f"the head expects {head.in_dim}-channel features but backbone "
                             f"{backbone.name} gives {backbone.embed_dim}")
        self.backbone = backbone
        self.head = head.to(backbone.device).eval()
        self.meta = dict(meta or {})

    @classmethod
    def from_artifact(cls, uri: str, *, image_size: int | None = None,
                      device: str | torch.device | None = None,
                      storage_options: dict | None = None,
                      weights: str | None = None, precision: str = "fp32") -> "Segmenter":
        """Rebuild backbone and head from a model artifact (``head.safetensors`` + ``model.json``).

        Args:
            uri: the artifact folder, local or any fsspec URL.
            image_size: inference size; default: ``inference_image_size`` in ``model.json``
                (twice the training size unless recorded otherwise). Any multiple of the backbone's patch size works, larger than the training size
                included.
            device: default ``cuda`` when available, else ``cpu``.
            storage_options: fsspec options for the artifact and a checkpoint URI.
            weights: override the backbone weights recorded in ``model.json`` (``"hub"``,
                ``"random"`` or a checkpoint path/URI), e.g. a local copy of the checkpoint.
            precision: the backbone's ``--precision`` (fp32, the official numerics; tf32;
                bf16; ``auto`` = fp32).
        Raises:
            FileNotFoundError / ValueError: a missing or malformed artifact, or an image size
            that is not a multiple of the patch size.
        """
        head, meta = load_artifact(uri, storage_options=storage_options)
        try:
            name = _meta_backbone(meta)
            size = resolve_image_size(meta, image_size)
            weights = str(weights) if weights is not None else _meta_weights(meta)
        except ValueError as exc:
            raise UserValueError(f"model artifact {uri}: {exc}") from None
        backbone = build_backbone(name, weights=weights, image_size=size, device=device,
                                  storage_options=storage_options, precision=precision)
        segmenter = cls(backbone, head, meta=meta)
        logger.info("segmenter from %s: %r", uri, backbone)
        return segmenter

    def __repr__(self) -> str:
        return f"Segmenter(backbone={self.backbone!r}, head_in_dim={self.head.in_dim})"

    @property
    def image_size(self) -> int:
        return self.backbone.image_size

    @property
    def grid(self) -> tuple[int, int]:
        return self.backbone.grid

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    def saliency_torch(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Like :meth:`saliency`, but returns float32 (B, h, w) on :attr:`device`."""
        feats = self.backbone(images)          # (B, h, w, C) unit-norm
        return self.head.saliency(feats)        # softmax(logits)[..., 1]

    def saliency(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """Foreground probability of every patch.

        Args:
            images: float32 (B, S, S, 3) RGB in [0, 1], HWC, S == :attr:`image_size`, from
                :func:`~selfment_dist.model.backbone.resize_square` (or uint8 already at size S);
                numpy or torch on any device.
        Returns:
            float32 numpy (B, h, w) in [0, 1], ``(h, w) == grid``: softmax(logits)[..., 1].
        """
        return self.saliency_torch(images).float().cpu().numpy()

    def predict(self, images: Sequence[Image.Image | np.ndarray] | Image.Image, *,
                batch_size: int = 8) -> list[np.ndarray]:
        """Saliency maps at the images' own sizes.

        Args:
            images: PIL images (any mode; EXIF orientation is the caller's, see
                :func:`~selfment_dist.io.images.decode_image`) or uint8 (H, W, 3) RGB arrays;
                a single image is taken as a list of one.
            batch_size: images per backbone call.
        Returns:
            one uint8 (H, W) map per image, ``floor(255 * s)`` of the upsampled saliency.
        """
        if isinstance(images, (Image.Image, np.ndarray)) and not (
                isinstance(images, np.ndarray) and images.ndim == 4):
            images = [images]
        pils = [im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im, np.uint8))
                for im in images]
        maps: list[np.ndarray] = []
        for start in range(0, len(pils), max(1, int(batch_size))):
            chunk = pils[start:start + batch_size]
            batch = np.stack([resize_square(im, self.image_size) for im in chunk])
            sal = self.saliency_torch(batch)
            # Upsample on the device, one image at a time (sizes differ).
            maps.extend(to_uint8(upsample(s, (im.height, im.width))) for s, im in zip(sal, chunk))
        return maps
