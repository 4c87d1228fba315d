"""``selfment segment``: a model artifact + images anywhere → saliency maps, through Ray Data.

Flow (data moves one way; the driver only ever holds file names and small counts)::

    enumerate_units (driver: file names)              io.sources
      → read + decode + resize (CPU tasks)            _internal.decode
      → backbone + head (one actor stage, model       _internal.segment_actor
        loaded once per actor, batched)                 (model.segmenter.Segmenter)
      → upsample to the original size, 8-bit PNG,     _internal.saliency_output
        written from the write tasks
        (png: ``<output>/<key>.png`` [+ ``_overlays/<key>.jpg``]; parquet: ``part-*.parquet``)
      → ``_segment.json`` (driver: config, counts,    _internal.run_output
        the list of failed inputs)

Guarantees:

- Every input is accounted for: an unreadable or undecodable input, or an image that fails in the
  model or while writing, is listed with its reason in ``_segment.json`` (png) or becomes a row
  with ``error`` set (parquet); nothing crashes the run, nothing is dropped silently.
- Resumable. png: a key whose ``<key>.png`` exists is skipped (maps only ever appear complete:
  written to a hidden temporary file and renamed on local disk, one PUT on object stores); failed
  keys are tried again. parquet: keys present in complete parts are skipped, failed rows included
  (the row records the failure), as in ``selfment pseudo-label``. A re-run with another model,
  ``image_size`` or output format into the same output is refused.
- Maps are at the image's original size (after EXIF orientation): ``round(255 * s)`` of the
  bilinearly upsampled (``align_corners=False``) patch saliency ``s``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
import warnings
from typing import Any, Iterable

from selfment_dist.errors import UserValueError
from selfment_dist.stages import SEGMENT_MANIFEST_NAME
from selfment_dist.io.storage import is_local, to_uri
from selfment_dist.settings import OUTPUT_FORMATS, SegmentSettings, build_settings
from selfment_dist.pipeline._internal.done_keys import units_left
from selfment_dist.io.output_access import check_output
from selfment_dist.pipeline._internal.inputs import list_inputs
from selfment_dist.pipeline._internal.manifest import now, versions
from selfment_dist.pipeline._internal.decode import TAR_MEMBERS_SKIPPED, record_inputs_skipped
from selfment_dist.pipeline._internal.model_stage import (ActorResources, decode_args,
                                                          model_dataset)
from selfment_dist.pipeline._internal.parts import (TMP_DIR, count_parts, existing_keys,
                                                    has_parts)
from selfment_dist.pipeline._internal.ray_runtime import (LIGHT_TASK_CPUS, MAX_RETRIES,
                                                          bounded_actor_start,
                                                          check_model_workers, ensure_ray,
                                                          plan_resources, progress_bars,
                                                          read_counters, split_counters,
                                                          start_counters, stop_counters)
from selfment_dist.pipeline._internal.run_output import RunOutput
from selfment_dist.pipeline._internal.saliency_output import (OVERLAY_DIR, SEGMENT_SCHEMA,
                                                              PngSink, TableSink,
                                                              existing_maps, failed_rows,
                                                              render_table)
from selfment_dist.pipeline._internal.segment_actor import SegmentActor

logger = logging.getLogger(__name__)

__all__ = ["run_segment", "SegmentActor", "SEGMENT_SCHEMA", "MANIFEST_NAME", "OVERLAY_DIR",
           "OUTPUT_FORMATS", "render_table"]

MANIFEST_NAME = SEGMENT_MANIFEST_NAME
_ROWS_PER_FILE = 1024
# Settings that change what a map holds: a re-run into an existing output must match them.
_RESUME_KEYS = ("model_fingerprint", "image_size", "output_format", "max_pixels", "max_bytes",
                "exif_orientation", "quantize")


def run_segment(*args: SegmentSettings | str | Iterable[str], **options: Any) -> dict:
    """Segment every image of ``inputs`` with the model artifact ``model``.

    Called as ``run_segment(settings)`` with a :class:`SegmentSettings` (every option, its
    default and range is declared there), or in the keyword form
    ``run_segment(model, inputs, output, **options)`` that builds one. The manifest
    (``_segment.json``) records the settings (:meth:`Settings.record`: secrets left out).

    Returns:
        summary: ``images`` (maps written by this run), ``errors`` (inputs that failed),
        ``skipped`` (already present), ``maps_total`` / ``rows_total``, ``wall_s``,
        ``images_per_s``, ``output``, ``manifest``, ``run_id``, ``image_size`` and
        ``error_examples`` (up to 10; all of them are in ``_segment.json``), ``rows_per_node``
        (rows each Ray node's model actors processed, by node id).
    """
    start = time.perf_counter()
    s = build_settings(SegmentSettings, args, options)  # types, ranges, overlays need png
    run, meta = _resolved(s)  # fails in the driver, not in every actor: a bad artifact or size
    fs, root, units = list_inputs(s.inputs, s.output, s.storage_options,
                                  allow_empty=s.allow_empty)
    # An output that cannot be written: one line now, before Ray starts, with nothing created
    # (RunOutput.claim prepares it once the plan holds).
    check_output(fs, root, s.output, create_bucket=s.create_bucket)
    ensure_ray(s.address)
    plan = plan_resources(s.num_actors, s.num_gpus_per_actor,
                          allow_cpu_fallback=s.cpu_fallback, image_size=run.image_size,
                          require_gpu=s.require_gpu, batch_size=s.batch_size, stage="segment",
                          backbone=meta.get("backbone"))
    check_model_workers(s.model_workers, plan, "segment")
    config = _config(run, meta, plan)
    out = RunOutput(fs, root, s.output, manifest_name=MANIFEST_NAME,
                    create_bucket=s.create_bucket)
    logger.info("segment run %s: %s -> %s, config %s", out.run_id, s.inputs, s.output, config)

    # Take the output (lease, manifest, resume check), then segment what is missing.
    written = (lambda: has_parts(fs, out.root)) if s.output_format == "parquet" \
        else (lambda: bool(existing_maps(fs, out.root)))
    out.claim(config, lambda previous: _manifest_for(previous, config, s),
              written_before=written, resume_keys=_RESUME_KEYS, holds="saliency maps",
              same="the same model and settings")
    with out.held():
        counts, failed = _segment_missing(out, units, run, plan)
    wall = time.perf_counter() - start
    summary = {"output": s.output, "manifest": to_uri(fs, f"{out.root}/{MANIFEST_NAME}"),
               "run_id": out.run_id, "output_format": s.output_format,
               "image_size": run.image_size, "plan": plan.record(), **counts}
    record_inputs_skipped(summary, units.skipped)
    summary.update(wall_s=round(wall, 3),
                   images_per_s=round(counts["images"] / wall, 3) if wall else 0.0,
                   error_examples=[f"{f['key']}: {f['error']}" for f in failed[:10]])
    for f in failed:
        logger.debug("failed: %s (%s): %s", f["key"], f["source"], f["error"])
    out.finish(lambda m, entry: _record_finish(m, entry, summary, failed))
    log = logger.warning if failed else logger.info
    log("segment run %s done: %d maps, %d failed (listed in %s), %d already present; "
        "%.1fs, %.2f images/s", out.run_id, counts["images"], len(failed), summary["manifest"],
        summary["skipped"], wall, summary["images_per_s"])
    return summary


def _resolved(s: SegmentSettings) -> tuple[SegmentSettings, dict]:
    """The settings the actors run (``image_size`` from the model where unset, the part
    size), and the artifact's ``model.json``."""
    # The model stack, for the driver's checks only: the module's tasks (decode, write) run
    # in worker processes that do not import it.
    from selfment_dist.model.artifact import load_artifact
    from selfment_dist.model.segmenter import resolve_image_size

    _, meta = load_artifact(s.model, storage_options=s.storage_options)
    try:
        image_size = resolve_image_size(meta, s.image_size)
    except ValueError as exc:
        raise UserValueError(f"model artifact {s.model}: {exc}") from None
    return s.model_copy(update={"image_size": image_size,
                                "rows_per_file": s.rows_per_file or _ROWS_PER_FILE}), meta


def _config(run: SegmentSettings, meta: dict, plan: dict) -> dict:
    """The manifest's ``config``: what the run did (compared on resume, see _RESUME_KEYS)."""
    return {"model": str(run.model), "model_fingerprint": _fingerprint(meta),
            "backbone": meta.get("backbone"), "weights": meta.get("weights"),
            "trained_image_size": meta.get("image_size"), "image_size": run.image_size,
            "output_format": run.output_format, "overlays": bool(run.overlays),
            "batch_size": int(run.batch_size), "max_pixels": run.max_pixels,
            "max_bytes": run.max_bytes, "exif_orientation": run.exif_orientation,
            "quantize": run.quantize,
            "num_actors": plan["actors"], "num_gpus_per_actor": plan["num_gpus"]}


def _manifest_for(previous: dict | None, config: dict, s: SegmentSettings) -> dict:
    """A new manifest for this run; only the stored runs are carried on."""
    return {"format": "selfment-segment", "format_version": 1, "status": "running",
            "config": config, "inputs": s.inputs, "settings": s.record(),
            "versions": versions(), "runs": (previous or {}).get("runs", [])}


def _record_finish(m: dict, entry: dict, summary: dict, failed: list[dict]) -> None:
    entry.update(status="complete", finished=now(), images=summary["images"],
                 errors=len(failed), skipped=summary["skipped"],
                 rows_per_node=summary["rows_per_node"], wall_s=summary["wall_s"],
                 images_per_s=summary["images_per_s"])
    m["inputs_skipped"] = summary["inputs_skipped"]
    m.update(status="complete",
             counts={k: summary[k] for k in ("images", "errors", "skipped", "maps_total",
                                             "rows_total", "errors_total") if k in summary},
             errors=failed)


def _fingerprint(meta: dict) -> str:
    """Identity of a model artifact (its model.json: backbone, sizes, training summary)."""
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]


