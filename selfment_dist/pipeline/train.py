"""``selfment train``: pseudo-labels → segmentation head, trained with Ray Train (DDP).

Flow (data moves one way; the driver holds file names, footers and a few small columns)::

    driver: manifest + parquet footers of the labels (counts, grid, feature dim)   io.storage
      → Ray Data: read_parquet(parts) → drop error rows
          [no stored features: read + decode + resize each row's image (CPU tasks)]
      → TorchTrainer: N workers, each iterating its shard (get_dataset_shard); per step
          features (stored ``features`` column, or the frozen backbone in the worker)
          → PatchHead (DDP) → selfment_loss → Adam; bf16 autocast on GPU
          ray.train.report(loss means since the last report) at each checkpoint (every
          ``checkpoint_every`` steps and at each epoch's end) and every few seconds
      → driver: the last checkpoint → model artifact (head.safetensors + model.json) at output

Output layout::

    <output>/head.safetensors, model.json   the artifact; model.json is written last and marks a
                                            finished run (its ``training`` key is the summary)
    <output>/_train_config.json             the run's settings, compared on every re-run
    <output>/_train/                        Ray Train's run folder (``RunConfig(storage_path=
                                            output, name="_train")``): checkpoints + snapshot

Fault tolerance and re-runs (Ray Train V2, the default in Ray 2.60):

- A worker that dies is replaced and every worker restarts from the latest checkpoint
  (``FailureConfig(max_failures)``).
- Running again with the same ``output`` resumes from the latest checkpoint of ``_train/``: V2
  restores a run from ``(storage_path, name)``; ``ray.train.get_checkpoint()`` hands the state to
  the workers. A run resumed mid-epoch skips the batches already done in that epoch (the same
  count; with shuffling, not necessarily the same images).
- A finished run (``model.json`` with at least ``epochs`` epochs done) is returned as is. Asking
  for more epochs continues from its last checkpoint. Changing a setting that shapes the model or
  the optimisation (see ``_RESUME_KEYS``) is an error: choose a new output.
"""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from ..artifact import META_NAME, save_artifact
from ..head import PatchHead
from ..io.masks import decode_mask
from ..io.storage import is_local, join, url_to_fs
from ..losses import selfment_loss
from ..settings import TrainSettings, build_settings

logger = logging.getLogger(__name__)

__all__ = ["run_train", "inspect_labels", "LabelSet", "RUN_NAME", "CONFIG_NAME"]

RUN_NAME = "_train"
"""Ray Train's run folder inside ``output`` (``RunConfig(name=...)``)."""
CONFIG_NAME = "_train_config.json"
MANIFEST_NAME = "_selfment.json"  # the pseudo-label manifest (pipeline.pseudo_label)
DATASET = "train"
LOSS_KEYS = ("total", "bce", "dice", "contrastive")

# Settings a re-run must share with the run it resumes or returns.
_RESUME_KEYS = ("labels", "feature_source", "embed_dim", "batch_size", "lr", "weight_decay",
                "sim_weight", "temperature", "seed")
_CONTAINER_SUFFIXES = (".parquet", ".tar", ".tar.gz", ".tgz")
# Label sets smaller than this (as the workers will see them) are materialised in the object
# store once instead of being read again every epoch.
_MATERIALIZE_MAX_BYTES = 512 * 2**20
_LOG_EVERY_S = 10.0
# Ray Train V2 hands each report to its controller through a one-slot queue that the controller
# drains once per poll (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by default): a report every step
# would stall every step by up to that long. Metrics (means since the last report) therefore go
# out at every checkpoint, at each epoch's end and otherwise at most every few seconds.
_REPORT_EVERY_S = 5.0
_STATE_FILE = "state.pt"
_PROGRESS_FILE = "progress.json"


# ---------------------------------------------------------------------------------------------
# The labels (driver side)

