"""``selfment pseudo-label``: images anywhere → pseudo-masks, streamed through Ray Data.

Flow (data moves one way; the driver only ever holds file names)::

    enumerate_units (driver: file names)          io.sources
      → read + decode + resize (CPU tasks)        _internal.decode
      → backbone + NCut + IPO (one actor stage,   _internal.label_actor (algorithm.labeler)
        model loaded once per actor, batched)
      → parquet parts + _selfment.json (writes)   _internal.parts, _internal.run_output

Guarantees:

- One row per input. Unreadable inputs and images that fail inside the model become rows with
  ``error`` set; nothing is dropped.
- Resumable. Part files are named ``part-<run id>-<write task>.parquet`` and only ever appear
  complete (written under ``_tmp/`` and renamed on local disk; object stores publish an object
  only when its upload completes). A run first reads the ``key`` column of the complete parts
  already at ``output`` (unreadable ones are removed) and processes only the missing keys, so a
  killed run completes on re-run without duplicates. A write task that Ray retries rewrites the
  same file name. Workers a kill leaves behind for a few seconds cannot publish into a re-run:
  writes are fenced by the manifest (see ``pipeline/_internal/lease.py``).
- Fault tolerant. Model actors are restarted by Ray (``max_restarts``) and their tasks retried
  (``max_task_retries``); read and write tasks are retried (``max_retries``).
- Streaming. Rows never gather in the driver; counts come from the write tasks and from parquet
  footers.
"""
from __future__ import annotations

import logging
import time
import warnings
from typing import Any, Iterable

from selfment_dist.defaults import DEFAULT_BACKBONE, resolve_precision
from selfment_dist.io.schema import pseudo_label_schema
from selfment_dist.io.sources import IMAGE
from selfment_dist.io.storage import is_local
from selfment_dist.settings import PseudoLabelSettings, SettingsError, build_settings
from selfment_dist.validation import check_backbone_size
from selfment_dist.pipeline._internal.done_keys import SortedKeys, units_left  # noqa: F401 (SortedKeys: re-exported)
from selfment_dist.pipeline._internal.decode import TAR_MEMBERS_SKIPPED, record_inputs_skipped
from selfment_dist.io.output_access import check_output
from selfment_dist.pipeline._internal.inputs import list_inputs
from selfment_dist.pipeline._internal.label_actor import LabelActor
from selfment_dist.pipeline._internal.manifest import MANIFEST_NAME, now, versions
from selfment_dist.pipeline._internal.model_stage import (ActorResources, decode_args,
                                                          model_dataset)
from selfment_dist.pipeline._internal.parts import (TMP_DIR, PartsSink, count_parts,
                                                    existing_keys, has_parts,
                                                    resolve_duplicates, retire_transient)
from selfment_dist.pipeline._internal.ray_runtime import (LIGHT_TASK_CPUS, MAX_RETRIES,
                                                          bounded_actor_start,
                                                          check_model_workers, ensure_ray,
                                                          plan_resources, progress_bars,
                                                          read_counters, split_counters,
                                                          start_counters, stop_counters)
from selfment_dist.pipeline._internal.run_output import RunOutput

logger = logging.getLogger(__name__)

__all__ = ["run_pseudo_label", "LabelActor", "DEFAULT_BACKBONE", "MANIFEST_NAME"]

# Settings that change what a row holds: a re-run into an existing output must match them.
_RESUME_KEYS = ("backbone", "weights", "image_size", "precision", "tau", "eps", "binary_graph",
                "n_iter", "sample_size", "save_ncut", "save_features", "max_pixels",
                "max_bytes", "no_object_threshold", "max_objects", "min_object_confidence",
                "object_ipo")


