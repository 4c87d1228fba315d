"""The worker loop of ``selfment train``: what each Ray Train worker (a DDP rank) runs.

Per step: a batch of the worker's shard → features (the stored column, or the frozen backbone in
the worker) → :class:`~selfment_dist.model.head.PatchHead` (DDP) → ``selfment_loss`` → Adam, in fp32 (the
official code) unless ``precision`` is bf16 (autocast, GPU only). The ranks stay in lockstep (every rank steps, reports and checkpoints
together); losses are averaged over the ranks' images; metrics and checkpoints go out through
``ray.train.report`` (see :mod:`._train_checkpoints`).
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch

from selfment_dist.defaults import resolve_precision
from selfment_dist.model.head import PatchHead
from selfment_dist.io.masks import decode_mask
from selfment_dist.model.losses import selfment_loss
from selfment_dist.pipeline._internal import faults
from selfment_dist.pipeline._internal.train_checkpoints import LOSS_KEYS, Progress, report, restore
from selfment_dist.pipeline._internal.train_spec import TrainLoopSpec

logger = logging.getLogger(__name__)

__all__ = ["train_loop", "DATASET"]

DATASET = "train"
_LOG_EVERY_S = 10.0
# Ray Train V2 hands each report to its controller through a one-slot queue that the controller
# drains once per poll (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by default): a report every step
# would stall every step by up to that long. Metrics (means since the last report) therefore go
# out at every checkpoint, at each epoch's end and otherwise at most every few seconds.
_REPORT_EVERY_S = 5.0


# ---------------------------------------------------------------------------------------------
# The loop

def train_loop(config: dict) -> None:
    """Ray Train per-worker function (see the module docstring for what it does).

    ``config``: ``{"spec": TrainLoopSpec}`` (Ray Train hands the loop one dict).
    """
    import ray.train
    import ray.train.torch

    spec: TrainLoopSpec = config["spec"]
    s = spec.settings
    _worker_logging(spec.log_level)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if spec.threads:
        torch.set_num_threads(spec.threads)
    device = ray.train.torch.get_device()
    amp = device.type == "cuda" and spec.settings.precision == "bf16"  # default fp32: official
    grid = tuple(spec.grid)

    backbone, head, optimizer, progress = _build(spec, device, rank)
    in_dim = head.in_dim
    model = ray.train.torch.prepare_model(head)  # DDP over the workers (no-op for one)

    shard = ray.train.get_dataset_shard(DATASET)
    epochs = s.epochs
    window = _Window()
    last_log = last_report = time.perf_counter()
    for epoch in range(progress.epoch, epochs):
        batches = _epoch_batches(shard, s, epoch, progress.step_in_epoch)
        mark = time.perf_counter()
        batch = next(batches, None)
        have, _ = _sync_flags(batch is not None, False, world, device)
        while have:
            # One step: features → head (DDP) → loss → Adam.
            start = time.perf_counter()
            feats, labels = _to_tensors(batch, backbone, grid, in_dim, device)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
                logits, emb = model(feats)
            losses = selfment_loss(logits, emb, labels, sim_weight=s.sim_weight,
                                   temperature=s.temperature, contrastive=s.contrastive)
            optimizer.zero_grad(set_to_none=True)
            losses["total"].backward()
            optimizer.step()
            if device.type == "cuda":  # kernels run asynchronously: time them, not their launch
                torch.cuda.synchronize(device)
            step_s = time.perf_counter() - start

            # Book-keeping: losses averaged over all ranks' images.
            values, n_images = _mean_over_ranks(losses, len(labels), world, device)
            progress.add_step(values, n_images, step_s)
            window.add(values, n_images)
            faults.train_step(rank, world, progress.global_step, head, batch["key"])  # tests

            # Every rank learns whether the epoch goes on and whether rank 0 wants a report.
            nxt = next(batches, None)
            want = rank == 0 and time.perf_counter() - last_report >= _REPORT_EVERY_S
            have, report_now = _sync_flags(nxt is not None, want, world, device)
            save = not have or progress.global_step % s.checkpoint_every == 0
            metrics = {"epoch": epoch + 1, "step": progress.global_step,
                       "images_seen": progress.images_seen, **window.means()}
            if not have:  # epoch end
                record = _close_epoch(progress, epoch)
                metrics.update({f"epoch_{k}": record[k] for k in LOSS_KEYS})
            if rank == 0 and (not have or time.perf_counter() - last_log >= _LOG_EVERY_S):
                last_log = time.perf_counter()
                _log_progress(progress, epoch, epochs, spec.steps_per_epoch,
                              window.means(), not have)
            if save or report_now:
                report(metrics, progress, head, optimizer, save, rank)
                window = _Window()
                last_report = time.perf_counter()
            batch = nxt
            now = time.perf_counter()
            progress.wait_seconds += now - mark - step_s
            mark = now


def _epoch_batches(shard, s, epoch: int, done_steps: int):
    """This rank's batches of ``epoch``, past the ``done_steps`` a resumed run already did."""
    local = s.shuffle == "local"  # "full": the dataset is reshuffled per epoch
    batches = iter(shard.iter_batches(
        batch_size=s.batch_size, batch_format="numpy", prefetch_batches=2,
        local_shuffle_buffer_size=4 * s.batch_size if local else None,
        local_shuffle_seed=s.seed * 100_003 + epoch if local else None))
    for _ in range(done_steps):  # resumed mid-epoch: skip what was done
        next(batches, None)
    return batches


