"""``selfment pseudo-label``: images anywhere → pseudo-masks, streamed through Ray Data.

Flow (data moves one way; the driver only ever holds file names)::

    enumerate_units (driver: file names)          io.sources
      → read + decode + resize (CPU tasks)        io.images, resize.resize_square
      → backbone + NCut + IPO (one actor stage,   labeler.PseudoLabeler
        model loaded once per actor, batched)
      → parquet parts + _selfment.json (writes)   io.schema, io.masks

Guarantees:

- One row per input. Unreadable inputs and images that fail inside the model become rows with
  ``error`` set; nothing is dropped.
- Resumable. Part files are named ``part-<run id>-<write task>.parquet`` and only ever appear
  complete (written under ``_tmp/`` and renamed on local disk; object stores publish an object
  only when its upload completes). A run first reads the ``key`` column of the complete parts
  already at ``output`` (unreadable ones are removed) and processes only the missing keys, so a
  killed run completes on re-run without duplicates. A write task that Ray retries rewrites the
  same file name. Workers a kill leaves behind for a few seconds cannot publish into a re-run:
  writes are fenced by the manifest (see ``pipeline/_parts.py``).
- Fault tolerant. Model actors are restarted by Ray (``max_restarts``) and their tasks retried
  (``max_task_retries``); read and write tasks are retried (``max_retries``).
- Streaming. Rows never gather in the driver; counts come from the write tasks and from parquet
  footers.
"""
from __future__ import annotations

import logging
import math
import os
import tempfile
import time
import uuid
import warnings
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa

from selfment_dist.defaults import DEFAULT_BACKBONE
from selfment_dist.io.images import DEFAULT_MAX_BYTES, ImageDecodeError, decode_image
from selfment_dist.io.masks import encode_mask
from selfment_dist.io.objects import objects_cell
from selfment_dist.pipeline._internal.objects import labeler_object_options
from selfment_dist.io.schema import (PERMANENT, QUALITY_COLUMNS, TRANSIENT, encode_features,
                         pseudo_label_schema)
from selfment_dist.io.sources import IMAGE, iter_records
from selfment_dist.io.storage import is_local
from selfment_dist.settings import PseudoLabelSettings, SettingsError, build_settings
from selfment_dist.validation import check_backbone_size
from selfment_dist.pipeline._internal.device import actor_device, run_guarded
from selfment_dist.pipeline._internal.done_keys import SortedKeys, units_left  # noqa: F401 (SortedKeys: re-exported)
from selfment_dist.pipeline._internal.done_keys import skip_set as _skip_set
from selfment_dist.pipeline._internal.parts import (MANIFEST_NAME, TMP_DIR, FencedError, Lease, PartsSink,
                     await_leftover_writers, check_lease, check_resume, confirm_lease,
                     count_parts, existing_keys, has_parts, list_inputs, new_lease, now,
                     read_manifest, register_run, resolve_duplicates, retire_transient,
                     run_entry, versions, write_manifest)
from selfment_dist.pipeline._internal.ray_runtime import (LIGHT_TASK_CPUS, MAX_RETRIES, bounded_actor_start, check_model_workers,
                   count_replica_started, count_rows_here, decode_pool, ensure_ray,
                   model_stage_args, plan_resources, progress_bars, read_counters,
                   split_counters, start_counters, stop_counters)

logger = logging.getLogger(__name__)

__all__ = ["run_pseudo_label", "DEFAULT_BACKBONE", "MANIFEST_NAME"]

# Settings that change what a row holds: a re-run into an existing output must match them.
_RESUME_KEYS = ("backbone", "weights", "image_size", "precision", "tau", "eps", "binary_graph",
                "n_iter", "sample_size", "save_ncut", "save_features", "max_pixels",
                "max_bytes", "no_object_threshold", "max_objects", "min_object_confidence",
                "object_ipo")


# ---------------------------------------------------------------------------------------------
# Stage 1: read + decode (stateless, CPU tasks)

