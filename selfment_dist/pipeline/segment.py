"""``selfment segment``: a model artifact + images anywhere → saliency maps, through Ray Data.

Flow (data moves one way; the driver only ever holds file names and small counts)::

    enumerate_units (driver: file names)              io.sources
      → read + decode + resize (CPU tasks)            io.images, backbone.resize_square
      → backbone + head (one actor stage, model       segmenter.Segmenter
        loaded once per actor, batched)
      → upsample to the original size, 8-bit PNG,     segmenter.upsample / to_png_bytes
        written from the write tasks
        (png: ``<output>/<key>.png`` [+ ``_overlays/<key>.jpg``]; parquet: ``part-*.parquet``)
      → ``_segment.json`` (driver: config, counts, the list of failed inputs)

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
import math
import os
import posixpath
import time
import uuid
import warnings
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa
from ray.data import Datasink

from selfment_dist.io.images import decode_image
from selfment_dist.io.storage import is_local, to_uri, url_to_fs
from selfment_dist.model.maps import to_png_bytes, to_uint8, upsample
from selfment_dist.settings import OUTPUT_FORMATS, SegmentSettings, build_settings
# Shared with the pseudo-label pipeline (same reading, resources, parquet parts and resume).
from selfment_dist.pipeline._internal.device import actor_device, run_guarded
from selfment_dist.pipeline._internal.done_keys import units_left
from selfment_dist.pipeline._internal.parts import (TMP_DIR, FencedError, Lease, PartsSink, await_leftover_writers,
                     check_lease, check_resume, confirm_lease, count_parts, existing_keys,
                     has_parts, list_inputs, new_lease, now, read_manifest, register_run,
                     run_entry, versions, write_manifest)
from selfment_dist.pipeline._internal.ray_runtime import (LIGHT_TASK_CPUS, MAX_RETRIES, bounded_actor_start, check_model_workers,
                   count_replica_started, count_rows_here, decode_pool, ensure_ray,
                   model_stage_args, plan_resources, progress_bars, read_counters,
                   split_counters, start_counters, stop_counters)
from selfment_dist.pipeline.pseudo_label import read_and_decode

logger = logging.getLogger(__name__)

__all__ = ["run_segment", "SegmentActor", "read_and_decode", "SEGMENT_SCHEMA", "MANIFEST_NAME",
           "OVERLAY_DIR", "OUTPUT_FORMATS"]

MANIFEST_NAME = "_segment.json"
OVERLAY_DIR = "_overlays"
#: Tint of the foreground in overlays (RGB) and its opacity where the saliency is 1.
OVERLAY_COLOUR = (255, 40, 40)
OVERLAY_ALPHA = 0.55
_ROWS_PER_FILE = 1024

#: Rows of the parquet output: one per input image, failures included.
SEGMENT_SCHEMA = pa.schema(
    [pa.field("key", pa.string(), nullable=False),
     pa.field("source", pa.string(), nullable=False),
     pa.field("width", pa.int32()),       # original size, after EXIF orientation
     pa.field("height", pa.int32()),
     pa.field("png", pa.binary()),        # 8-bit greyscale PNG of the map, width x height
     pa.field("error", pa.string())],     # null when fine
    metadata={b"selfment.contract": b"saliency-maps/1",
              b"selfment.png": b"8-bit L, round(255 * saliency), original size"})
# Settings that change what a map holds: a re-run into an existing output must match them.
_RESUME_KEYS = ("model_fingerprint", "image_size", "output_format", "max_pixels", "max_bytes")


# ---------------------------------------------------------------------------------------------
# Stage 1: read + decode (stateless, CPU tasks)

# ---------------------------------------------------------------------------------------------
# Stage 2: backbone + head (one actor per model replica)

class SegmentActor:
    """Ray Data callable class: loads a :class:`~selfment_dist.model.segmenter.Segmenter` once, maps
    decoded batches to patch saliency.

    ``__call__`` keeps the batch's columns but ``image`` and adds ``saliency`` float32
    (n, h, w) (zeros on error rows). A batch that fails in the model is retried image by image,
    so only the failing image gets an ``error``.
    """

    def __init__(self, *, model: str, image_size: int, storage_options: dict | None,
                 device: str | None, cpu_threads: int | None, require_gpu: bool = False,
                 counters=None):
        import torch

        from selfment_dist.model.segmenter import Segmenter

        if cpu_threads:
            try:
                available = len(os.sched_getaffinity(0))
            except AttributeError:  # not Linux
                available = os.cpu_count() or 1
            torch.set_num_threads(max(1, min(int(cpu_threads), available)))
        device = actor_device(device, require_gpu=require_gpu)
        self.segmenter = Segmenter.from_artifact(model, image_size=image_size, device=device,
                                                 storage_options=storage_options)
        self.counters = counters
        count_replica_started(counters)
        logger.info("segment actor ready: %r, %d torch threads", self.segmenter,
                    torch.get_num_threads())

    def _saliency(self, images: np.ndarray) -> list[np.ndarray | str]:
        """Per image: float32 (h, w) saliency, or an error message (CUDA faults: see _device)."""
        return run_guarded(lambda part: list(self.segmenter.saliency(part)), images,
                           what="segmentation")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["key"])
        errors = [str(e) for e in batch["error"]]
        saliency = np.zeros((n, *self.segmenter.grid), dtype=np.float32)
        ok = [i for i in range(n) if not errors[i]]
        if ok:
            for i, res in zip(ok, self._saliency(np.ascontiguousarray(batch["image"][ok]))):
                if isinstance(res, str):
                    errors[i] = res
                else:
                    saliency[i] = res
        out = {k: v for k, v in batch.items() if k != "image"}
        out["error"] = np.array(errors, dtype=object)
        out["saliency"] = saliency
        count_rows_here(self.counters, n)
        return out


# ---------------------------------------------------------------------------------------------
# Stage 3: maps at the original size

def render_map(saliency: np.ndarray, width: int, height: int) -> np.ndarray:
    """Patch saliency float (h, w) → uint8 (height, width) map, ``round(255 * s)``."""
    return to_uint8(upsample(saliency, (height, width)))


def overlay_jpeg(data: bytes, level: np.ndarray, *, max_pixels: int | None) -> bytes:
    """The original image with the foreground tinted: JPEG bytes at the map's size.

    Args:
        data: the encoded original (decoded again, EXIF orientation applied).
        level: uint8 (H, W) map; opacity ``OVERLAY_ALPHA * level / 255`` of ``OVERLAY_COLOUR``.
    """
    import io

    from PIL import Image

    image = decode_image(data, max_pixels=max_pixels)
    if image.size != (level.shape[1], level.shape[0]):
        raise ValueError(f"image is {image.size[0]}x{image.size[1]}, map is "
                         f"{level.shape[1]}x{level.shape[0]}")
    alpha = Image.fromarray(np.rint(level * OVERLAY_ALPHA).astype(np.uint8), mode="L")
    tinted = Image.composite(Image.new("RGB", image.size, OVERLAY_COLOUR), image, alpha)
    buf = io.BytesIO()
    tinted.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _check_key(key: str) -> None:
    """Keys become paths under the output: refuse ones that would leave it."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"key {key!r} cannot be a file name under the output")


