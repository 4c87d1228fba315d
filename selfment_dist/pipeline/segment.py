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

from ..artifact import load_artifact
from ..io.images import decode_image
from ..io.sources import IMAGE, enumerate_units
from ..io.storage import is_local, to_uri, url_to_fs
from ..segmenter import resolve_image_size, to_png_bytes, to_uint8, upsample
from ..settings import OUTPUT_FORMATS, SegmentSettings, build_settings
# Shared with the pseudo-label pipeline (same reading, resources, parquet parts and resume).
from ._parts import (PartsSink, await_leftover_writers, check_resume, count_parts, existing_keys,
                     now, outside_output, read_manifest, register_run, versions, write_manifest)
from ._ray import (MAX_ACTOR_RESTARTS, MAX_RETRIES, MAX_TASK_RETRIES, ensure_ray, plan_resources,
                   progress_bars)
from .pseudo_label import read_and_decode

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
_RESUME_KEYS = ("model_fingerprint", "image_size", "output_format")


# ---------------------------------------------------------------------------------------------
# Stage 1: read + decode (stateless, CPU tasks)

# ---------------------------------------------------------------------------------------------
# Stage 2: backbone + head (one actor per model replica)

class SegmentActor:
    """Ray Data callable class: loads a :class:`~selfment_dist.segmenter.Segmenter` once, maps
    decoded batches to patch saliency.

    ``__call__`` keeps the batch's columns but ``image`` and adds ``saliency`` float32
    (n, h, w) (zeros on error rows). A batch that fails in the model is retried image by image,
    so only the failing image gets an ``error``.
    """

    def __init__(self, *, model: str, image_size: int, storage_options: dict | None,
                 device: str | None, cpu_threads: int | None):
        import torch

        from ..segmenter import Segmenter

        if cpu_threads:
            try:
                available = len(os.sched_getaffinity(0))
            except AttributeError:  # not Linux
                available = os.cpu_count() or 1
            torch.set_num_threads(max(1, min(int(cpu_threads), available)))
        self.segmenter = Segmenter.from_artifact(model, image_size=image_size, device=device,
                                                 storage_options=storage_options)
        logger.info("segment actor ready: %r, %d torch threads", self.segmenter,
                    torch.get_num_threads())

    def _saliency(self, images: np.ndarray) -> list[np.ndarray | str]:
        """Per image: float32 (h, w) saliency, or an error message."""
        try:
            return list(self.segmenter.saliency(images))
        except Exception as batch_exc:
            if len(images) == 1:
                return [f"segmentation failed: {type(batch_exc).__name__}: {batch_exc}"]
            logger.warning("batch of %d failed (%s); retrying image by image", len(images),
                           batch_exc)
            results: list[np.ndarray | str] = []
            for i in range(len(images)):
                results.extend(self._saliency(images[i:i + 1]))
            return results

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
    """Segment every image of ``settings.inputs`` with the model artifact ``settings.model``.

    Called as ``run_segment(settings)`` with a :class:`SegmentSettings` (every option, its
    default and range is declared there), or in the keyword form
    ``run_segment(model, inputs, output, **options)`` that builds one.

    Outputs under ``settings.output``: ``png``: ``<key>.png`` 8-bit maps at the original size
    (keys with ``/`` make subfolders), and with ``overlays`` ``_overlays/<key>.jpg``, the image
    with its foreground tinted; ``parquet``: ``part-*.parquet`` with :data:`SEGMENT_SCHEMA`. Both:
    ``_segment.json`` (config, settings without secrets, counts, failed inputs).

    Returns:
        summary: ``images`` (maps written by this run), ``errors`` (inputs that failed),
        ``skipped`` (already present), ``maps_total`` / ``rows_total``, ``wall_s``,
        ``images_per_s``, ``output``, ``manifest``, ``run_id``, ``image_size`` and
        ``error_examples`` (up to 10; all of them are in ``_segment.json``).
    Raises:
        SettingsError: options that do not validate (keyword form).
        ValueError: a model artifact that cannot serve ``image_size``.
    """
    import ray

    s = build_settings(SegmentSettings, args, options)
    model, inputs, output, storage_options = s.model, s.inputs, s.output, s.storage_options
    start = time.perf_counter()
    # Fail in the driver, not in every actor: a missing artifact or a bad size.
    _, meta = load_artifact(model, storage_options=storage_options)
    try:
        image_size = resolve_image_size(meta, s.image_size)
    except ValueError as exc:
        raise ValueError(f"model artifact {model}: {exc}") from None
    ensure_ray(s.address)
    plan = plan_resources(s.num_actors, s.num_gpus_per_actor)
    run_id = uuid.uuid4().hex[:12]
    config = {"model": str(model), "model_fingerprint": _fingerprint(meta),
              "backbone": meta.get("backbone"), "weights": meta.get("weights"),
              "trained_image_size": meta.get("image_size"), "image_size": image_size,
              "output_format": s.output_format, "overlays": bool(s.overlays),
              "batch_size": int(s.batch_size), "max_pixels": s.max_pixels,
              "num_actors": plan["actors"], "num_gpus_per_actor": plan["num_gpus"]}
    logger.info("segment run %s: %s -> %s, config %s", run_id, inputs, output, config)

    # Output: register this run in the manifest (which fences the parquet writes of an
    # unfinished earlier run, see _parts), then read what is already there (resume).
    fs, root = url_to_fs(output, storage_options)
    root = root.rstrip("/")
    fs.makedirs(root, exist_ok=True)
    manifest_path = f"{root}/{MANIFEST_NAME}"
    previous = read_manifest(fs, root, MANIFEST_NAME)
    check_resume(previous, config, output, keys=_RESUME_KEYS, holds="saliency maps",
                 same="the same model and settings")
    manifest = {"format": "selfment-segment", "format_version": 1, "status": "running",
                "config": config, "inputs": inputs, "settings": s.record(),
                "versions": versions(),
                "runs": (previous or {}).get("runs", [])}
    run_entry, unfinished = register_run(manifest, run_id)
    write_manifest(fs, root, manifest, MANIFEST_NAME)
    if s.output_format != "png":  # a PNG map rewritten by two runs is the same file
        await_leftover_writers(unfinished, output)
    done = _existing_maps(fs, root) if s.output_format == "png" else existing_keys(fs, root)

    units = outside_output(enumerate_units(inputs, storage_options), fs, root)
    n_units = len(units)
    units = [u for u in units if not (u["kind"] == IMAGE and u["key"] in done)]
    containers = [u for u in units if u["kind"] != IMAGE]
    if done:
        logger.info("resuming: %d maps already in %s; %d of %d work units left", len(done),
                    output, len(units), n_units)

    images, failed = 0, []
    if units:
        skip_ref = [ray.put(sorted(done))] if (done and containers) else None
        n_blocks = max(1, min(len(units), len(containers) + math.ceil(
            (len(units) - len(containers)) / s.batch_size)))
        ds = ray.data.from_items(units, override_num_blocks=n_blocks)
        # Retry limits travel as plain Ray remote args (as in pseudo_label: Ray 2.60 deprecates
        # ``**ray_remote_args`` but has no named parameters for them yet).
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
            ds = ds.map_batches(
                read_and_decode, batch_size=None, zero_copy_batch=True,
                fn_kwargs={"image_size": image_size, "max_pixels": s.max_pixels,
                           "storage_options": storage_options, "skip_ref": skip_ref,
                           "rows_per_batch": s.batch_size, "keep_data": s.overlays},
                num_cpus=1, max_retries=MAX_RETRIES)
            ds = ds.map_batches(
                SegmentActor, batch_size=s.batch_size, batch_format="numpy",
                udf_modifying_row_count=False,
                fn_constructor_kwargs={"model": model, "image_size": image_size,
                                       "storage_options": storage_options,
                                       "device": plan["device"],
                                       "cpu_threads": plan["cpu_threads"]},
                compute=ray.data.ActorPoolStrategy(size=plan["actors"]),
                num_cpus=plan["num_cpus"], num_gpus=plan["num_gpus"] or None,
                max_restarts=MAX_ACTOR_RESTARTS, max_task_retries=MAX_TASK_RETRIES)
            if s.output_format == "parquet":
                ds = ds.map_batches(render_table, batch_format="numpy",
                                    udf_modifying_row_count=False, num_cpus=1,
                                    max_retries=MAX_RETRIES)
                sink = _TableSink(output, SEGMENT_SCHEMA, run_id, _ROWS_PER_FILE,
                                  storage_options, manifest=MANIFEST_NAME)
            else:
                sink = _PngSink(output, overlays=s.overlays, max_pixels=s.max_pixels,
                                storage_options=storage_options)
        try:
            with progress_bars(s.progress), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
                ds.write_datasink(sink, ray_remote_args={"max_retries": MAX_RETRIES})
        except BaseException:
            run_entry.update(status="failed", finished=now())
            write_manifest(fs, root, manifest, MANIFEST_NAME)
            raise
        if s.output_format == "png":
            images = sum(r["images"] for r in sink.results)
            failed = [f for r in sink.results for f in r["failed"]]
        else:
            images = sum(r["rows"] - r["errors"] for r in sink.results)
            failed = _failed_rows(fs, root, run_id)
    failed.sort(key=lambda f: f["key"])

    wall = time.perf_counter() - start
    summary = {"output": output, "manifest": to_uri(fs, manifest_path), "run_id": run_id,
               "output_format": s.output_format, "image_size": image_size,
               "images": images, "errors": len(failed), "skipped": len(done)}
    if s.output_format == "png":
        summary["maps_total"] = len(done) + images
    else:
        totals = count_parts(fs, root)
        summary.update(rows_total=totals["rows"], errors_total=totals["errors"])
    summary.update(wall_s=round(wall, 3),
                   images_per_s=round(images / wall, 3) if wall else 0.0,
                   error_examples=[f"{f['key']}: {f['error']}" for f in failed[:10]])
    for f in failed:
        logger.debug("failed: %s (%s): %s", f["key"], f["source"], f["error"])
    run_entry.update(status="complete", finished=now(), images=images, errors=len(failed),
                     skipped=len(done), wall_s=summary["wall_s"],
                     images_per_s=summary["images_per_s"])
    manifest.update(status="complete",
                    counts={k: summary[k] for k in ("images", "errors", "skipped", "maps_total",
                                                    "rows_total", "errors_total")
                            if k in summary},
                    errors=failed)
    write_manifest(fs, root, manifest, MANIFEST_NAME)
    log = logger.warning if failed else logger.info
    log("segment run %s done: %d maps, %d failed (listed in %s), %d already present; "
        "%.1fs, %.2f images/s", run_id, images, len(failed), summary["manifest"], len(done),
        wall, summary["images_per_s"])
    return summary


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