@dataclass
class LabelSet:
    """What the driver knows about a pseudo-label dataset (from its manifest and footers).

    Attributes:
        uri: the dataset folder.
        files: URIs of its parquet parts.
        rows, errors: row counts (error rows have ``error`` set and are skipped).
        grid: (grid_h, grid_w) shared by every usable row.
        feature_source: ``"stored"`` (train on the ``features`` column) or ``"backbone"``
            (recompute features from the image files with the manifest's backbone).
        feature_dim: channels C of the stored features (None when using the backbone).
        backbone, weights, image_size: the pseudo-label run's backbone (from the manifest).
    """

    uri: str
    files: list[str]
    rows: int
    errors: int
    grid: tuple[int, int]
    feature_source: str
    feature_dim: int | None
    backbone: str
    weights: str
    image_size: int
    manifest: dict = field(repr=False, default_factory=dict)

    @property
    def usable(self) -> int:
        return self.rows - self.errors


def inspect_labels(labels: str, *, storage_options: dict | None = None,
                   features: str = "auto") -> LabelSet:
    """Read the manifest, the parquet footers and the small grid/source columns of ``labels``.

    Args:
        labels: folder (local or fsspec URL) written by ``selfment pseudo-label``.
        features: ``"auto"``, ``"stored"`` or ``"backbone"``; see :func:`run_train`. Decides
            ``LabelSet.feature_source``.

    Raises:
        FileNotFoundError: nothing at ``labels``.
        ValueError: no manifest, no parquet parts, no usable row, mixed grids, missing columns,
            ``"stored"`` without a features column, or training through the backbone on rows
            whose image sits inside a parquet/tar container (only files can be re-read).
    """
    if features not in ("auto", "stored", "backbone"):
        raise ValueError(f"features must be 'auto', 'stored' or 'backbone', got {features!r}")
    fs, root = url_to_fs(labels, storage_options)
    root = root.rstrip("/")
    if not fs.exists(root):
        raise FileNotFoundError(f"no pseudo-labels at {labels}: run `selfment pseudo-label` first")
    manifest_path = f"{root}/{MANIFEST_NAME}"
    if not fs.exists(manifest_path):
        raise ValueError(f"{labels} has no {MANIFEST_NAME} manifest: it is not the output of "
                         "`selfment pseudo-label` (the manifest names the backbone to train for)")
    with fs.open(manifest_path, "rt", encoding="utf-8") as f:
        manifest = json.load(f)
    config = manifest.get("config", manifest)
    try:
        backbone, weights = str(config["backbone"]), str(config["weights"])
        image_size = int(config["image_size"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{labels}/{MANIFEST_NAME} lacks backbone/weights/image_size") from exc
    if manifest.get("status", "complete") != "complete":
        logger.warning("labels at %s come from an unfinished pseudo-label run (status %r); "
                       "training on the rows present", labels, manifest.get("status"))

    paths = _parquet_parts(fs, root)
    if not paths:
        raise ValueError(f"no pseudo-label parquet files in {labels}")
    rows = errors = 0
    grids: set[tuple[int, int]] = set()
    has_features = True
    feature_dim = manifest.get("feature_dim")
    containers: list[str] = []  # a few usable rows whose image is inside a container
    required = {"key", "source", "grid_h", "grid_w", "mask", "error"}
    for path in paths:
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            names = set(pf.schema_arrow.names)
            if required - names:
                raise ValueError(f"{path}: not a pseudo-label part, missing columns "
                                 f"{sorted(required - names)}")
            has_features &= "features" in names
            kv = pf.metadata.metadata or {}
            if feature_dim is None and b"selfment.feature_dim" in kv:
                feature_dim = int(kv[b"selfment.feature_dim"])
            table = pf.read(columns=["grid_h", "grid_w", "error", "source"])
        ok = table.filter(table.column("error").is_null())
        rows += table.num_rows
        errors += table.num_rows - ok.num_rows
        grids.update(zip(ok.column("grid_h").to_pylist(), ok.column("grid_w").to_pylist()))
        if len(containers) < 3:
            containers += [s for s in ok.column("source").to_pylist()
                           if str(s).lower().endswith(_CONTAINER_SUFFIXES)][:3]
    if rows == 0:
        raise ValueError(f"the pseudo-labels at {labels} are empty (0 rows)")
    if rows == errors:
        raise ValueError(f"all {rows} pseudo-label rows at {labels} are errors: nothing to train on")
    if len(grids) != 1:
        raise ValueError(f"pseudo-labels at {labels} mix patch grids {sorted(grids)}; one "
                         "pseudo-label run (one image size) per training set")
    if features == "stored" and not has_features:
        raise ValueError(f"features='stored' but the pseudo-labels at {labels} have no "
                         "features column (pseudo-label with --save-features)")
    stored = has_features and features != "backbone"
    if not stored and containers:
        raise ValueError(
            f"training through the backbone re-reads each image from its file, but some images "
            f"of {labels} sit inside parquet/tar containers (e.g. {containers[0]}); "
            "pseudo-label those inputs with --save-features and train on the stored features")
    if stored and feature_dim is None:
        feature_dim = _feature_dim_from_rows(fs, paths)
    return LabelSet(uri=labels, files=[_uri(fs, p) for p in paths], rows=rows, errors=errors,
                    grid=next(iter(grids)), feature_source="stored" if stored else "backbone",
                    feature_dim=int(feature_dim) if stored else None,
                    backbone=backbone, weights=weights, image_size=image_size, manifest=manifest)


def _parquet_parts(fs, root: str) -> list[str]:
    """Parquet files under ``root``, skipping names (and folders) starting with ``_`` or ``.``."""
    found = []
    for path in fs.find(root):
        rel = path[len(root):].lstrip("/")
        if path.endswith(".parquet") and not any(p.startswith(("_", ".")) for p in rel.split("/")):
            found.append(path)
    return sorted(found)


def _feature_dim_from_rows(fs, paths: list[str]) -> int:
    for path in paths:
        with fs.open(path, "rb") as f:
            table = pq.read_table(f, columns=["features", "grid_h", "grid_w", "error"])
        table = table.filter(table.column("error").is_null())
        if table.num_rows:
            row = table.slice(0, 1).to_pylist()[0]
            return len(row["features"]) // (2 * int(row["grid_h"]) * int(row["grid_w"]))
    raise ValueError("no usable row with features")


def _uri(fs, path: str) -> str:
    return path if is_local(fs) else fs.unstrip_protocol(path)


# ---------------------------------------------------------------------------------------------
# Ray Data: the training rows

def load_images(batch: dict[str, np.ndarray], *, image_size: int, storage_options: dict | None,
                max_pixels: int | None) -> dict[str, np.ndarray]:
    """Ray Data UDF: add ``image`` uint8 (n, S, S, 3) read from each row's ``source`` file.

    Rows whose image can no longer be read are dropped with a warning (they were readable when
    they were pseudo-labelled); the other columns pass through.
    """
    from ..backbone import resize_square
    from ..io.images import decode_image

    keep, images = [], []
    for i, (key, source) in enumerate(zip(batch["key"], batch["source"])):
        try:
            fs, path = url_to_fs(str(source), storage_options)
            pil = decode_image(fs.cat_file(path), max_pixels=max_pixels)
            images.append(resize_square(pil, image_size))
            keep.append(i)
        except Exception as exc:  # one unreadable image must not stop the epoch
            logger.warning("skipping %s: cannot read its image %s (%s: %s)", key, source,
                           type(exc).__name__, exc)
    out = {k: v[keep] for k, v in batch.items() if k != "source"}
    out["image"] = (np.stack(images) if images
                    else np.zeros((0, image_size, image_size, 3), dtype=np.uint8))
    return out


def _arrow_fs(uri: str, storage_options: dict | None):
    """(pyarrow filesystem or None for local disk, path) for Ray Data and Ray Train storage."""
    import pyarrow.fs as pafs

    fs, path = url_to_fs(uri, storage_options)
    if is_local(fs):
        return None, os.path.abspath(path)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path.rstrip("/")


def _build_dataset(ls: LabelSet, *, stored: bool, storage_options: dict | None,
                   max_pixels: int | None):
    import ray
    from ray.data.expressions import col

    pa_fs, _ = _arrow_fs(ls.uri, storage_options)
    paths = [_arrow_fs(p, storage_options)[1] for p in ls.files]
    columns = ["key", "grid_h", "grid_w", "mask", "features" if stored else "source", "error"]
    ds = ray.data.read_parquet(paths, filesystem=pa_fs, columns=columns, file_extensions=None)
    ds = ds.filter(expr=col("error").is_null()).drop_columns(["error"])
    h, w = ls.grid
    if stored:
        row_bytes = h * w * (2 * ls.feature_dim) + (h * w + 7) // 8
    else:
        ds = ds.map_batches(load_images, batch_size=16, batch_format="numpy",
                            fn_kwargs={"image_size": ls.image_size,
                                       "storage_options": storage_options,
                                       "max_pixels": max_pixels})
        row_bytes = ls.image_size ** 2 * 3
    if ls.usable * row_bytes <= _MATERIALIZE_MAX_BYTES:
        logger.info("caching the %d training rows (~%.0f MiB) in the object store", ls.usable,
                    ls.usable * row_bytes / 2**20)
        ds = ds.materialize()
    return ds


# ---------------------------------------------------------------------------------------------
# Resources

def _plan_workers(workers: int, use_gpu: bool, resources_per_worker: dict | None):
    """(resources per worker or None for Ray's default, torch threads per worker or None)."""
    import ray

    if resources_per_worker:
        cpus = float(resources_per_worker.get("CPU", 1))
        return dict(resources_per_worker), max(1, int(cpus))
    total = ray.cluster_resources()
    if use_gpu:
        if total.get("GPU", 0) < workers:
            logger.warning("%d GPU workers requested, the cluster has %s GPUs now; Ray Train "
                           "waits for them", workers, total.get("GPU", 0))
        return None, None
    # CPU only: one CPU stays free for Ray Data (reading, decoding); workers share the rest.
    cpus = float(total.get("CPU", 1))
    spare = cpus - 1
    per = spare // workers if spare >= workers else max(spare, cpus / 2) / workers
    return {"CPU": per}, max(1, int(per))


# ---------------------------------------------------------------------------------------------
# The worker

@dataclass
class _Progress:
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
    def from_json(cls, text: str) -> "_Progress":
        return cls(**json.loads(text))


def _train_loop(config: dict) -> None:
    """Ray Train per-worker function (see the module docstring for what it does)."""
    import ray.train
    import ray.train.torch

    _worker_logging(config["log_level"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if config["threads"]:
        torch.set_num_threads(config["threads"])
    device = ray.train.torch.get_device()
    amp = device.type == "cuda"
    grid = tuple(config["grid"])

    backbone, head, optimizer, progress = _build(config, device, rank)
    in_dim = head.in_dim
    model = ray.train.torch.prepare_model(head)  # DDP over the workers (no-op for one)

    shard = ray.train.get_dataset_shard(DATASET)
    batch_size, epochs = config["batch_size"], config["epochs"]
    window = _Window()
    last_log = last_report = time.perf_counter()
    for epoch in range(progress.epoch, epochs):
        batches = iter(shard.iter_batches(
            batch_size=batch_size, batch_format="numpy", prefetch_batches=2,
            local_shuffle_buffer_size=4 * batch_size,
            local_shuffle_seed=config["seed"] * 100_003 + epoch))
        for _ in range(progress.step_in_epoch):  # resumed mid-epoch: skip what was done
            next(batches, None)
        mark = time.perf_counter()
        batch = next(batches, None)
        have, _ = _sync_flags(batch is not None, False, world, device)
        while have:
            # One step: features → head (DDP) → loss → Adam.
            start = time.perf_counter()
            feats, labels = _to_tensors(batch, backbone, grid, in_dim, device)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
                logits, emb = model(feats)
            losses = selfment_loss(logits, emb, labels, sim_weight=config["sim_weight"],
                                   temperature=config["temperature"])
            optimizer.zero_grad(set_to_none=True)
            losses["total"].backward()
            optimizer.step()
            step_s = time.perf_counter() - start

            # Book-keeping: losses averaged over all ranks' images.
            values, n_images = _mean_over_ranks(losses, len(labels), world, device)
            progress.add_step(values, n_images, step_s)
            window.add(values, n_images)
            if config["debug_dir"]:
                _dump(config["debug_dir"], rank, progress.global_step, head, batch["key"])
            _maybe_fail(config, rank, world, progress.global_step)

            # Every rank learns whether the epoch goes on and whether rank 0 wants a report.
            nxt = next(batches, None)
            want = rank == 0 and time.perf_counter() - last_report >= _REPORT_EVERY_S
            have, report_now = _sync_flags(nxt is not None, want, world, device)
            save = not have or progress.global_step % config["checkpoint_every"] == 0
            metrics = {"epoch": epoch + 1, "step": progress.global_step,
                       "images_seen": progress.images_seen, **window.means()}
            if not have:  # epoch end
                record = _close_epoch(progress, epoch)
                metrics.update({f"epoch_{k}": record[k] for k in LOSS_KEYS})
            if rank == 0 and (not have or time.perf_counter() - last_log >= _LOG_EVERY_S):
                last_log = time.perf_counter()
                _log_progress(progress, epoch, epochs, config["steps_per_epoch"],
                              window.means(), not have)
            if save or report_now:
                _report(metrics, progress, head, optimizer, save, rank)
                window = _Window()
                last_report = time.perf_counter()
            batch = nxt
            now = time.perf_counter()
            progress.wait_seconds += now - mark - step_s
            mark = now


def _build(config: dict, device: torch.device, rank: int):
    """(frozen backbone or None, head, Adam, progress), restored from Ray Train's checkpoint
    when this is a restart or a resumed run."""
    import ray.train

    backbone = None
    in_dim = config["in_dim"]
    if config["feature_source"] == "backbone":
        from ..backbone import build_backbone
        backbone = build_backbone(config["backbone"], weights=config["weights"],
                                  image_size=config["image_size"], device=device,
                                  storage_options=config["storage_options"])
        if tuple(backbone.grid) != tuple(config["grid"]):
            raise ValueError(f"backbone grid {backbone.grid} != pseudo-label grid {config['grid']}")
        in_dim = backbone.embed_dim

    torch.manual_seed(config["seed"])
    head = PatchHead(in_dim, config["embed_dim"]).to(device)
    optimizer = torch.optim.Adam(head.parameters(), lr=config["lr"],
                                 weight_decay=config["weight_decay"])
    progress = _Progress(in_dim=in_dim, embed_dim=config["embed_dim"])
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            progress = _restore(d, head, optimizer, device)
        progress.resumes.append(progress.global_step)
        if rank == 0 and progress.epoch >= config["epochs"]:
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


def _close_epoch(progress: _Progress, epoch: int) -> dict:
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


def _log_progress(progress: _Progress, epoch: int, epochs: int, steps_est: int,
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


def _report(metrics: dict, progress: _Progress, head: PatchHead, optimizer, save: bool,
            rank: int) -> None:
    """``ray.train.report`` on every rank; rank 0 attaches the checkpoint when ``save``."""
    import ray.train

    if not (save and rank == 0):
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        torch.save({"head": head.state_dict(), "optimizer": optimizer.state_dict()},
                   os.path.join(d, _STATE_FILE))
        with open(os.path.join(d, _PROGRESS_FILE), "w", encoding="utf-8") as f:
            f.write(progress.to_json())
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                         checkpoint_dir_name=f"checkpoint-step{progress.global_step:08d}")


def _restore(directory: str, head: PatchHead | None, optimizer, device) -> _Progress:
    with open(os.path.join(directory, _PROGRESS_FILE), encoding="utf-8") as f:
        progress = _Progress.from_json(f.read())
    if head is not None:
        state = torch.load(os.path.join(directory, _STATE_FILE), map_location=device,
                           weights_only=True)
        head.load_state_dict(state["head"])
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
    return progress


def _maybe_fail(config: dict, rank: int, world: int, step: int) -> None:
    """Fault injection (tests): the last rank exits hard once, at ``fail_at_step``."""
    if config["fail_at_step"] is None or step != config["fail_at_step"] or rank != world - 1:
        return
    fs, marker = url_to_fs(config["fail_marker"], config["output_storage_options"])
    if fs.exists(marker):
        return
    fs.pipe_file(marker, b"failed once\n")
    import ray.train
    from ray.train import CheckpointConsistencyMode

    # Let Ray Train commit the checkpoints reported so far, so the resume point is known.
    ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED,
                                           timeout_s=60)
    logger.warning("fault injection: rank %d exits at step %d", rank, step)
    os._exit(1)


def _dump(directory: str, rank: int, step: int, head: PatchHead, keys) -> None:
    """Debug hook: this rank's head weights and batch keys after ``step``."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    stem = os.path.join(directory, f"rank{rank}-step{step}")
    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()},
              stem + ".safetensors")
    with open(stem + ".json", "w", encoding="utf-8") as f:
        json.dump([str(k) for k in keys], f)


# ---------------------------------------------------------------------------------------------
# Output bookkeeping (driver)

def _read_json(fs, path: str) -> dict | None:
    if not fs.exists(path):
        return None
    with fs.open(path, "rt", encoding="utf-8") as f:
        return json.load(f)


def _check_same_run(previous: dict | None, config: dict, output: str) -> None:
    if not previous:
        return
    diff = [f"{k}: {previous.get(k)!r} there, {config[k]!r} now" for k in _RESUME_KEYS
            if previous.get(k) != config[k]]
    if diff:
        raise ValueError(f"{output} holds a training run with other settings ("
                         + "; ".join(diff) + "); use the same settings or a new output")


def _finish(result, ls: LabelSet, config: dict, output: str, storage_options: dict | None,
            wall: float) -> dict:
    """The last checkpoint → model artifact at ``output``; returns the training summary."""
    if result.checkpoint is None:
        raise RuntimeError(f"training produced no checkpoint under {join(output, RUN_NAME)}")
    with result.checkpoint.as_directory() as d:
        progress = _restore(d, None, None, "cpu")
        head = PatchHead(progress.in_dim, progress.embed_dim)
        state = torch.load(os.path.join(d, _STATE_FILE), map_location="cpu", weights_only=True)
        head.load_state_dict(state["head"])
    summary = {
        "status": "trained", "output": output, "labels": ls.uri,
        "epochs": progress.epoch, "steps": progress.global_step,
        "images_seen": progress.images_seen, "rows": ls.rows, "error_rows": ls.errors,
        "train_rows": ls.usable, "workers": config["workers"], "batch_size": config["batch_size"],
        "feature_source": config["feature_source"], "feature_dim": progress.in_dim,
        "embed_dim": progress.embed_dim, "lr": config["lr"],
        "weight_decay": config["weight_decay"], "sim_weight": config["sim_weight"],
        "temperature": config["temperature"], "history": progress.history,
        "first_loss": progress.history[0] if progress.history else None,
        "final_loss": progress.history[-1] if progress.history else None,
        "resumed_from_steps": progress.resumes,
        "train_seconds": round(progress.train_seconds, 3),
        "wait_seconds": round(progress.wait_seconds, 3),
        "train_images_per_s": round(progress.images_seen / max(progress.train_seconds, 1e-9), 3),
        "wall_s": round(wall, 3),
    }
    meta = {"backbone": ls.backbone, "weights": ls.weights, "image_size": ls.image_size,
            "grid": list(ls.grid), "feature_dim": progress.in_dim,
            "embed_dim": progress.embed_dim, "training": summary}
    save_artifact(output, head, meta, storage_options=storage_options)
    return summary


# ---------------------------------------------------------------------------------------------
# Entry point

def run_train(*args: TrainSettings | str, fail_at_step: int | None = None,
              debug_dir: str | None = None, **options: Any) -> dict:
    """Train the segmentation head on pseudo-labels with Ray Train and write the model artifact.

    Called as ``run_train(settings)`` with a :class:`TrainSettings` (every option, its default
    and range is declared there), or in the keyword form ``run_train(labels, output, **options)``
    that builds one. ``settings.output`` also holds the checkpoints (``_train/``).

    Args:
        settings: the labels, the artifact folder, the schedule, the loss and the workers.
        fail_at_step: testing: the last worker exits hard once after this global step (a marker
            file under ``output/_train`` keeps the retry from failing again).
        debug_dir: testing/debugging: every rank writes its head weights and batch keys after
            every step to this local folder (``rank<r>-step<s>.safetensors``/``.json``).

    Returns:
        The training summary (also stored in ``model.json`` under ``training``): ``status``
        (``"trained"``, or ``"already_done"`` when ``output`` already held the finished run),
        ``epochs``, ``steps``, ``images_seen``, ``rows``/``error_rows``/``train_rows``,
        ``history`` (per epoch: mean ``total``/``bce``/``dice``/``contrastive``, ``images``,
        ``seconds``), ``first_loss``/``final_loss``, ``resumed_from_steps``, ``wall_s``, ...

    Raises:
        SettingsError: options that do not validate (keyword form).
        FileNotFoundError / ValueError: missing, empty or unusable labels; an ``output`` holding
            a run with other settings.
        ray.train.TrainingFailedError: more than ``max_failures`` worker failures.
    """
    from ._ray import ensure_ray

    s = build_settings(TrainSettings, args, options)
    labels, output, storage_options = s.labels, s.output, s.storage_options
    start = time.perf_counter()
    fs, root = url_to_fs(output, storage_options)
    root = root.rstrip("/")
    if is_local(fs):  # workers run in another working directory
        output = root
    previous = _read_json(fs, f"{root}/{CONFIG_NAME}")
    finished = _read_json(fs, f"{root}/{META_NAME}")
    if finished is not None and previous is None:
        raise ValueError(f"{output} holds a model artifact not made by `selfment train` "
                         "here; choose a new output")

    # Labels: footers, manifest and small columns only; the workers read the rows.
    ls = inspect_labels(labels, storage_options=storage_options, features=s.features)
    stored = ls.feature_source == "stored"
    config = {"labels": labels.rstrip("/"), "feature_source": ls.feature_source,
              "embed_dim": s.embed_dim, "batch_size": s.batch_size, "lr": s.lr,
              "weight_decay": s.weight_decay, "sim_weight": s.sim_weight,
              "temperature": s.temperature,
              "seed": s.seed, "epochs": s.epochs, "workers": s.workers, "use_gpu": s.use_gpu,
              "checkpoint_every": s.checkpoint_every, "max_failures": s.max_failures,
              "backbone": ls.backbone, "weights": ls.weights, "image_size": ls.image_size}
    _check_same_run(previous, config, output)
    if finished is not None and finished.get("training", {}).get("epochs", 0) >= s.epochs:
        logger.info("%s already holds the finished run (%d epochs); not training again",
                    output, finished["training"]["epochs"])
        return {**finished["training"], "status": "already_done"}
    fs.makedirs(root, exist_ok=True)
    with fs.open(f"{root}/{CONFIG_NAME}", "wt", encoding="utf-8") as f:
        json.dump({**config, "settings": s.record()}, f, indent=2)  # no secrets: record()

    ensure_ray(s.address)
    import ray.train
    from ray.train.torch import TorchTrainer

    per_worker = ls.usable // s.workers
    if per_worker == 0:
        raise ValueError(f"{ls.usable} usable pseudo-labels cannot feed {s.workers} workers")
    resources, threads = _plan_workers(s.workers, s.use_gpu, s.resources_per_worker)
    steps_per_epoch = math.ceil(per_worker / s.batch_size)
    logger.info("training on %s: %d rows (%d errors skipped), grid %s, features %s; %d workers "
                "(%s), %d epochs x ~%d steps of %d images per worker -> %s", labels, ls.rows,
                ls.errors, ls.grid, config["feature_source"], s.workers,
                resources or "1 GPU each",
                s.epochs, steps_per_epoch, s.batch_size, output)
    logger.info("training config: %s", config)

    dataset = _build_dataset(ls, stored=stored, storage_options=storage_options,
                             max_pixels=s.max_pixels)
    loop_config = {
        **config, "in_dim": ls.feature_dim, "grid": list(ls.grid),
        "storage_options": storage_options, "output_storage_options": storage_options,
        "threads": threads, "steps_per_epoch": steps_per_epoch,
        "fail_at_step": fail_at_step,
        "fail_marker": join(output, RUN_NAME, f"fail-at-step-{fail_at_step}.marker"),
        "debug_dir": os.path.abspath(debug_dir) if debug_dir else None, "log_level": logging.getLogger("selfment_dist").getEffectiveLevel(),
    }
    storage_fs, storage_path = _arrow_fs(output, storage_options)
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=s.workers, use_gpu=s.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=RUN_NAME, storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=s.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
        datasets={DATASET: dataset},
    )
    result = trainer.fit()
    summary = _finish(result, ls, config, output, storage_options, time.perf_counter() - start)
    if fail_at_step is not None:
        marker_fs, marker = url_to_fs(loop_config["fail_marker"], storage_options)
        if marker_fs.exists(marker):
            marker_fs.rm(marker)
    final = summary["final_loss"] or {}
    logger.info("training done: %d epochs, %d steps, %d images in %.1fs (%.1f images/s while "
                "training); final loss %.4f; model at %s", summary["epochs"], summary["steps"],
                summary["images_seen"], summary["wall_s"], summary["train_images_per_s"],
                final.get("total", float("nan")), output)
    return summary
