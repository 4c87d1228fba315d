"""The Selfment segmentation head: a small per-patch MLP over frozen DINO features.

    feats (..., in_dim) ──► Linear(in_dim, 128) ─► ReLU ─► Linear(128, embed_dim) = emb
                                                              └─► Linear(embed_dim, 2) = logits

``emb`` feeds the supervised contrastive loss, ``logits`` the BCE and Dice losses
(see ``selfment_dist.model.losses``); channel 1 of the logits is foreground.
"""
from __future__ import annotations

import torch
from torch import nn

HIDDEN_DIM = 128
"""Width of the MLP's hidden layer (fixed by the paper)."""


class PatchHead(nn.Module):
    """Per-patch foreground classifier with an embedding for the contrastive loss.

    Args:
        in_dim: channels C of the backbone's patch features.
        embed_dim: width of the embedding (the paper's 128).
        hidden_dim: width of the hidden layer (128; the official head uses its ``embed_dim``,
            so an imported official head with another ``embed_dim`` sets both).

    The head does not normalise its input: it is trained on, and expects, the L2-normalised
    patch features the backbone returns.
    """

    def __init__(self, in_dim: int, embed_dim: int = 128, *, hidden_dim: int = HIDDEN_DIM):
        super().__init__()
        if int(in_dim) < 1 or int(embed_dim) < 1 or int(hidden_dim) < 1:
            raise ValueError(f"PatchHead needs in_dim, embed_dim and hidden_dim >= 1, got "
                             f"{in_dim}, {embed_dim}, {hidden_dim}")
        self.in_dim = int(in_dim)
        self.embed_dim = int(embed_dim)
        self.hidden_dim = int(hidden_dim)
        self.mlp = nn.Sequential(
            nn.Linear(self.in_dim, self.hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(self.hidden_dim, self.embed_dim),
        )
        self.classifier = nn.Linear(self.embed_dim, 2)

    def forward(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Classify and embed every patch.

        Args:
            feats: (..., in_dim) patch features, any floating dtype (cast to the head's dtype).

        Returns:
            logits: (..., 2), channel 1 = foreground.
            emb: (..., embed_dim), the (unnormalised) embedding.
        """
        if feats.shape[-1] != self.in_dim:
            raise ValueError(
                f"PatchHead expects features with {self.in_dim} channels in the last dim, "
                f"got shape {tuple(feats.shape)}"
            )
        # Features are often stored as float16; the head's own dtype decides (autocast still applies).
        feats = feats.to(self.classifier.weight.dtype)
        emb = self.mlp(feats)
        return self.classifier(emb), emb

    @torch.no_grad()
    def saliency(self, feats: torch.Tensor) -> torch.Tensor:
        """Foreground probability softmax(logits)[..., 1]: features (..., in_dim) -> float32 (...,) in [0, 1].

        Inference only: runs without autograd.
        """
        logits, _ = self(feats)
        return torch.softmax(logits.float(), dim=-1)[..., 1]
