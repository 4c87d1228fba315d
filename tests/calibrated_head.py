"""A segmentation head whose maps use the whole 0-255 range on a random backbone's features."""
from __future__ import annotations

import numpy as np
import torch

from selfment_dist.model.head import PatchHead


def calibrated_head(backbone, images: np.ndarray) -> PatchHead:
    """A seeded :class:`PatchHead` for ``backbone`` whose fg - bg logits on ``images`` (float32
    (B, S, S, 3) from ``resize_square``) spread over about ±4 around 0."""
    torch.manual_seed(0)
    head = PatchHead(backbone.embed_dim).eval()
    with torch.no_grad():
        logits, _ = head(backbone(images))
        diff = logits[..., 1] - logits[..., 0]
        scale = 4.0 / float(diff.std())
        head.classifier.weight.mul_(scale)
        head.classifier.bias.mul_(scale)
        head.classifier.bias[1] -= float(diff.mean()) * scale
    return head