def _segment_missing(out: RunOutput, units: list[dict], run: SegmentSettings, plan: dict
                     ) -> tuple[dict, list[dict]]:
    """The run proper, once this run holds the output. Returns the counts and failed rows."""
    import ray

    fs, root, png = out.fs, out.root, run.output_format == "png"
    if not png:  # a PNG map rewritten by two runs is the same file
        out.await_leftover_writers()
    done = existing_maps(fs, root) if png else existing_keys(fs, root)
    n_units = len(units)
    units, containers, done = units_left(units, done, run.storage_options)
    skip_ref = [ray.put(done.keys)] if (done and containers) else None
    if done:
        logger.info("resuming: %d maps already in %s; %d of %d work units left", len(done),
                    out.output, len(units), n_units)

    images, failed, per_node, counts = 0, [], {}, {}
    if units:
        sink, per_node, counts = _write_maps(out, units, len(containers), skip_ref, run, plan)
        if png:
            images = sum(r["images"] for r in sink.results)
            failed = [f for r in sink.results for f in r["failed"]]
        else:
            images = sum(r["rows"] - r["errors"] for r in sink.results)
            failed = failed_rows(fs, root, out.run_id)
            tmp = f"{root}/{TMP_DIR}"
            if is_local(fs) and fs.exists(tmp):  # parts are renamed out of it: empty now
                fs.rm(tmp, recursive=True)
    out.check_held()
    failed.sort(key=lambda f: f["key"])
    summary = {"images": images, "errors": len(failed), "skipped": len(done),
               "rows_per_node": per_node,
               "replicas_started": counts.get("replicas_started", 0),
               TAR_MEMBERS_SKIPPED: counts.get(TAR_MEMBERS_SKIPPED, 0)}
    if png:
        summary["maps_total"] = len(done) + images
    else:
        totals = count_parts(fs, root)
        summary.update(rows_total=totals["rows"], errors_total=totals["errors"])
    return summary, failed