def run_pseudo_label(*args: PseudoLabelSettings | str | Iterable[str], **options: Any) -> dict:
    """Pseudo-label every image of ``inputs`` into a parquet dataset at ``output``.

    Called as ``run_pseudo_label(settings)`` with a :class:`PseudoLabelSettings` (every option,
    its default and range is declared there), or in the keyword form
    ``run_pseudo_label(inputs, output, **options)`` that builds one. The output's manifest
    records the settings (:meth:`Settings.record`: secrets left out).

    Returns:
        summary: ``images`` and ``errors`` written by this run, ``skipped`` (already present),
        ``rows_total``/``errors_total``/``files_total`` in the output, ``wall_s``,
        ``images_per_s`` (rows written, error rows included, per second of wall time), ``output``,
        ``run_id``, ``inputs_skipped`` (input files skipped on purpose by name or extension:
        ``{"total", "by_reason", "examples"}``, docs/inputs.md), ``lanczos_steps`` (block-Lanczos steps of NCut,
        summed over images), ``dense_eigh_fallbacks`` (images whose eigen-solve fell back to a dense
        float64 ``eigh``, slow on GPUs), ``rows_per_node`` (rows each Ray node's model actors
        labelled, by node id; a batch retried after a failure counts again).
    Raises:
        SettingsError (a ValueError): invalid settings, one line per problem (nothing written).
        ValueError: an output made with other settings, empty inputs, a bad checkpoint.
        FileNotFoundError: an input or checkpoint that does not exist.
        OutputBusyError: another live run holds ``output``.
        FencedError: another run took over ``output`` during this run.
    """
    start = time.perf_counter()
    s = build_settings(PseudoLabelSettings, args, options)  # types and ranges
    problems = check_backbone_size(s.backbone, s.image_size)  # needs the backbone's patch size
    if problems:
        raise SettingsError([f"pseudo_label: {p}" for p in problems])
    _check_checkpoint(s.backbone, s.weights, s.image_size, s.storage_options)
    fs, root, units = list_inputs(s.inputs, s.output, s.storage_options,
                                  allow_empty=s.allow_empty)
    # An output that cannot be written: one line now, before Ray starts, with nothing created
    # (RunOutput.claim prepares it once the plan holds).
    check_output(fs, root, s.output, create_bucket=s.create_bucket)
    ensure_ray(s.address)
    plan = plan_resources(s.num_actors, s.num_gpus_per_actor, allow_cpu_fallback=s.cpu_fallback,
                          image_size=s.image_size, require_gpu=s.require_gpu,
                          batch_size=s.batch_size, precision=s.precision, stage="pseudo-label",
                          backbone=s.backbone)
    check_model_workers(s.model_workers, plan, "pseudo-label")
    run = _resolved(s, plan)
    config = _config(run, plan)
    out = RunOutput(fs, root, s.output, manifest_name=MANIFEST_NAME,
                    create_bucket=s.create_bucket)
    logger.info("pseudo-label run %s: %s -> %s, config %s", out.run_id, s.inputs, s.output,
                config)

    # Take the output (lease, manifest, resume check), then label what is missing.
    out.claim(config, lambda previous: _manifest_for(previous, config, s, units.skipped),
              written_before=lambda: has_parts(fs, root), resume_keys=_RESUME_KEYS,
              holds="pseudo-labels")
    with out.held():
        summary, duplicates, all_done = _label_missing(out, units, run, plan)
    record_inputs_skipped(summary, units.skipped)
    summary["plan"] = plan.record()
    summary["wall_s"] = wall = round(time.perf_counter() - start, 3)
    summary["images_per_s"] = round(summary["images"] / wall, 3) if wall else 0.0
    out.finish(lambda m, entry: _record_finish(m, entry, summary, duplicates, all_done))
    summary.pop("feature_dim", None)
    if not all_done:
        raise RuntimeError(f"run {out.run_id}: some inputs have no row in {s.output}; re-run "
                           "to complete the output")
    logger.info("pseudo-label run %s done: %d images (%d errors) in %.1fs, %.2f images/s; "
                "%d already present; output now %d rows (%d errors)", out.run_id,
                summary["images"], summary["errors"], wall, summary["images_per_s"],
                summary["skipped"], summary["rows_total"], summary["errors_total"])
    return summary