def _nonempty(blocks: Iterable) -> Iterator[dict[str, np.ndarray]]:
    """The blocks that hold rows, as numpy batches. When every key of a container is already
    done, an empty block without columns reaches the write stage."""
    from ray.data.block import BlockAccessor
    for block in blocks:
        acc = BlockAccessor.for_block(block)
        if acc.num_rows():
            yield acc.to_batch_format("numpy")


class _PngSink(Datasink):
    """Writes ``<output>/<key>.png`` (and overlays) from the write tasks; returns only counts
    and the failed keys."""

    def __init__(self, output: str, *, overlays: bool, max_pixels: int | None,
                 storage_options: dict | None):
        self.output = output
        self.overlays = overlays
        self.max_pixels = max_pixels
        self.storage_options = storage_options
        self.results: list[dict] = []

    def get_name(self) -> str:
        return "WriteSaliencyMaps"

    def _put(self, fs, path: str, data: bytes) -> None:
        if not is_local(fs):
            fs.pipe_file(path, data)  # one PUT: the object appears complete or not at all
            return
        folder, name = posixpath.split(path)
        fs.makedirs(folder, exist_ok=True)
        tmp = f"{folder}/.{name}.tmp-{uuid.uuid4().hex[:8]}"
        fs.pipe_file(tmp, data)
        fs.mv(tmp, path)

    def write(self, blocks: Iterable, ctx) -> dict:
        fs, root = url_to_fs(self.output, self.storage_options)
        root = root.rstrip("/")
        images = 0
        failed: list[dict] = []
        for batch in _nonempty(blocks):
            for i in range(len(batch["key"])):
                key, source = str(batch["key"][i]), str(batch["source"][i])
                error = str(batch["error"][i])
                if not error:
                    try:
                        _check_key(key)
                        level = render_map(batch["saliency"][i], int(batch["width"][i]),
                                           int(batch["height"][i]))
                        if self.overlays:  # first: the PNG marks the key done
                            self._put(fs, f"{root}/{OVERLAY_DIR}/{key}.jpg",
                                      overlay_jpeg(batch["data"][i], level,
                                                   max_pixels=self.max_pixels))
                        self._put(fs, f"{root}/{key}.png", to_png_bytes(level))
                        images += 1
                        continue
                    except Exception as exc:
                        error = f"cannot write map: {type(exc).__name__}: {exc}"[:500]
                failed.append({"key": key, "source": source, "error": error})
        return {"images": images, "failed": failed}

    def on_write_complete(self, write_result) -> None:
        self.results = [r for r in write_result.write_returns if r]


