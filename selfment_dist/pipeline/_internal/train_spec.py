"""What every Ray Train worker of ``selfment train`` needs, as one typed object.

The driver builds a :class:`TrainLoopSpec` (the stage's settings, whole, plus what it learnt from
the labels and the cluster) and hands it to ``TorchTrainer`` as ``train_loop_config={"spec":
spec}``; the worker loop reads its fields. Ray Train pickles it to each worker.
"""
from __future__ import annotations

from dataclasses import dataclass

from selfment_dist.settings import TrainSettings

__all__ = ["TrainLoopSpec"]


@dataclass(frozen=True)
class TrainLoopSpec:
    """Attributes:
        settings: the stage's settings (optimiser, loss, epochs, batches, checkpoints, seed).
        lr: the learning rate after ``settings.lr_scaling``.
        feature_source: ``"stored"`` (the labels' ``features`` column) or ``"backbone"``.
        backbone, weights, image_size: the pseudo-label run's backbone (``"backbone"`` source).
        in_dim: channels of the stored features (None: the backbone's).
        grid: (grid_h, grid_w) of every usable row.
        threads: torch threads per worker (None: torch's default).
        steps_per_epoch: an estimate, for progress logs.
        log_level: the driver's level for the ``selfment_dist`` loggers.
    """

    settings: TrainSettings
    lr: float
    feature_source: str
    backbone: str | None
    weights: str | None
    image_size: int | None
    in_dim: int | None
    grid: tuple[int, int]
    threads: int | None
    steps_per_epoch: int
    log_level: int
