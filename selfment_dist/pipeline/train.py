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
  the optimisation (see ``_train_checkpoints.RESUME_KEYS``) is an error: choose a new output.

The code, by responsibility (each file reads top to bottom):

    train.py                         the driver: settings → labels → Ray Train → model artifact
    _internal/train_data.py          the labelled dataset: manifest and footers, training rows
    _internal/train_spec.py          what each worker gets: the settings, whole, and a few facts
    _internal/train_worker.py        the worker loop (one DDP rank): batches → loss → Adam
    _internal/train_checkpoints.py   checkpoints and resume: progress, save/restore, run files
"""
from __future__ import annotations

import json
import logging
import math
import time
from typing import Any

from selfment_dist.defaults import resolve_precision
from selfment_dist.errors import UserValueError
from selfment_dist.io.output_access import prepare_output
from selfment_dist.model.artifact import META_NAME
from selfment_dist.io.storage import is_local, url_to_fs
from selfment_dist.settings import TrainSettings, build_settings
from selfment_dist.pipeline._internal.train_checkpoints import (CONFIG_NAME, RUN_NAME, check_same_run, read_json,
                                 save_model)
from selfment_dist.pipeline._internal.train_data import LabelSet, arrow_fs, build_dataset, inspect_labels
from selfment_dist.pipeline._internal.plan import wait_for_worker_nodes
from selfment_dist.pipeline._internal.cpu_malloc import model_process_env
from selfment_dist.pipeline._internal.train_spec import TrainLoopSpec
from selfment_dist.pipeline._internal.train_worker import DATASET, train_loop

logger = logging.getLogger(__name__)

__all__ = ["run_train", "inspect_labels", "LabelSet", "RUN_NAME", "CONFIG_NAME"]


# ---------------------------------------------------------------------------------------------
# Entry point

def run_train(*args: TrainSettings | str, **options: Any) -> dict:
    """Train the segmentation head on pseudo-labels with Ray Train and write the model artifact.

    Called as ``run_train(settings)`` with a :class:`TrainSettings` (every option, its default and
    range is declared there), or in the keyword form ``run_train(labels, output, **options)`` that builds one.

    Returns:
        The training summary (also stored in ``model.json`` under ``training``): ``status``
        (``"trained"``, or ``"already_done"`` when ``output`` already held the finished run),
        ``epochs``, ``steps``, ``images_seen``, ``rows``/``error_rows``/``low_confidence_rows``/
        ``train_rows`` (the rows training read), ``row_filter``,
        ``history`` (per epoch: mean ``total``/``bce``/``dice``/``contrastive``, ``images``,
        ``seconds``), ``first_loss``/``final_loss``, ``resumed_from_steps``, ``wall_s``, ...

    Raises:
        SettingsError: options that do not validate (keyword form).
        FileNotFoundError / ValueError: missing, empty or unusable labels; an ``output`` holding
            a run with other settings.
        ray.train.TrainingFailedError: more than ``max_failures`` worker failures.
    """
    from selfment_dist.pipeline._internal.ray_runtime import ensure_ray

    start = time.perf_counter()
    s = build_settings(TrainSettings, args, options)  # types, ranges, one confidence cut
    fs, root = url_to_fs(s.output, s.storage_options)
    root = root.rstrip("/")
    output = root if is_local(fs) else s.output  # workers run in another working directory
    previous = read_json(fs, f"{root}/{CONFIG_NAME}")
    finished = read_json(fs, f"{root}/{META_NAME}")
    if finished is not None and previous is None:
        raise UserValueError(f"{output} holds a model artifact not made by `selfment train` "
                         "here; choose a new output")

    # Labels: footers, manifest and small columns only; the workers read the rows.
    ls = inspect_labels(s.labels, storage_options=s.storage_options, features=s.features,
                        min_confidence=s.min_confidence, keep_fraction=s.keep_fraction,
                        skip_no_object=s.skip_no_object)
    config = _config(s, ls)
    check_same_run(previous, config, output)
    if finished is not None and finished.get("training", {}).get("epochs", 0) >= s.epochs:
        logger.info("%s already holds the finished run (%d epochs); not training again",
                    output, finished["training"]["epochs"])
        return {**finished["training"], "status": "already_done"}
    # A missing bucket, a read-only or full disk: one line here (io/output_access.py).
    prepare_output(fs, root, output, create_bucket=s.create_bucket)
    with fs.open(f"{root}/{CONFIG_NAME}", "wt", encoding="utf-8") as f:
        json.dump({**config, "settings": s.record()}, f, indent=2)  # no secrets: record()

    ensure_ray(s.address)
    spec, resources = _plan(s, ls, config)
    result = _fit(s, ls, spec, resources, output)
    summary = save_model(result, ls, config, output, s.storage_options,
                         time.perf_counter() - start)
    final = summary["final_loss"] or {}
    logger.info("training done: %d epochs, %d steps, %d images in %.1fs (%.1f images/s while "
                "training); final loss %.4f; model at %s", summary["epochs"], summary["steps"],
                summary["images_seen"], summary["wall_s"], summary["train_images_per_s"],
                final.get("total", float("nan")), output)
    return summary


def _config(s: TrainSettings, ls: LabelSet) -> dict:
    """The run's config (``_train_config.json``; compared on every re-run)."""
    lr = s.lr * {"none": 1.0, "sqrt": math.sqrt(s.batch_size),
                 "linear": float(s.batch_size)}[s.lr_scaling]
    return {"labels": s.labels.rstrip("/"), "feature_source": ls.feature_source,
            "embed_dim": s.embed_dim, "batch_size": s.batch_size, "lr": lr,
            "weight_decay": s.weight_decay, "sim_weight": s.sim_weight,
            "temperature": s.temperature,
            "seed": s.seed, "shuffle": s.shuffle, "contrastive": s.contrastive,
            "epochs": s.epochs, "workers": s.workers, "use_gpu": s.use_gpu,
            "precision": resolve_precision(s.precision),
            "checkpoint_every": s.checkpoint_every, "max_failures": s.max_failures,
            "row_filter": ls.row_filter,
            "backbone": ls.backbone, "weights": ls.weights, "image_size": ls.image_size}