class _TableSink(PartsSink):
    """The shared parquet parts writer (atomic parts, empty blocks skipped),
    under its own name in Ray Data's progress."""

    def get_name(self) -> str:
        return "WriteSaliencyTable"


def render_table(batch: dict[str, np.ndarray]) -> pa.Table:
    """Parquet output: the actor's batch → rows of :data:`SEGMENT_SCHEMA` (Ray Data UDF)."""
    cols: dict[str, list] = {name: [] for name in SEGMENT_SCHEMA.names}
    for i in range(len(batch["key"])):
        width, height = int(batch["width"][i]), int(batch["height"][i])
        error = str(batch["error"][i]) or None
        png = None
        if error is None:
            try:
                png = to_png_bytes(render_map(batch["saliency"][i], width, height))
            except Exception as exc:
                error = f"cannot render map: {type(exc).__name__}: {exc}"[:500]
        cols["key"].append(str(batch["key"][i]))
        cols["source"].append(str(batch["source"][i]))
        cols["width"].append(width if width >= 0 else None)
        cols["height"].append(height if height >= 0 else None)
        cols["png"].append(png)
        cols["error"].append(error)
    return pa.Table.from_pydict(cols, schema=SEGMENT_SCHEMA)


# ---------------------------------------------------------------------------------------------
# Output bookkeeping (driver)

def _existing_maps(fs, root: str) -> set[str]:
    """Keys of the maps already at ``root`` (``<key>.png``, overlays and hidden files aside);
    removes temporary files a killed run left behind."""
    root = root.rstrip("/")
    fs.invalidate_cache(root)  # s3fs caches listings
    try:
        paths = fs.find(root)
    except FileNotFoundError:
        return set()
    done: set[str] = set()
    for path in paths:
        if not path.startswith(root + "/"):
            continue
        rel = path[len(root) + 1:]
        base = posixpath.basename(rel)
        if base.startswith(".") and ".tmp-" in base:
            fs.rm(path)
            continue
        if rel.startswith(f"{OVERLAY_DIR}/") or not rel.endswith(".png") or base.startswith("."):
            continue
        done.add(rel[:-len(".png")])
    return done