def _build(spec: TrainLoopSpec, device: torch.device, rank: int):
    """(frozen backbone or None, head, Adam, progress), restored from Ray Train's checkpoint
    when this is a restart or a resumed run."""
    import ray.train

    s = spec.settings
    backbone = None
    in_dim = spec.in_dim
    if spec.feature_source == "backbone":
        from selfment_dist.model.backbone import build_backbone
        backbone = build_backbone(spec.backbone, weights=spec.weights,
                                  image_size=spec.image_size, device=device,
                                  storage_options=s.storage_options,
                                  # The stage's precision (auto: fp32, the official numerics).
                                  precision=resolve_precision(s.precision))
        if tuple(backbone.grid) != tuple(spec.grid):
            raise ValueError(f"backbone grid {backbone.grid} != pseudo-label grid {spec.grid}")
        in_dim = backbone.embed_dim

    torch.manual_seed(s.seed)
    head = PatchHead(in_dim, s.embed_dim).to(device)
    optimizer = torch.optim.Adam(head.parameters(), lr=spec.lr, weight_decay=s.weight_decay)
    progress = Progress(in_dim=in_dim, embed_dim=s.embed_dim)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            progress = restore(d, head, optimizer, device)
        progress.resumes.append(progress.global_step)
        if rank == 0 and progress.epoch >= s.epochs:
            logger.info("the checkpoint of step %d already has %d epochs: nothing to train",
                        progress.global_step, progress.epoch)
        elif rank == 0:
            logger.info("resuming from step %d (epoch %d, %d steps into it)",
                        progress.global_step, progress.epoch + 1, progress.step_in_epoch)
    return backbone, head, optimizer, progress


class _Window:
    """Image-weighted loss means over the steps since the last report."""

    def __init__(self):
        self.sums = dict.fromkeys(LOSS_KEYS, 0.0)
        self.images = self.steps = 0

    def add(self, values: dict, n_images: int) -> None:
        for k in LOSS_KEYS:
            self.sums[k] += values[k] * n_images
        self.images += n_images
        self.steps += 1

    def means(self) -> dict:
        n = max(self.images, 1)
        return {**{k: v / n for k, v in self.sums.items()}, "images": self.images,
                "steps": self.steps}


def _worker_logging(level: int) -> None:
    """Send the package's log records to the worker's stderr (Ray forwards it to the driver)."""
    lib = logging.getLogger("selfment_dist")
    lib.setLevel(level)
    if not lib.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        lib.addHandler(handler)