def _resolved(s: PseudoLabelSettings, plan: dict) -> PseudoLabelSettings:
    """The settings the actors run: ``precision`` as resolved for their device (auto means
    fp32), and the batch and part sizes the plan implies where left unset."""
    return s.model_copy(update={
        "precision": resolve_precision(s.precision, "cuda" if plan["num_gpus"] else "cpu"),
        "batch_size": s.batch_size or (32 if plan["num_gpus"] else 8),
        "rows_per_file": s.rows_per_file or (256 if s.save_features else 1024)})


def _config(run: PseudoLabelSettings, plan: dict) -> dict:
    """The manifest's ``config``: what the run did (compared on resume, see _RESUME_KEYS)."""
    return {"backbone": run.backbone, "weights": str(run.weights),
            "image_size": int(run.image_size), "precision": run.precision, "tau": run.tau,
            "eps": run.eps, "binary_graph": run.binary_graph, "n_iter": run.n_iter,
            "sample_size": run.sample_size,
            "no_object_threshold": float(run.no_object_threshold), "save_ncut": run.save_ncut,
            "save_features": run.save_features, "max_pixels": run.max_pixels,
            "max_bytes": run.max_bytes, "max_objects": run.max_objects,
            "min_object_confidence": run.min_object_confidence, "object_ipo": run.object_ipo,
            "batch_size": run.batch_size,
            "num_actors": plan["actors"], "num_gpus_per_actor": plan["num_gpus"],
            "rows_per_file": run.rows_per_file}


def _manifest_for(previous: dict | None, config: dict, s: PseudoLabelSettings,
                  inputs_skipped: dict) -> dict:
    """The stored manifest (its runs, counts and feature dim carried on) with this run's
    config; a new one where there is none."""
    manifest = previous or {"format": "selfment-pseudo-labels", "format_version": 1}
    manifest.update({"status": "running", "config": config, "inputs": s.inputs,
                     "settings": s.record(), "versions": versions(),
                     "inputs_skipped": inputs_skipped})
    manifest.pop("duplicates", None)
    return manifest


def _record_finish(m: dict, entry: dict, summary: dict, duplicates: list[dict],
                   all_done: bool) -> None:
    status = "complete" if all_done else "failed"
    entry.update(status=status, finished=now(), images=summary["images"],
                 errors=summary["errors"], skipped=summary["skipped"],
                 wall_s=summary["wall_s"], images_per_s=summary["images_per_s"],
                 dense_eigh_fallbacks=summary["dense_eigh_fallbacks"],
                 rows_per_node=summary["rows_per_node"])
    m["inputs_skipped"] = summary["inputs_skipped"]
    m.update(status=status, counts={"rows": summary["rows_total"],
                                    "errors": summary["errors_total"],
                                    "files": summary["files_total"]})
    if summary.get("feature_dim") is not None:
        m["feature_dim"] = summary["feature_dim"]
    if duplicates:
        m["duplicates"] = duplicates


def _check_checkpoint(backbone: str, weights: str, image_size: int,
                      storage_options: dict | None) -> None:
    """Open and map a checkpoint in the driver, so a bad one fails here with one message
    instead of killing every model actor."""
    if weights in ("hub", "random"):
        return
    from selfment_dist.model.backbone import build_backbone
    model = build_backbone(backbone, weights=weights, image_size=image_size, device="cpu",
                           storage_options=storage_options, precision="fp32")
    del model


