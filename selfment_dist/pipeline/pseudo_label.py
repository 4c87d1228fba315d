"""``selfment pseudo-label``: images anywhere → pseudo-masks, streamed through Ray Data.

Flow (data moves one way; the driver only ever holds file names)::

    enumerate_units (driver: file names)          io.sources
      → read + decode + resize (CPU tasks)        io.images, backbone.resize_square
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

from ..backbone import DEFAULT_BACKBONE, check_image_size, resolve_precision
from ..io.images import ImageDecodeError, decode_image
from ..io.masks import encode_mask
from ..io.schema import encode_features, pseudo_label_schema
from ..io.sources import IMAGE, enumerate_units, iter_records
from ..io.storage import is_local, url_to_fs
from ..settings import PseudoLabelSettings, build_settings
from ._parts import (MANIFEST_NAME, TMP_DIR, PartsSink, await_leftover_writers, check_resume,
                     count_parts, existing_keys, now, outside_output, read_manifest, register_run,
                     versions, write_manifest)
from ._ray import (MAX_ACTOR_RESTARTS, MAX_RETRIES, MAX_TASK_RETRIES, ensure_ray, plan_resources,
                   progress_bars)

logger = logging.getLogger(__name__)

__all__ = ["run_pseudo_label", "DEFAULT_BACKBONE", "MANIFEST_NAME"]

# Settings that change what a row holds: a re-run into an existing output must match them.
_RESUME_KEYS = ("backbone", "weights", "image_size", "precision", "tau", "eps", "binary_graph",
                "n_iter", "sample_size", "save_ncut", "save_features")


# ---------------------------------------------------------------------------------------------
# Stage 1: read + decode (stateless, CPU tasks)

_SKIP_CACHE: dict[str, frozenset] = {}


def _skip_set(skip_ref: list | None) -> frozenset:
    """The done keys (shared through the object store once per worker process)."""
    if not skip_ref:
        return frozenset()
    ref = skip_ref[0]
    cache_key = ref.hex()
    if cache_key not in _SKIP_CACHE:
        import ray
        _SKIP_CACHE.clear()
        _SKIP_CACHE[cache_key] = frozenset(ray.get(ref))
    return _SKIP_CACHE[cache_key]


def _decode_batch(rows: list[dict], image_size: int, keep_data: bool) -> dict[str, np.ndarray]:
    images = np.zeros((len(rows), image_size, image_size, 3), dtype=np.uint8)
    for i, row in enumerate(rows):
        if row["pixels"] is not None:
            images[i] = row["pixels"]
    batch = {
        "key": np.array([r["key"] for r in rows], dtype=object),
        "source": np.array([r["source"] for r in rows], dtype=object),
        "width": np.array([r["width"] for r in rows], dtype=np.int32),
        "height": np.array([r["height"] for r in rows], dtype=np.int32),
        "error": np.array([r["error"] or "" for r in rows], dtype=object),
        "image": images,
    }
    if keep_data:  # the encoded original, for overlays
        batch["data"] = np.array([r["data"] or b"" for r in rows], dtype=object)
    return batch


def read_and_decode(units: dict[str, np.ndarray], *, image_size: int, max_pixels: int | None,
                    storage_options: dict | None, skip_ref: list | None, rows_per_batch: int,
                    keep_data: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """Expand a batch of work units into decoded, resized images (Ray Data UDF).

    ``keep_data`` also carries the encoded file (segment's overlays need it).

    Yields:
        batches of at most ``rows_per_batch`` rows: ``key``, ``source``, ``width``/``height``
        (int32 original size after EXIF orientation; -1 when unknown), ``error`` (``""`` when
        fine), ``image`` uint8 (n, S, S, 3) (zeros on error rows) and, with ``keep_data``,
        ``data`` (the encoded file, ``b""`` on error rows).
    """
    from ..backbone import resize_square

    skip = _skip_set(skip_ref)
    pending: list[dict] = []
    for kind, uri, key in zip(units["kind"], units["uri"], units["key"]):
        unit = {"kind": str(kind), "uri": str(uri), "key": str(key)}
        for rec in iter_records(unit, storage_options=storage_options, skip=skip):
            row = {"key": rec["key"], "source": rec["source"], "width": -1, "height": -1,
                   "error": rec["error"], "pixels": None, "data": None}
            if rec["error"] is None:
                try:
                    pil = decode_image(rec["data"], max_pixels=max_pixels)
                    row["width"], row["height"] = pil.size
                    row["pixels"] = resize_square(pil, image_size)
                    row["data"] = rec["data"] if keep_data else None
                except ImageDecodeError as exc:
                    row["error"] = str(exc)
                except Exception as exc:  # anything else about one image stays with that image
                    row["error"] = f"cannot decode image: {type(exc).__name__}: {exc}"
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
    retried image by image so that only the failing image becomes an error row.
    """

    def __init__(self, *, backbone: str, weights: str, image_size: int, labeler_kwargs: dict,
                 save_ncut: bool, save_features: bool, storage_options: dict | None,
                 device: str | None, cpu_threads: int | None, fail_once_after: int | None,
                 fail_marker: str | None, precision: str = "auto"):
        import torch

        from ..backbone import build_backbone
        from ..labeler import PseudoLabeler

        if cpu_threads:
            try:
                available = len(os.sched_getaffinity(0))
            except AttributeError:  # not Linux
                available = os.cpu_count() or 1
            torch.set_num_threads(max(1, min(int(cpu_threads), available)))
        self.backbone = build_backbone(backbone, weights=weights, image_size=image_size,
                                       device=device, storage_options=storage_options,
                                       precision=precision)
        self.labeler = PseudoLabeler(self.backbone, **labeler_kwargs)
        self.save_ncut = save_ncut
        self.save_features = save_features
        self.schema = pseudo_label_schema(ncut_mask=save_ncut, features=save_features)
        self.fail_once_after = fail_once_after
        self.fail_marker = fail_marker
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
        kw = {"return_ncut": self.save_ncut, "return_features": self.save_features}
        try:
            out = self.labeler(images, **kw)
            return [{k: v[i] for k, v in out.items()} for i in range(len(images))]
        except Exception as batch_exc:
            if len(images) == 1:
                return [f"labelling failed: {type(batch_exc).__name__}: {batch_exc}"]
            logger.warning("batch of %d failed (%s); retrying image by image", len(images),
                           batch_exc)
            results: list[dict | str] = []
            for i in range(len(images)):
                results.extend(self._label(images[i:i + 1]))
            return results

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        self._maybe_fail()
        self.batches += 1
        n = len(batch["key"])
        errors = [str(e) or None for e in batch["error"]]
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
                if self.save_ncut:
                    cols["ncut_mask"].append(encode_mask(res["ncut_mask"]))
                if self.save_features:
                    cols["features"].append(encode_features(res["features"]))
            else:
                for name in ("grid_h", "grid_w", "mask", "fg_fraction"):
                    cols[name].append(None)
                cols["error"].append(res)
                if self.save_ncut:
                    cols["ncut_mask"].append(None)
                if self.save_features:
                    cols["features"].append(None)
        return pa.Table.from_pydict(cols, schema=self.schema)


def _build_dataset(units: list[dict], *, n_containers: int, skip_ref, image_size: int,
                   max_pixels, storage_options, batch_size: int, plan: dict,
                   actor_kwargs: dict):
    """units → read+decode (CPU tasks) → LabelActor (actor pool) — lazily, nothing runs yet."""
    import ray

    # About one batch of image files per read task; each container (parquet, tar) its own.
    n_blocks = max(1, min(len(units), n_containers + math.ceil(
        (len(units) - n_containers) / batch_size)))
    ds = ray.data.from_items(units, override_num_blocks=n_blocks)
    ds = ds.map_batches(
        read_and_decode, batch_size=None, zero_copy_batch=True,
        fn_kwargs={"image_size": image_size, "max_pixels": max_pixels,
                   "storage_options": storage_options, "skip_ref": skip_ref,
                   "rows_per_batch": batch_size},
        num_cpus=1, max_retries=MAX_RETRIES)
    return ds.map_batches(
        LabelActor, batch_size=batch_size, batch_format="numpy", udf_modifying_row_count=False,
        fn_constructor_kwargs=actor_kwargs,
        compute=ray.data.ActorPoolStrategy(size=plan["actors"]),
        num_cpus=plan["num_cpus"], num_gpus=plan["num_gpus"] or None,
        max_restarts=MAX_ACTOR_RESTARTS, max_task_retries=MAX_TASK_RETRIES)


# ---------------------------------------------------------------------------------------------
# Entry point

def run_pseudo_label(*args: PseudoLabelSettings | str | Iterable[str],
                     fail_once_after: int | None = None, **options: Any) -> dict:
    """Pseudo-label every image of ``settings.inputs`` into a parquet dataset at ``settings.output``.

    Called as ``run_pseudo_label(settings)`` with a :class:`PseudoLabelSettings` (every option,
    its default and range is declared there), or in the keyword form
    ``run_pseudo_label(inputs, output, **options)`` that builds one.

    Args:
        settings: what to label, where to, and how (NCut/IPO, backbone, resources).
        fail_once_after: testing only: one model actor exits hard once after this many batches.
    Returns:
        summary: ``images`` and ``errors`` written by this run, ``skipped`` (already present),
        ``rows_total``/``errors_total``/``files_total`` in the output, ``wall_s``,
        ``images_per_s`` (rows written, error rows included, per second of wall time), ``output``,
        ``run_id``; with ``fail_once_after`` also ``fault_injected`` (an actor did exit).
        The output's manifest records the settings (:meth:`Settings.record`: no secrets).
    Raises:
        SettingsError: options that do not validate (keyword form).
        ValueError: unknown backbone, bad image size, or an output made with other settings.
        FileNotFoundError: an input that does not exist.
    """
    import ray

    s = build_settings(PseudoLabelSettings, args, options)
    inputs, output, storage_options = s.inputs, s.output, s.storage_options
    batch_size, rows_per_file = s.batch_size, s.rows_per_file  # None: resolved below
    start = time.perf_counter()
    check_image_size(s.backbone, s.image_size)  # in the driver, not in every actor
    ensure_ray(s.address)
    plan = plan_resources(s.num_actors, s.num_gpus_per_actor)
    # What the actors will run (recorded, and compared on resume): auto means bf16 on a GPU.
    resolved_precision = resolve_precision(s.precision, "cuda" if plan["num_gpus"] else "cpu")
    if batch_size is None:
        batch_size = 32 if plan["num_gpus"] else 8
    if rows_per_file is None:
        rows_per_file = 256 if s.save_features else 1024
    run_id = uuid.uuid4().hex[:12]
    config = {"backbone": s.backbone, "weights": str(s.weights), "image_size": int(s.image_size),
              "precision": resolved_precision, "tau": s.tau, "eps": s.eps,
              "binary_graph": s.binary_graph, "n_iter": s.n_iter, "sample_size": s.sample_size,
              "save_ncut": s.save_ncut, "save_features": s.save_features,
              "max_pixels": s.max_pixels,
              "batch_size": batch_size, "num_actors": plan["actors"],
              "num_gpus_per_actor": plan["num_gpus"], "rows_per_file": rows_per_file}
    logger.info("pseudo-label run %s: %s -> %s, config %s", run_id, inputs, output, config)

    # Output: register this run in the manifest (which fences the writes of an unfinished
    # earlier run, see _parts), then read what is already there (resume).
    fs, root = url_to_fs(output, storage_options)
    fs.makedirs(root, exist_ok=True)
    fs.invalidate_cache(root)
    previous = read_manifest(fs, root)
    check_resume(previous, config, output, keys=_RESUME_KEYS, holds="pseudo-labels")
    manifest = previous or {"format": "selfment-pseudo-labels", "format_version": 1}
    manifest.update({"status": "running", "config": config, "inputs": inputs,
                     "settings": s.record(), "versions": versions()})
    run_entry, unfinished = register_run(manifest, run_id)
    write_manifest(fs, root, manifest)
    await_leftover_writers(unfinished, output)
    done = existing_keys(fs, root)

    units = outside_output(enumerate_units(inputs, storage_options), fs, root)
    n_units = len(units)
    units = [u for u in units if not (u["kind"] == IMAGE and u["key"] in done)]
    containers = [u for u in units if u["kind"] != IMAGE]
    if done:
        logger.info("resuming: %d keys already in %s; %d of %d work units left", len(done),
                    output, len(units), n_units)

    fail_marker = None
    if fail_once_after is not None:
        fail_marker = os.path.join(tempfile.gettempdir(), f"selfment-fail-once-{run_id}")

    written = {"rows": 0, "errors": 0}
    fault_injected = False
    if units:
        actor_kwargs = {
            "backbone": s.backbone, "weights": str(s.weights), "image_size": s.image_size,
            "precision": resolved_precision,
            "labeler_kwargs": {"tau": s.tau, "eps": s.eps, "binary_graph": s.binary_graph,
                               "n_iter": s.n_iter, "sample_size": s.sample_size},
            "save_ncut": s.save_ncut, "save_features": s.save_features,
            "storage_options": storage_options, "device": plan["device"],
            "cpu_threads": plan["cpu_threads"], "fail_once_after": fail_once_after,
            "fail_marker": fail_marker}
        sink = PartsSink(output,
                         pseudo_label_schema(ncut_mask=s.save_ncut, features=s.save_features),
                         run_id, rows_per_file, storage_options, manifest=MANIFEST_NAME)
        try:
            with progress_bars(s.progress), warnings.catch_warnings():
                # Retry limits travel as plain Ray remote args: Ray 2.60 deprecates
                # ``**ray_remote_args`` for named parameters but has none for these yet, and its
                # defaults (unlimited) would loop forever on an input that kills its worker.
                warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
                skip_ref = [ray.put(sorted(done))] if (done and containers) else None
                ds = _build_dataset(units, n_containers=len(containers), skip_ref=skip_ref,
                                    image_size=s.image_size, max_pixels=s.max_pixels,
                                    storage_options=storage_options, batch_size=batch_size,
                                    plan=plan, actor_kwargs=actor_kwargs)
                ds.write_datasink(sink, ray_remote_args={"max_retries": MAX_RETRIES})
        except BaseException:
            run_entry.update(status="failed", finished=now())
            write_manifest(fs, root, manifest)
            raise
        finally:
            if fail_marker and os.path.exists(fail_marker):
                fault_injected = True
                os.remove(fail_marker)
        written = {"rows": sum(r["rows"] for r in sink.results),
                   "errors": sum(r["errors"] for r in sink.results)}

    tmp = f"{root.rstrip('/')}/{TMP_DIR}"
    if is_local(fs) and fs.exists(tmp):
        fs.rm(tmp, recursive=True)  # only empty or failed-attempt leftovers remain here
    wall = time.perf_counter() - start
    totals = count_parts(fs, root)
    summary = {
        "output": output, "run_id": run_id,
        "images": written["rows"], "errors": written["errors"], "skipped": len(done),
        "rows_total": totals["rows"], "errors_total": totals["errors"],
        "files_total": totals["files"],
        "wall_s": round(wall, 3), "images_per_s": round(written["rows"] / wall, 3) if wall else 0.0,
    }
    if fail_once_after is not None:
        summary["fault_injected"] = fault_injected
    run_entry.update(status="complete", finished=now(), images=summary["images"],
                     errors=summary["errors"], skipped=summary["skipped"],
                     wall_s=summary["wall_s"], images_per_s=summary["images_per_s"])
    manifest.update(status="complete", counts={"rows": totals["rows"],
                                               "errors": totals["errors"],
                                               "files": totals["files"]})
    if totals["feature_dim"] is not None:
        manifest["feature_dim"] = totals["feature_dim"]
    write_manifest(fs, root, manifest)
    logger.info("pseudo-label run %s done: %d images (%d errors) in %.1fs, %.2f images/s; "
                "%d already present; output now %d rows (%d errors)", run_id, summary["images"],
                summary["errors"], wall, summary["images_per_s"], summary["skipped"],
                totals["rows"], totals["errors"])
    return summary
