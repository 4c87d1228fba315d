"""Checkpoints and resume of ``selfment train``: what a checkpoint holds, and the run's files.

A checkpoint (written by rank 0 through ``ray.train.report``, every ``checkpoint_every`` steps and
at each epoch's end) holds the head's and Adam's state (``state.pt``) and the training progress
(``progress.json``: :class:`Progress`). A restarted worker, or a re-run on the same output,
continues from the latest one (:func:`restore`); a re-run must share the settings that shape
the model or the optimisation (:data:`RESUME_KEYS`, :func:`check_same_run`). At the end the last
checkpoint becomes the model artifact (:func:`save_model`).
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field

import torch

from selfment_dist.model.artifact import save_artifact
from selfment_dist.defaults import default_inference_size
from selfment_dist.model.head import PatchHead
from selfment_dist.io.storage import join, read_json  # noqa: F401 (read_json: imported from here)
from selfment_dist.pipeline._internal.train_data import LabelSet
from selfment_dist.errors import UserValueError

__all__ = ["Progress", "report", "restore", "read_json", "check_same_run", "save_model",
           "RUN_NAME", "CONFIG_NAME", "LOSS_KEYS", "RESUME_KEYS"]

RUN_NAME = "_train"
"""Ray Train's run folder inside ``output`` (``RunConfig(name=...)``)."""
CONFIG_NAME = "_train_config.json"
LOSS_KEYS = ("total", "bce", "dice", "contrastive")
# Settings a re-run must share with the run it resumes or returns.
RESUME_KEYS = ("labels", "feature_source", "embed_dim", "batch_size", "lr", "weight_decay",
               "sim_weight", "temperature", "seed", "shuffle", "contrastive")
STATE_FILE = "state.pt"
_PROGRESS_FILE = "progress.json"


# ---------------------------------------------------------------------------------------------
# In the workers: progress, saving and restoring

@dataclass
class Progress:
    """Training progress, saved with every checkpoint (``progress.json``)."""

    epoch: int = 0                 # epochs finished
    step_in_epoch: int = 0         # steps done in the current epoch
    global_step: int = 0
    images_seen: int = 0
    train_seconds: float = 0.0      # forward/backward/optimizer time
    wait_seconds: float = 0.0       # waiting for batches, cross-rank sync, reports, checkpoints
    history: list = field(default_factory=list)   # one record per finished epoch
    epoch_sums: dict = field(default_factory=dict)  # image-weighted loss sums of this epoch
    epoch_images: int = 0
    epoch_seconds: float = 0.0
    resumes: list = field(default_factory=list)   # global steps this run resumed from
    in_dim: int = 0
    embed_dim: int = 0

    def add_step(self, values: dict, n_images: int, seconds: float) -> None:
        self.global_step += 1
        self.step_in_epoch += 1
        self.images_seen += n_images
        self.epoch_images += n_images
        self.epoch_seconds += seconds
        self.train_seconds += seconds
        for k in LOSS_KEYS:
            self.epoch_sums[k] = self.epoch_sums.get(k, 0.0) + values[k] * n_images

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Progress":
        return cls(**json.loads(text))


def report(metrics: dict, progress: Progress, head: PatchHead, optimizer, save: bool,
            rank: int) -> None:
    """``ray.train.report`` on every rank; rank 0 attaches the checkpoint when ``save``."""
    import ray.train

    if not (save and rank == 0):
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        torch.save({"head": head.state_dict(), "optimizer": optimizer.state_dict()},
                   os.path.join(d, STATE_FILE))
        with open(os.path.join(d, _PROGRESS_FILE), "w", encoding="utf-8") as f:
            f.write(progress.to_json())
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                         checkpoint_dir_name=f"checkpoint-step{progress.global_step:08d}")


def restore(directory: str, head: PatchHead | None, optimizer, device) -> Progress:
    with open(os.path.join(directory, _PROGRESS_FILE), encoding="utf-8") as f:
        progress = Progress.from_json(f.read())
    if head is not None:
        # Load on CPU: load_state_dict copies the head's tensors to its device, and Adam puts
        # its moments next to their parameters but keeps ``step`` on CPU (a CUDA ``step`` costs
        # a sync per parameter per step).
        state = torch.load(os.path.join(directory, STATE_FILE), map_location="cpu",
                           weights_only=True)
        head.load_state_dict(state["head"])
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
    return progress


# ---------------------------------------------------------------------------------------------
# In the driver: the run's files, and the model at the end

def check_same_run(previous: dict | None, config: dict, output: str) -> None:
    if not previous:
        return
    diff = [f"{k}: {previous.get(k)!r} there, {config[k]!r} now" for k in RESUME_KEYS
            if previous.get(k) != config[k]]
    if diff:
        raise UserValueError(f"{output} holds a training run with other settings ("
                         + "; ".join(diff) + "); use the same settings or a new output")


def save_model(result, ls: LabelSet, config: dict, output: str, storage_options: dict | None,
            wall: float) -> dict:
    """The last checkpoint → model artifact at ``output``; returns the training summary."""
    if result.checkpoint is None:
        raise RuntimeError(f"training produced no checkpoint under {join(output, RUN_NAME)}")
    with result.checkpoint.as_directory() as d:
        progress = restore(d, None, None, "cpu")
        head = PatchHead(progress.in_dim, progress.embed_dim)
        state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
        head.load_state_dict(state["head"])
    summary = {
        "status": "trained", "output": output, "labels": ls.uri,
        "epochs": progress.epoch, "steps": progress.global_step,
        "images_seen": progress.images_seen, "rows": ls.rows, "error_rows": ls.errors,
        "low_confidence_rows": ls.low_confidence, "row_filter": ls.row_filter,
        "no_object_rows": ls.no_object_rows, "precision": config.get("precision", "fp32"),
        "train_rows": ls.usable, "workers": config["workers"], "batch_size": config["batch_size"],
        "feature_source": config["feature_source"], "feature_dim": progress.in_dim,
        "embed_dim": progress.embed_dim, "lr": config["lr"],
        "weight_decay": config["weight_decay"], "sim_weight": config["sim_weight"],
        "temperature": config["temperature"], "shuffle": config["shuffle"],
        "contrastive": config["contrastive"], "history": progress.history,
        "first_loss": progress.history[0] if progress.history else None,
        "final_loss": progress.history[-1] if progress.history else None,
        "resumed_from_steps": progress.resumes,
        "train_seconds": round(progress.train_seconds, 3),
        "wait_seconds": round(progress.wait_seconds, 3),
        "train_images_per_s": round(progress.images_seen / max(progress.train_seconds, 1e-9), 3),
        "wall_s": round(wall, 3),
    }
    meta = {"backbone": ls.backbone, "weights": ls.weights, "image_size": ls.image_size,
            "inference_image_size": default_inference_size(ls.image_size),
            "grid": list(ls.grid), "feature_dim": progress.in_dim,
            "embed_dim": progress.embed_dim, "training": summary}
    save_artifact(output, head, meta, storage_options=storage_options)
    return summary