def _decode_batch(rows: list[dict], image_size: int, keep_data: bool) -> dict[str, np.ndarray]:
    # float32 in [0, 1], resized in the official order (see resize.resize_square).
    images = np.zeros((len(rows), image_size, image_size, 3), dtype=np.float32)
    for i, row in enumerate(rows):
        if row["pixels"] is not None:
            images[i] = row["pixels"]
    batch = {
        "key": np.array([r["key"] for r in rows], dtype=object),
        "source": np.array([r["source"] for r in rows], dtype=object),
        "width": np.array([r["width"] for r in rows], dtype=np.int32),
        "height": np.array([r["height"] for r in rows], dtype=np.int32),
        "error": np.array([r["error"] or "" for r in rows], dtype=object),
        "error_kind": np.array([r["error_kind"] or "" for r in rows], dtype=object),
        "image": images,
    }
    if keep_data:  # the encoded original, for overlays
        batch["data"] = np.array([r["data"] or b"" for r in rows], dtype=object)
    return batch


def read_and_decode(units: dict[str, np.ndarray], *, image_size: int, max_pixels: int | None,
                    storage_options: dict | None, skip_ref: list | None, rows_per_batch: int,
                    keep_data: bool = False, max_bytes: int | None = DEFAULT_MAX_BYTES
                    ) -> Iterator[dict[str, np.ndarray]]:
    """Expand a batch of work units into decoded, resized images (Ray Data UDF).

    ``keep_data`` also carries the encoded file (segment's overlays need it).

    Yields:
        batches of at most ``rows_per_batch`` rows: ``key``, ``source``, ``width``/``height``
        (int32 original size after EXIF orientation; -1 when unknown), ``error`` and
        ``error_kind`` (``""`` when fine), ``image`` float32 (n, S, S, 3) in [0, 1] (zeros on
        error rows) and, with ``keep_data``,
        ``data`` (the encoded file, ``b""`` on error rows).
    """
    from selfment_dist.model.resize import resize_square

    skip = _skip_set(skip_ref)
    pending: list[dict] = []
    for kind, uri, key in zip(units["kind"], units["uri"], units["key"]):
        unit = {"kind": str(kind), "uri": str(uri), "key": str(key)}
        for rec in iter_records(unit, storage_options=storage_options, skip=skip,
                                max_bytes=max_bytes):
            row = {"key": rec["key"], "source": rec["source"], "width": -1, "height": -1,
                   "error": rec["error"], "error_kind": rec["error_kind"], "pixels": None,
                   "data": None}
            if rec["error"] is None:
                try:
                    pil = decode_image(rec["data"], max_pixels=max_pixels, max_bytes=max_bytes)
                    row["width"], row["height"] = pil.size
                    row["pixels"] = resize_square(pil, image_size)
                    row["data"] = rec["data"] if keep_data else None
                except ImageDecodeError as exc:
                    row["error"], row["error_kind"] = str(exc), PERMANENT
                except Exception as exc:  # anything else about one image stays with that image
                    row["error"] = f"cannot decode image: {type(exc).__name__}: {exc}"
                    row["error_kind"] = PERMANENT
                if row["error"] is not None:
                    rec["data"] = None
            pending.append(row)
            if len(pending) >= rows_per_batch:
                yield _decode_batch(pending, image_size, keep_data)
                pending = []
    if pending:
        yield _decode_batch(pending, image_size, keep_data)


# ---------------------------------------------------------------------------------------------
# Stage 2: backbone + NCut + IPO (one actor per model replica)