def _fingerprint(meta: dict) -> str:
    """Identity of a model artifact (its model.json: backbone, sizes, training summary)."""
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Entry point

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
    import ray

    # The model stack, for the driver's checks only: the module's tasks (decode, write) run
    # in worker processes that do not import it.
    from selfment_dist.model.artifact import load_artifact
    from selfment_dist.model.segmenter import resolve_image_size

    start = time.perf_counter()
    s = build_settings(SegmentSettings, args, options)  # types, ranges, overlays need png
    model, inputs, output, storage_options = s.model, s.inputs, s.output, s.storage_options
    image_size = s.image_size  # None: resolved from the model below
    # Fail in the driver, not in every actor: a missing artifact or a bad size.
    _, meta = load_artifact(model, storage_options=storage_options)
    try:
        image_size = resolve_image_size(meta, image_size)
    except ValueError as exc:
        raise ValueError(f"model artifact {model}: {exc}") from None
    fs, root, units = list_inputs(inputs, output, storage_options, allow_empty=s.allow_empty)
    root = root.rstrip("/")
    ensure_ray(s.address)
    plan = plan_resources(s.num_actors, s.num_gpus_per_actor,
                          allow_cpu_fallback=s.cpu_fallback, image_size=image_size,
                          require_gpu=s.require_gpu, batch_size=s.batch_size, stage="segment")
    check_model_workers(s.model_workers, plan, "segment")
    run_id = uuid.uuid4().hex[:12]
    config = {"model": str(model), "model_fingerprint": _fingerprint(meta),
              "backbone": meta.get("backbone"), "weights": meta.get("weights"),
              "trained_image_size": meta.get("image_size"), "image_size": image_size,
              "output_format": s.output_format, "overlays": bool(s.overlays),
              "batch_size": int(s.batch_size), "max_pixels": s.max_pixels,
              "max_bytes": s.max_bytes,
              "num_actors": plan["actors"], "num_gpus_per_actor": plan["num_gpus"]}
    logger.info("segment run %s: %s -> %s, config %s", run_id, inputs, output, config)

    # Output: register this run in the manifest (which fences the parquet writes of an
    # unfinished earlier run, see _parts), then read what is already there (resume).
    fs.makedirs(root, exist_ok=True)
    fs.invalidate_cache(root)
    manifest_path = f"{root}/{MANIFEST_NAME}"
    previous = read_manifest(fs, root, MANIFEST_NAME)
    check_lease(previous, output, run_id)
    written_before = has_parts(fs, root) if s.output_format == "parquet" \
        else bool(_existing_maps(fs, root))
    check_resume(previous if written_before else None, config, output, keys=_RESUME_KEYS,
                 holds="saliency maps", same="the same model and settings")
    manifest = {"format": "selfment-segment", "format_version": 1, "status": "running",
                "config": config, "inputs": inputs, "settings": s.record(),
                "versions": versions(),
                "runs": (previous or {}).get("runs", []), "lease": new_lease(run_id)}
    _entry, unfinished = register_run(manifest, run_id)
    write_manifest(fs, root, manifest, MANIFEST_NAME)
    confirm_lease(fs, root, MANIFEST_NAME, run_id, output)
    lease = Lease(fs, root, MANIFEST_NAME, run_id).start()

    def failed(status: str, reason: str):
        def change(m: dict) -> None:
            run_entry(m, run_id).update(status=status, finished=now(), reason=reason[:500])
            if m.get("lease", {}).get("run_id") == run_id:
                m["status"] = "failed"
                m["lease"]["released"] = now()
        return change

    try:
        summary, failed_rows = _segment(
            ray, fs, root, units, unfinished, run_id=run_id, output=output, model=model,
            image_size=image_size, batch_size=s.batch_size, output_format=s.output_format,
            overlays=s.overlays, rows_per_file=s.rows_per_file or _ROWS_PER_FILE,
            storage_options=storage_options, plan=plan,
            max_pixels=s.max_pixels, max_bytes=s.max_bytes, progress=s.progress, lease=lease,
            actor_wait_s=s.actor_wait_s, model_workers=s.model_workers)
    except BaseException as exc:
        lease.stop()
        try:
            lease.update(failed("fenced" if isinstance(exc, FencedError) else "failed",
                                f"{type(exc).__name__}: {exc}"), always=True)
        except Exception as record_exc:
            logger.error("could not record the failure of run %s: %s", run_id, record_exc)
        raise
    lease.stop()
    wall = time.perf_counter() - start
    images = summary["images"]
    summary = {"output": output, "manifest": to_uri(fs, manifest_path), "run_id": run_id,
               "output_format": s.output_format, "image_size": image_size,
               "plan": plan.record(), **summary}
    summary.update(wall_s=round(wall, 3),
                   images_per_s=round(images / wall, 3) if wall else 0.0,
                   error_examples=[f"{f['key']}: {f['error']}" for f in failed_rows[:10]])
    for f in failed_rows:
        logger.debug("failed: %s (%s): %s", f["key"], f["source"], f["error"])

    def finish(m: dict) -> None:
        run_entry(m, run_id).update(status="complete", finished=now(), images=images,
                                    errors=len(failed_rows), skipped=summary["skipped"],
                                    rows_per_node=summary["rows_per_node"],
                                    wall_s=summary["wall_s"],
                                    images_per_s=summary["images_per_s"])
        m.update(status="complete",
                 counts={k: summary[k] for k in ("images", "errors", "skipped", "maps_total",
                                                 "rows_total", "errors_total")
                         if k in summary},
                 errors=failed_rows)
        m["lease"]["released"] = now()

    lease.update(finish)
    if lease.lost_to:
        err = FencedError(f"run {run_id} lost {output} to run {lease.lost_to} before it could "
                          "finish; re-run to complete the output")
        lease.update(failed("fenced", str(err)), always=True)
        raise err
    log = logger.warning if failed_rows else logger.info
    log("segment run %s done: %d maps, %d failed (listed in %s), %d already present; "
        "%.1fs, %.2f images/s", run_id, images, len(failed_rows), summary["manifest"],
        summary["skipped"], wall, summary["images_per_s"])
    return summary