def _plan(s: TrainSettings, ls: LabelSet, config: dict) -> tuple[TrainLoopSpec, dict | None]:
    """The workers' spec and resources, once the nodes they need are there."""
    per_worker = ls.usable // s.workers
    if per_worker == 0:
        raise UserValueError(f"{ls.usable} usable pseudo-labels cannot feed {s.workers} workers")
    resources, threads = _plan_workers(s.workers, s.use_gpu, s.resources_per_worker)
    # What Ray Train asks per worker (its default with GPUs: one GPU, no CPU).
    need = dict(resources or {}) or ({"GPU": 1.0} if s.use_gpu else {"CPU": 1.0})
    if s.use_gpu:
        need.setdefault("GPU", 1.0)
    wait_for_worker_nodes(need, s.workers, s.worker_wait_s)
    spec = TrainLoopSpec(settings=s, lr=config["lr"], feature_source=ls.feature_source,
                         backbone=ls.backbone, weights=ls.weights, image_size=ls.image_size,
                         in_dim=ls.feature_dim, grid=tuple(ls.grid), threads=threads,
                         steps_per_epoch=math.ceil(per_worker / s.batch_size),
                         log_level=logging.getLogger("selfment_dist").getEffectiveLevel())
    logger.info("training on %s: %d of %d rows (%d errors and %d low-confidence rows skipped, "
                "%d flagged no_object, filter %s), grid %s, features %s; %d workers (%s), "
                "%d epochs x ~%d steps of %d images per worker -> %s", s.labels, ls.usable,
                ls.rows, ls.errors, ls.low_confidence, ls.no_object_rows, ls.row_filter, ls.grid,
                ls.feature_source, s.workers,
                resources or "1 GPU each", s.epochs, spec.steps_per_epoch, s.batch_size,
                s.output)
    logger.info("training config: %s", config)
    return spec, resources


def _fit(s: TrainSettings, ls: LabelSet, spec: TrainLoopSpec, resources: dict | None,
         output: str):
    """Ray Train over the labels; returns its result (the last checkpoint)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    dataset = build_dataset(ls, stored=ls.feature_source == "stored",
                            storage_options=s.storage_options, max_pixels=s.max_pixels,
                            shuffle=s.shuffle, seed=s.seed)
    storage_fs, storage_path = arrow_fs(output, s.storage_options)
    # CPU workers: glibc malloc settings that stop every forward from faulting its activations
    # in afresh; and a test's fault variables (_internal/cpu_malloc.py).
    worker_env = model_process_env(on_gpu=s.use_gpu)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"spec": spec},
        scaling_config=ray.train.ScalingConfig(num_workers=s.workers, use_gpu=s.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=RUN_NAME, storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=s.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            **({"worker_runtime_env": {"env_vars": worker_env}} if worker_env else {})),
        datasets={DATASET: dataset},
        # A rank that died or hangs must not stall the others in a collective for torch's
        # default 30 minutes: they fail after this and Ray Train restarts the group.
        torch_config=TorchConfig(timeout_s=int(s.collective_timeout_s)),
    )
    return trainer.fit()


# ---------------------------------------------------------------------------------------------
# Resources

def _plan_workers(workers: int, use_gpu: bool, resources_per_worker: dict | None, *,
                  nodes: list[dict[str, float]] | None = None):
    """(resources per worker or None for Ray's default, torch threads per worker or None).

    CPU workers are sized per node, not per cluster: ``workers`` of them must fit the nodes
    that exist (a worker sized from the cluster's total, say 5 of the 6 CPUs of two 3-CPU
    nodes, fits no node and Ray Train waits for it forever), and one CPU of the cluster stays
    free for Ray Data (reading, decoding). ``nodes``: each alive node's resources (default:
    the connected cluster's).
    """
    from selfment_dist.pipeline._internal.plan import alive_nodes

    if resources_per_worker:
        cpus = float(resources_per_worker.get("CPU", 1))
        return dict(resources_per_worker), max(1, int(cpus))
    if use_gpu:  # Ray Train's default, one GPU each (run_train waits for nodes that have them)
        return None, None
    nodes = alive_nodes() if nodes is None else nodes
    node_cpus = [float(n.get("CPU", 0)) for n in nodes if n.get("CPU", 0) > 0]
    cpus = sum(node_cpus) or 1.0
    spare = cpus - 1
    per = spare // workers if spare >= workers else max(spare, cpus / 2) / workers
    # Shrink to what the nodes hold: whole CPUs while a worker has more than one, then halves.
    while node_cpus and per > 0 and sum(int(c // per) for c in node_cpus) < workers:
        per = per - 1 if per > 1 else per / 2
    return {"CPU": per}, max(1, int(per))