# ---------------------------------------------------------------------------------------------
# One step's pieces

def _to_tensors(batch: dict, backbone, grid: tuple[int, int], in_dim: int,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """One Ray Data batch → features (B, N, C) on device and labels bool (B, N)."""
    h, w = grid
    n = h * w
    masks = []
    for key, gh, gw, data in zip(batch["key"], batch["grid_h"], batch["grid_w"], batch["mask"]):
        if (int(gh), int(gw)) != grid:
            raise ValueError(f"row {key}: grid ({gh}, {gw}) differs from the run's {grid}")
        masks.append(decode_mask(data, h, w).reshape(n))
    labels = torch.from_numpy(np.stack(masks)).to(device, non_blocking=True)
    if backbone is not None:
        feats = backbone(batch["image"]).reshape(len(masks), n, in_dim)
    else:
        flat = [np.frombuffer(f, dtype="<f2") for f in batch["features"]]
        for key, f in zip(batch["key"], flat):
            if f.size != n * in_dim:
                raise ValueError(f"row {key}: {f.size} feature values, expected {h}x{w}x{in_dim}")
        feats = torch.from_numpy(np.stack(flat)).to(device, non_blocking=True)
        feats = feats.view(len(masks), n, in_dim).float()
    return feats, labels


def _sync_flags(have: bool, want_report: bool, world: int,
                device: torch.device) -> tuple[bool, bool]:
    """(every rank has a batch, some rank wants a report): keeps the ranks' steps and reports
    in lockstep (``ray.train.report`` and DDP's all-reduce must be called by all)."""
    if world == 1:
        return have, want_report
    import torch.distributed as dist
    t = torch.tensor([int(have), int(not want_report)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t[0].item()), not bool(t[1].item())


def _mean_over_ranks(losses: dict, n: int, world: int,
                     device: torch.device) -> tuple[dict[str, float], int]:
    """Image-weighted mean of the losses over all ranks, and the images of the step."""
    t = torch.stack([losses[k].detach().float() * n for k in LOSS_KEYS]
                    + [torch.tensor(float(n), device=losses["total"].device)]).to(device)
    if world > 1:
        import torch.distributed as dist
        dist.all_reduce(t)
    t = t.cpu()
    total_n = int(round(t[-1].item()))
    return {k: t[i].item() / max(total_n, 1) for i, k in enumerate(LOSS_KEYS)}, total_n


def _close_epoch(progress: Progress, epoch: int) -> dict:
    n = max(progress.epoch_images, 1)
    record = {"epoch": epoch + 1, "steps": progress.step_in_epoch,
              "images": progress.epoch_images, "seconds": round(progress.epoch_seconds, 3),
              **{k: progress.epoch_sums.get(k, 0.0) / n for k in LOSS_KEYS}}
    progress.history.append(record)
    progress.epoch += 1
    progress.step_in_epoch = progress.epoch_images = 0
    progress.epoch_seconds = 0.0
    progress.epoch_sums = {}
    return record


def _log_progress(progress: Progress, epoch: int, epochs: int, steps_est: int,
                  values: dict, epoch_end: bool) -> None:
    if epoch_end:
        r = progress.history[-1]
        logger.info("epoch %d/%d done: loss %.4f (bce %.4f, dice %.4f, contrastive %.4f), "
                    "%d images in %.1fs (%.1f images/s)", epoch + 1, epochs, r["total"], r["bce"],
                    r["dice"], r["contrastive"], r["images"], r["seconds"],
                    r["images"] / max(r["seconds"], 1e-9))
    else:
        logger.info("epoch %d/%d step %d/~%d: loss %.4f (bce %.4f, dice %.4f, contrastive %.4f)",
                    epoch + 1, epochs, progress.step_in_epoch, steps_est, values["total"],
                    values["bce"], values["dice"], values["contrastive"])