def _segment(ray, fs, root: str, units: list[dict], unfinished: list[str], *, run_id: str,
             output: str, model: str, image_size: int, batch_size: int, output_format: str,
             overlays: bool, rows_per_file: int, storage_options, plan: dict, max_pixels,
             max_bytes, progress: bool, lease: Lease, actor_wait_s: float | None,
             model_workers: str = "actors") -> tuple[dict, list[dict]]:
    """The run proper, once this run holds the output. Returns the counts and failed rows."""
    if output_format != "png":  # a PNG map rewritten by two runs is the same file
        await_leftover_writers(unfinished, output)
    done = _existing_maps(fs, root) if output_format == "png" else existing_keys(fs, root)

    n_units = len(units)
    units, containers, done = units_left(units, done, storage_options)
    skip_ref = [ray.put(done.keys)] if (done and containers) else None
    if done:
        logger.info("resuming: %d maps already in %s; %d of %d work units left", len(done),
                    output, len(units), n_units)

    images, failed, per_node, counts = 0, [], {}, {}
    if units:
        counters = start_counters(run_id)
        try:
            n_blocks = max(1, min(len(units), len(containers) + math.ceil(
                (len(units) - len(containers)) / batch_size)))
            # Retry limits travel as plain Ray remote args (as in pseudo_label: Ray 2.60
            # deprecates ``**ray_remote_args`` but has no named parameters for them yet). The
            # dataset copies the DataContext when created: the bounded actor wait must be set
            # by then.
            with warnings.catch_warnings(), bounded_actor_start(plan, actor_wait_s, "segment"):
                warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
                ds = ray.data.from_items(units, override_num_blocks=n_blocks)
                ds = ds.map_batches(
                    read_and_decode, batch_size=None, zero_copy_batch=True,
                    fn_kwargs={"image_size": image_size, "max_pixels": max_pixels,
                               "max_bytes": max_bytes,
                               "storage_options": storage_options, "skip_ref": skip_ref,
                               "rows_per_batch": batch_size, "keep_data": overlays},
                    num_cpus=LIGHT_TASK_CPUS, compute=decode_pool(plan),
                    max_retries=MAX_RETRIES)
                ds = ds.map_batches(
                    batch_size=batch_size, batch_format="numpy", udf_modifying_row_count=False,
                    **model_stage_args(SegmentActor, {
                        "model": model, "image_size": image_size,
                        "storage_options": storage_options, "device": plan["device"],
                        "cpu_threads": plan["cpu_threads"], "require_gpu": plan["require_gpu"],
                        "counters": counters}, plan, model_workers))
                if output_format == "parquet":
                    ds = ds.map_batches(render_table, batch_format="numpy",
                                        udf_modifying_row_count=False, num_cpus=LIGHT_TASK_CPUS,
                                        max_retries=MAX_RETRIES)
                    sink = _TableSink(output, SEGMENT_SCHEMA, run_id, rows_per_file,
                                      storage_options, manifest=MANIFEST_NAME)
                else:
                    sink = _PngSink(output, overlays=overlays, max_pixels=max_pixels,
                                    storage_options=storage_options)
            with progress_bars(progress), warnings.catch_warnings(), \
                    bounded_actor_start(plan, actor_wait_s, "segment", probe=False):
                warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
                ds.write_datasink(sink, ray_remote_args={"max_retries": MAX_RETRIES,
                                                       "num_cpus": LIGHT_TASK_CPUS})
            if getattr(sink, "fenced", None):
                raise FencedError(f"run {run_id}: {len(sink.fenced)} parts were not published "
                                  f"because run {lease.lost_to or 'another run'} took over "
                                  f"{output}; re-run to complete the output")
            per_node, counts = split_counters(read_counters(counters))
        finally:
            stop_counters(counters)
        if output_format == "png":
            images = sum(r["images"] for r in sink.results)
            failed = [f for r in sink.results for f in r["failed"]]
        else:
            images = sum(r["rows"] - r["errors"] for r in sink.results)
            failed = _failed_rows(fs, root, run_id)
            tmp = f"{root.rstrip('/')}/{TMP_DIR}"
            if is_local(fs) and fs.exists(tmp):  # parts are renamed out of it: empty now
                fs.rm(tmp, recursive=True)
    if lease.lost_to:
        raise FencedError(f"run {run_id} lost {output} to run {lease.lost_to}")
    failed.sort(key=lambda f: f["key"])
    summary = {"images": images, "errors": len(failed), "skipped": len(done),
               "rows_per_node": per_node,
               "replicas_started": counts.get("replicas_started", 0)}
    if output_format == "png":
        summary["maps_total"] = len(done) + images
    else:
        totals = count_parts(fs, root)
        summary.update(rows_total=totals["rows"], errors_total=totals["errors"])
    return summary, failed


def _failed_rows(fs, root: str, run_id: str) -> list[dict]:
    """The error rows of this run's parquet parts (``key``/``source``/``error`` columns only)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    failed: list[dict] = []
    for path in sorted(fs.glob(f"{root}/part-{run_id}-*.parquet")):
        with fs.open(path, "rb") as f:
            table = pq.read_table(f, columns=["key", "source", "error"])
        failed.extend(table.filter(pc.is_valid(table.column("error"))).to_pylist())
    return failed