def _write_maps(out: RunOutput, units: list[dict], n_containers: int, skip_ref,
                run: SegmentSettings, plan: dict):
    """Units → maps (or parts) at the output; returns the sink, rows per node and counters."""
    counters = start_counters(out.run_id)
    try:
        # Retry limits travel as plain Ray remote args (as in pseudo_label: Ray 2.60
        # deprecates ``**ray_remote_args`` but has no named parameters for them yet). The
        # dataset copies the DataContext when created: the bounded actor wait must be set
        # by then.
        with warnings.catch_warnings(), bounded_actor_start(plan, run.actor_wait_s, "segment"):
            warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
            ds = model_dataset(
                units, n_containers=n_containers,
                decode=decode_args(run, skip_ref, keep_data=run.overlays,
                                   exif_orientation=run.exif_orientation, counters=counters),
                model_class=SegmentActor,
                model_args={"settings": run, "resources": ActorResources.from_plan(plan),
                            "counters": counters},
                plan=plan, model_workers=run.model_workers)
            if run.output_format == "parquet":
                ds = ds.map_batches(render_table, batch_format="numpy",
                                    fn_kwargs={"quantize": run.quantize},
                                    udf_modifying_row_count=False, num_cpus=LIGHT_TASK_CPUS,
                                    max_retries=MAX_RETRIES)
                sink = TableSink(out.output, SEGMENT_SCHEMA, out.run_id, run.rows_per_file,
                                 run.storage_options, manifest=MANIFEST_NAME)
            else:
                sink = PngSink(out.output, overlays=run.overlays, max_pixels=run.max_pixels,
                               storage_options=run.storage_options, quantize=run.quantize,
                               exif_orientation=run.exif_orientation)
        with progress_bars(run.progress), warnings.catch_warnings(), \
                bounded_actor_start(plan, run.actor_wait_s, "segment", probe=False):
            warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
            ds.write_datasink(sink, ray_remote_args={"max_retries": MAX_RETRIES,
                                                   "num_cpus": LIGHT_TASK_CPUS})
        out.check_sink(sink)
        per_node, counts = split_counters(read_counters(counters))
    finally:
        stop_counters(counters)
    return sink, per_node, counts