def _label_missing(out: RunOutput, units: list[dict], run: PseudoLabelSettings, plan: dict
                   ) -> tuple[dict, list[dict], bool]:
    """The run proper, once this run holds the output: resume, label, publish, check.

    Returns:
        the summary (without timings), the duplicate-key reports, and whether every input
        has a row.
    """
    import ray

    fs, root = out.fs, out.root
    out.await_leftover_writers()
    retire_transient(fs, root)
    done = existing_keys(fs, root)
    n_units = len(units)
    image_keys = [u["key"] for u in units if u["kind"] == IMAGE]
    # A resume over a finished output is left nothing: no read task, no model actor.
    units, containers, done = units_left(units, done, run.storage_options)
    skip_ref = [ray.put(done.keys)] if (done and containers) else None
    if done:
        logger.info("resuming: %d keys already in %s; %d of %d work units left", len(done),
                    out.output, len(units), n_units)
    written = {"rows": 0, "errors": 0}
    if units:
        written = _write_labels(out, units, len(containers), skip_ref, run, plan)
    out.check_held()

    duplicates, keys = resolve_duplicates(fs, root)
    tmp = f"{root}/{TMP_DIR}"
    if is_local(fs) and fs.exists(tmp):
        fs.rm(tmp, recursive=True)  # only empty or failed-attempt leftovers remain here
    missing = [k for k, there in zip(image_keys, keys.contains_each(image_keys)) if not there]
    if missing:
        logger.error("%d inputs have no row in %s, e.g. %s", len(missing), out.output,
                     missing[:5])
    totals = count_parts(fs, root)
    summary = {
        "output": out.output, "run_id": out.run_id,
        "images": written["rows"], "errors": written["errors"], "skipped": len(done),
        "rows_total": totals["rows"], "errors_total": totals["errors"],
        "files_total": totals["files"], "duplicates": len(duplicates),
        "feature_dim": totals["feature_dim"],
        "dense_eigh_fallbacks": written.get("dense_eigh_fallbacks", 0),
        "lanczos_steps": written.get("lanczos_steps", 0),
        "rows_per_node": written.get("rows_per_node", {}),
        "replicas_started": written.get("replicas_started", 0),
        TAR_MEMBERS_SKIPPED: written.get(TAR_MEMBERS_SKIPPED, 0),
    }
    return summary, duplicates, not missing


def _write_labels(out: RunOutput, units: list[dict], n_containers: int, skip_ref,
                  run: PseudoLabelSettings, plan: dict) -> dict:
    """Units → labelled parts at the output; returns the rows, error rows and counters."""
    counters = start_counters(out.run_id)  # rows per node, dense-eigh fallbacks
    sink = PartsSink(out.output, pseudo_label_schema(ncut_mask=run.save_ncut,
                                                     features=run.save_features,
                                                     objects=run.max_objects > 1),
                     out.run_id, run.rows_per_file, run.storage_options,
                     manifest=MANIFEST_NAME)
    try:
        with progress_bars(run.progress), warnings.catch_warnings(), \
                bounded_actor_start(plan, run.actor_wait_s, "pseudo-label"):
            # Retry limits travel as plain Ray remote args: Ray 2.60 deprecates
            # ``**ray_remote_args`` for named parameters but has none for these yet, and its
            # defaults (unlimited) would loop forever on an input that kills its worker.
            warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
            ds = model_dataset(
                units, n_containers=n_containers,
                decode=decode_args(run, skip_ref, counters=counters),
                model_class=LabelActor,
                model_args={"settings": run, "resources": ActorResources.from_plan(plan),
                            "counters": counters},
                plan=plan, model_workers=run.model_workers)
            ds.write_datasink(sink, ray_remote_args={"max_retries": MAX_RETRIES,
                                                   "num_cpus": LIGHT_TASK_CPUS})
        per_node, counts = split_counters(read_counters(counters))
    finally:
        stop_counters(counters)
    out.check_sink(sink)
    return {"rows": sum(r["rows"] for r in sink.results),
            "errors": sum(r["errors"] for r in sink.results),
            "rows_per_node": per_node, **counts}