class LabelActor:
    """Ray Data callable class: loads the backbone once, labels batches of decoded images.

    ``__call__`` maps the decode stage's batch to a ``pyarrow.Table`` of the contract. Rows that
    arrive with an error pass through as error rows; an exception while labelling a batch is
    retried image by image so that only the failing image becomes an error row. CUDA faults
    follow :mod:`._device` (OOM: smaller batches; others: the actor exits and Ray restarts it).
    With ``require_gpu`` the actor refuses to start without its GPU.
    """

    def __init__(self, *, backbone: str, weights: str, image_size: int, labeler_kwargs: dict,
                 save_ncut: bool, save_features: bool, storage_options: dict | None,
                 device: str | None, cpu_threads: int | None, fail_once_after: int | None,
                 fail_marker: str | None, precision: str = "fp32", require_gpu: bool = False,
                 counters=None):
        import torch

        from selfment_dist.model.backbone import build_backbone
        from selfment_dist.algorithm.labeler import PseudoLabeler

        if cpu_threads:
            try:
                available = len(os.sched_getaffinity(0))
            except AttributeError:  # not Linux
                available = os.cpu_count() or 1
            torch.set_num_threads(max(1, min(int(cpu_threads), available)))
        device = actor_device(device, require_gpu=require_gpu)
        self.backbone = build_backbone(backbone, weights=weights, image_size=image_size,
                                       device=device, storage_options=storage_options,
                                       precision=precision)
        self.labeler = PseudoLabeler(self.backbone, **labeler_kwargs)
        self.save_ncut = save_ncut
        self.save_features = save_features
        self.objects = labeler_kwargs.get("max_objects", 1) > 1
        self.schema = pseudo_label_schema(ncut_mask=save_ncut, features=save_features,
                                          objects=self.objects)
        self.fail_once_after = fail_once_after
        self.fail_marker = fail_marker
        self.counters = counters
        count_replica_started(counters)
        self.batches = 0
        logger.info("label actor ready: %r, %d torch threads", self.backbone,
                    torch.get_num_threads())

    def _maybe_fail(self) -> None:
        """Fault injection for tests: die once, hard, after ``fail_once_after`` batches."""
        if self.fail_once_after is None or self.batches < self.fail_once_after:
            return
        try:
            fd = os.open(self.fail_marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return  # already died once in this run
        os.close(fd)
        logger.warning("fault injection: label actor exits after %d batches", self.batches)
        os._exit(1)

    def _label(self, images: np.ndarray) -> list[dict | str]:
        """Per image: the result dict, or an error message."""
        from selfment_dist.algorithm.ncut import take_dense_fallbacks
        kw = {"return_ncut": self.save_ncut, "return_features": self.save_features}

        def label(part: np.ndarray) -> list[dict]:
            out = self.labeler(part, **kw)
            return [{k: v[i] for k, v in out.items()} for i in range(len(part))]

        results = run_guarded(label, images, what="labelling")
        fallbacks = take_dense_fallbacks()
        if fallbacks and self.counters is not None:
            self.counters.add.remote("dense_eigh_fallbacks", fallbacks)
        return results

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        self._maybe_fail()
        self.batches += 1
        n = len(batch["key"])
        errors = [str(e) or None for e in batch["error"]]
        kinds = [str(k) or PERMANENT for k in batch.get("error_kind", [""] * n)]
        ok = [i for i in range(n) if errors[i] is None]
        results: dict[int, dict | str] = {}
        if ok:
            images = np.ascontiguousarray(batch["image"][ok])
            results = dict(zip(ok, self._label(images)))

        cols: dict[str, list] = {name: [] for name in self.schema.names}
        for i in range(n):
            res = results.get(i, errors[i])
            width, height = int(batch["width"][i]), int(batch["height"][i])
            cols["key"].append(str(batch["key"][i]))
            cols["source"].append(str(batch["source"][i]))
            cols["width"].append(width if width >= 0 else None)
            cols["height"].append(height if height >= 0 else None)
            if isinstance(res, dict):
                mask = np.asarray(res["mask"], dtype=bool)
                cols["grid_h"].append(mask.shape[0])
                cols["grid_w"].append(mask.shape[1])
                cols["mask"].append(encode_mask(mask))
                cols["fg_fraction"].append(float(mask.mean()))
                cols["error"].append(None)
                cols["error_kind"].append(None)
                for name in QUALITY_COLUMNS:
                    cols[name].append(res[name].item())
                if self.save_ncut:
                    cols["ncut_mask"].append(encode_mask(res["ncut_mask"]))
                if self.save_features:
                    cols["features"].append(encode_features(res["features"]))
                if self.objects:
                    cols["objects"].append(objects_cell(res["objects_mask"],
                                                        res["objects_confidence"],
                                                        res["objects_present"]))
            else:
                for name in ("grid_h", "grid_w", "mask", "fg_fraction", *QUALITY_COLUMNS):
                    cols[name].append(None)
                cols["error"].append(res)
                # A failure inside the model (not in the input) may not recur: retried.
                cols["error_kind"].append(kinds[i] if errors[i] is not None else TRANSIENT)
                if self.save_ncut:
                    cols["ncut_mask"].append(None)
                if self.save_features:
                    cols["features"].append(None)
                if self.objects:
                    cols["objects"].append(None)
        count_rows_here(self.counters, n)
        return pa.Table.from_pydict(cols, schema=self.schema)


def _build_dataset(units: list[dict], *, n_containers: int, skip_ref, image_size: int,
                   max_pixels, max_bytes, storage_options, batch_size: int, plan: dict,
                   actor_kwargs: dict, model_workers: str = "actors"):
    """units → read+decode (CPU tasks) → LabelActor (elastic actor pool, or tasks on warm
    workers) — lazily, nothing runs yet."""
    import ray

    # About one batch of image files per read task; each container (parquet, tar) its own.
    n_blocks = max(1, min(len(units), n_containers + math.ceil(
        (len(units) - n_containers) / batch_size)))
    ds = ray.data.from_items(units, override_num_blocks=n_blocks)
    ds = ds.map_batches(
        read_and_decode, batch_size=None, zero_copy_batch=True,
        fn_kwargs={"image_size": image_size, "max_pixels": max_pixels, "max_bytes": max_bytes,
                   "storage_options": storage_options, "skip_ref": skip_ref,
                   "rows_per_batch": batch_size},
        num_cpus=LIGHT_TASK_CPUS, compute=decode_pool(plan),
        max_retries=MAX_RETRIES)
    return ds.map_batches(
        batch_size=batch_size, batch_format="numpy", udf_modifying_row_count=False,
        **model_stage_args(LabelActor, actor_kwargs, plan, model_workers))


# ---------------------------------------------------------------------------------------------
# Entry point

def run_pseudo_label(*args: PseudoLabelSettings | str | Iterable[str],
                     fail_once_after: int | None = None, **options: Any) -> dict:
    """Pseudo-label every image of ``inputs`` into a parquet dataset at ``output``.

    Called as ``run_pseudo_label(settings)`` with a :class:`PseudoLabelSettings` (every option,
    its default and range is declared there), or in the keyword form
    ``run_pseudo_label(inputs, output, **options)`` that builds one. The output's manifest
    records the settings (:meth:`Settings.record`: secrets left out).

    Args:
        settings: the stage's settings.
        fail_once_after: testing only: one model actor exits hard once after this many batches.

    Returns:
        summary: ``images`` and ``errors`` written by this run, ``skipped`` (already present),
        ``rows_total``/``errors_total``/``files_total`` in the output, ``wall_s``,
        ``images_per_s`` (rows written, error rows included, per second of wall time), ``output``,
        ``run_id``, ``inputs_skipped`` (input files skipped on purpose by name or extension:
        ``{"total", "by_reason", "examples"}``, docs/inputs.md), ``dense_eigh_fallbacks`` (images whose eigen-solve fell back to a dense
        float64 ``eigh``, slow on GPUs), ``rows_per_node`` (rows each Ray node's model actors
        labelled, by node id; a batch retried after a failure counts again); with
        ``fail_once_after`` also ``fault_injected`` (an actor did exit).
    Raises:
        SettingsError (a ValueError): invalid settings, one line per problem (nothing written).
        ValueError: an output made with other settings, empty inputs, a bad checkpoint.
        FileNotFoundError: an input or checkpoint that does not exist.
        OutputBusyError: another live run holds ``output``.
        FencedError: another run took over ``output`` during this run.
    """
    import ray

    start = time.perf_counter()
    s = build_settings(PseudoLabelSettings, args, options)  # types and ranges
    problems = check_backbone_size(s.backbone, s.image_size)  # needs the backbone's patch size
    if problems:
        raise SettingsError([f"pseudo_label: {p}" for p in problems])
    inputs, output, storage_options = s.inputs, s.output, s.storage_options
    batch_size, rows_per_file = s.batch_size, s.rows_per_file  # None: resolved below
    _check_checkpoint(s.backbone, s.weights, s.image_size, storage_options)
    fs, root, units = list_inputs(inputs, output, storage_options, allow_empty=s.allow_empty)

    ensure_ray(s.address)
    plan = plan_resources(s.num_actors, s.num_gpus_per_actor, allow_cpu_fallback=s.cpu_fallback,
                          image_size=s.image_size)
    check_model_workers(s.model_workers, plan, "pseudo-label")
    from selfment_dist.defaults import resolve_precision

    # What the actors will run (recorded, and compared on resume): auto means fp32.
    resolved_precision = resolve_precision(s.precision, "cuda" if plan["num_gpus"] else "cpu")
    if batch_size is None:
        batch_size = 32 if plan["num_gpus"] else 8
    if rows_per_file is None:
        rows_per_file = 256 if s.save_features else 1024
    run_id = uuid.uuid4().hex[:12]
    config = {"backbone": s.backbone, "weights": str(s.weights), "image_size": int(s.image_size),
              "precision": resolved_precision, "tau": s.tau, "eps": s.eps,
              "binary_graph": s.binary_graph, "n_iter": s.n_iter, "sample_size": s.sample_size,
              "no_object_threshold": float(s.no_object_threshold), "save_ncut": s.save_ncut,
              "save_features": s.save_features, "max_pixels": s.max_pixels,
              "max_objects": s.max_objects, "min_object_confidence": s.min_object_confidence,
              "object_ipo": s.object_ipo,
              "max_bytes": s.max_bytes,
              "batch_size": batch_size, "num_actors": plan["actors"],
              "num_gpus_per_actor": plan["num_gpus"], "rows_per_file": rows_per_file}
    logger.info("pseudo-label run %s: %s -> %s, config %s", run_id, inputs, output, config)

    # Output: take the lease and register this run in the manifest (which fences the writes of
    # an unfinished earlier run, see _parts), then read what is already there (resume).
    fs.makedirs(root, exist_ok=True)
    fs.invalidate_cache(root)
    previous = read_manifest(fs, root)
    check_lease(previous, output, run_id)
    # Settings are locked by rows, not by a manifest: a run that wrote none locks nothing.
    check_resume(previous if has_parts(fs, root) else None, config, output, keys=_RESUME_KEYS,
                 holds="pseudo-labels")
    manifest = previous or {"format": "selfment-pseudo-labels", "format_version": 1}
    manifest.update({"status": "running", "config": config, "inputs": inputs,
                     "settings": s.record(), "versions": versions(),
                     "lease": new_lease(run_id), "inputs_skipped": units.skipped})
    manifest.pop("duplicates", None)
    _entry, unfinished = register_run(manifest, run_id)
    write_manifest(fs, root, manifest)
    confirm_lease(fs, root, MANIFEST_NAME, run_id, output)
    lease = Lease(fs, root, MANIFEST_NAME, run_id).start()
    try:
        summary, duplicates, all_done = _run(
            ray, fs, root, units, unfinished, run_id=run_id, output=output,
            image_size=s.image_size, max_pixels=s.max_pixels, max_bytes=s.max_bytes,
            storage_options=storage_options, batch_size=batch_size, plan=plan,
            rows_per_file=rows_per_file, save_ncut=s.save_ncut, save_features=s.save_features,
            fail_once_after=fail_once_after, progress=s.progress,
            actor_kwargs={
                "backbone": s.backbone, "weights": str(s.weights), "image_size": s.image_size,
                "precision": resolved_precision,
                "labeler_kwargs": {"tau": s.tau, "eps": s.eps, "binary_graph": s.binary_graph,
                                   "n_iter": s.n_iter, "sample_size": s.sample_size,
                                   "no_object_threshold": float(s.no_object_threshold),
                                   **labeler_object_options(s)},
                "save_ncut": s.save_ncut, "save_features": s.save_features,
                "storage_options": storage_options, "device": plan["device"],
                "cpu_threads": plan["cpu_threads"], "fail_once_after": fail_once_after,
                "require_gpu": plan["require_gpu"]},
            lease=lease, actor_wait_s=s.actor_wait_s, model_workers=s.model_workers)
    except BaseException as exc:
        lease.stop()
        status = "fenced" if isinstance(exc, FencedError) else "failed"
        _finish_failed(lease, run_id, status, f"{type(exc).__name__}: {exc}")
        raise
    lease.stop()
    summary["inputs_skipped"] = units.skipped  # files skipped on purpose (docs/inputs.md)
    summary["wall_s"] = wall = round(time.perf_counter() - start, 3)
    summary["images_per_s"] = round(summary["images"] / wall, 3) if wall else 0.0

    def finish(m: dict) -> None:
        run_entry(m, run_id).update(
            status="complete" if all_done else "failed", finished=now(),
            images=summary["images"], errors=summary["errors"], skipped=summary["skipped"],
            wall_s=summary["wall_s"], images_per_s=summary["images_per_s"],
            dense_eigh_fallbacks=summary["dense_eigh_fallbacks"],
            rows_per_node=summary["rows_per_node"])
        m.update(status="complete" if all_done else "failed",
                 counts={"rows": summary["rows_total"], "errors": summary["errors_total"],
                         "files": summary["files_total"]})
        if summary.get("feature_dim") is not None:
            m["feature_dim"] = summary["feature_dim"]
        if duplicates:
            m["duplicates"] = duplicates
        m["lease"]["released"] = now()

    lease.update(finish)
    if lease.lost_to:
        err = FencedError(f"run {run_id} lost {output} to run {lease.lost_to} before it could "
                          "finish; re-run to complete the output")
        _finish_failed(lease, run_id, "fenced", str(err))
        raise err
    summary.pop("feature_dim", None)
    if not all_done:
        raise RuntimeError(f"run {run_id}: some inputs have no row in {output}; re-run to "
                           "complete the output")
    logger.info("pseudo-label run %s done: %d images (%d errors) in %.1fs, %.2f images/s; "
                "%d already present; output now %d rows (%d errors)", run_id, summary["images"],
                summary["errors"], wall, summary["images_per_s"], summary["skipped"],
                summary["rows_total"], summary["errors_total"])
    return summary


def _finish_failed(lease: Lease, run_id: str, status: str, reason: str) -> None:
    """Record a failed run: its own entry always; the top-level status only while it holds the
    lease (a run that lost the output must not overwrite the new holder's state)."""
    def failed(m: dict) -> None:
        run_entry(m, run_id).update(status=status, finished=now(), reason=reason[:500])
        if m.get("lease", {}).get("run_id") == run_id:
            m["status"] = "failed"
            m["lease"]["released"] = now()
    try:
        lease.update(failed, always=True)
    except Exception as exc:  # the original error matters more
        logger.error("could not record the failure of run %s in the manifest: %s", run_id, exc)


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


def _run(ray, fs, root: str, units: list[dict], unfinished: list[str], *, run_id: str,
         output: str, image_size: int, max_pixels, max_bytes, storage_options, batch_size: int,
         plan: dict, rows_per_file: int, save_ncut: bool, save_features: bool,
         fail_once_after, progress: bool, actor_kwargs: dict, lease: Lease,
         actor_wait_s: float | None, model_workers: str = "actors"
         ) -> tuple[dict, list[dict], bool]:
    """The run proper, once this run holds the output: resume, label, publish, check.

    Returns:
        the summary (without timings), the duplicate-key reports, and whether every input
        has a row.
    """
    await_leftover_writers(unfinished, output)
    retire_transient(fs, root)
    done = existing_keys(fs, root)

    n_units = len(units)
    image_keys = [u["key"] for u in units if u["kind"] == IMAGE]
    # A resume over a finished output is left nothing: no read task, no model actor.
    units, containers, done = units_left(units, done, storage_options)
    skip_ref = [ray.put(done.keys)] if (done and containers) else None
    if done:
        logger.info("resuming: %d keys already in %s; %d of %d work units left", len(done),
                    output, len(units), n_units)

    fail_marker = None
    if fail_once_after is not None:
        fail_marker = os.path.join(tempfile.gettempdir(), f"selfment-fail-once-{run_id}")

    written = {"rows": 0, "errors": 0, "dense_eigh_fallbacks": 0}
    fault_injected = False
    if units:
        counters = start_counters(run_id)  # rows per node, dense-eigh fallbacks
        objects = actor_kwargs["labeler_kwargs"].get("max_objects", 1) > 1
        sink = PartsSink(output, pseudo_label_schema(ncut_mask=save_ncut, features=save_features,
                                                     objects=objects),
                         run_id, rows_per_file, storage_options, manifest=MANIFEST_NAME)
        try:
            with progress_bars(progress), warnings.catch_warnings(), \
                    bounded_actor_start(plan, actor_wait_s, "pseudo-label"):
                # Retry limits travel as plain Ray remote args: Ray 2.60 deprecates
                # ``**ray_remote_args`` for named parameters but has none for these yet, and its
                # defaults (unlimited) would loop forever on an input that kills its worker.
                warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
                ds = _build_dataset(units, n_containers=len(containers), skip_ref=skip_ref,
                                    image_size=image_size, max_pixels=max_pixels,
                                    max_bytes=max_bytes, storage_options=storage_options,
                                    batch_size=batch_size, plan=plan,
                                    actor_kwargs={**actor_kwargs, "fail_marker": fail_marker,
                                                  "counters": counters},
                                    model_workers=model_workers)
                ds.write_datasink(sink, ray_remote_args={"max_retries": MAX_RETRIES,
                                                       "num_cpus": LIGHT_TASK_CPUS})
            per_node, counts = split_counters(read_counters(counters))
        finally:
            stop_counters(counters)
            if fail_marker and os.path.exists(fail_marker):
                fault_injected = True
                os.remove(fail_marker)
        if sink.fenced:
            raise FencedError(f"run {run_id}: {len(sink.fenced)} parts were not published "
                              f"because run {lease.lost_to or 'another run'} took over {output}; "
                              "re-run to complete the output")
        written = {"rows": sum(r["rows"] for r in sink.results),
                   "errors": sum(r["errors"] for r in sink.results),
                   "rows_per_node": per_node, **counts}
    if lease.lost_to:
        raise FencedError(f"run {run_id} lost {output} to run {lease.lost_to}")

    tmp = f"{root.rstrip('/')}/{TMP_DIR}"
    duplicates, keys = resolve_duplicates(fs, root)
    if is_local(fs) and fs.exists(tmp):
        fs.rm(tmp, recursive=True)  # only empty or failed-attempt leftovers remain here
    missing = [k for k, there in zip(image_keys, keys.contains_each(image_keys)) if not there]
    if missing:
        logger.error("%d inputs have no row in %s, e.g. %s", len(missing), output, missing[:5])
    totals = count_parts(fs, root)
    summary = {
        "output": output, "run_id": run_id,
        "images": written["rows"], "errors": written["errors"], "skipped": len(done),
        "rows_total": totals["rows"], "errors_total": totals["errors"],
        "files_total": totals["files"], "duplicates": len(duplicates),
        "feature_dim": totals["feature_dim"],
        "dense_eigh_fallbacks": written.get("dense_eigh_fallbacks", 0),
        "rows_per_node": written.get("rows_per_node", {}),
        "replicas_started": written.get("replicas_started", 0),
    }
    if fail_once_after is not None:
        summary["fault_injected"] = fault_injected
    return summary, duplicates, not missing
