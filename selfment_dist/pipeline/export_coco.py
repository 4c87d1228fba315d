"""``selfment export-coco``: the ``objects`` of pseudo-labels as COCO instance JSON.

    run_export_coco(ExportCocoSettings(labels="s3://b/labels", output="s3://b/coco", merge=True))

Flow: the driver lists the label parts and reads their footers (row counts: each part's first
image id); one Ray task per part reads that part in small batches and writes its COCO shards,
``instances-<part>-<chunk>.json`` of at most ``shard_size`` images each, straight to
``output``; with ``merge`` the driver then streams the shards, one at a time, into
``instances.json``. Rows never gather in the driver, and a task holds one shard, so memory is
bounded by ``shard_size`` whatever the dataset's size.

Why Ray tasks per part: the work is the RLE encoding at the original image size (an upsampled
mask per object), CPU-bound and independent per part, so it spreads over the cluster's CPUs
and each part is read where it is encoded.

Ids are stable for a given label dataset: image id = 1 + the row's position in the parts
sorted by name; annotation id = (image id - 1) · ``MAX_OBJECTS`` + the object's position in its
cell + 1 (unique, and the same whatever ``min_object_confidence`` leaves out).

Which rows become what (format: :mod:`selfment_dist.io.coco`):

- a labelled row: an ``images`` entry and one annotation per kept object (none if it has none);
- an error row whose image size is known: an ``images`` entry without annotations;
- an error row without a size (the image could not be decoded): left out (a COCO image needs
  its size), counted as ``unsized_errors``.

``file_name`` is the row's ``source`` for an image file, ``<source>#<key>`` for an image inside
a parquet file or tar shard (the source alone names the container).
"""
from __future__ import annotations

import json
import logging
import time
from collections import deque
from typing import Any

import pyarrow.parquet as pq

from selfment_dist.errors import UserInputNotFoundError, UserValueError
from selfment_dist.io.schema import open_part
from selfment_dist.io.coco import CATEGORIES, INFO, coco_document, image_entry, object_annotations
from selfment_dist.io.sources import IMAGE, classify
from selfment_dist.io.output_access import prepare_output
from selfment_dist.io.storage import join, url_to_fs
from selfment_dist.settings import MAX_OBJECTS, ExportCocoSettings, build_settings

logger = logging.getLogger(__name__)

__all__ = ["run_export_coco", "export_part", "SHARD_PREFIX", "MERGED_NAME"]

SHARD_PREFIX = "instances-"
MERGED_NAME = "instances.json"
_COLUMNS = ["key", "source", "width", "height", "grid_h", "grid_w", "error", "objects"]
_READ_ROWS = 256  # rows per parquet read batch inside a task


def _file_name(source: str, key: str) -> str:
    return source if classify(source) == IMAGE else f"{source}#{key}"


class _Shard:
    """The images and annotations of the shard being filled."""

    def __init__(self) -> None:
        self.images: list[dict] = []
        self.annotations: list[dict] = []


def export_part(part: str, first_image_id: int, part_index: int, output: str, *,
                shard_size: int, min_confidence: float | None,
                storage_options: dict | None) -> dict:
    """Write the COCO shards of one label part (a Ray task; also callable directly).

    Args:
        part: the part's URI (local path or fsspec URL).
        first_image_id: the id of the part's first row.
        part_index: the part's position, in the shard names.
    Returns:
        ``files`` (shard names, in order), ``images``, ``annotations``, ``unsized_errors``.
    """
    in_fs, path = url_to_fs(part, storage_options)
    out_fs, out_root = url_to_fs(output, storage_options)
    counts = {"files": [], "images": 0, "annotations": 0, "unsized_errors": 0}
    shard = _Shard()

    def flush() -> None:
        name = f"{SHARD_PREFIX}{part_index:05d}-{len(counts['files']):04d}.json"
        with out_fs.open(f"{out_root.rstrip('/')}/{name}", "w") as f:
            json.dump(coco_document(shard.images, shard.annotations), f)
        counts["files"].append(name)
        counts["images"] += len(shard.images)
        counts["annotations"] += len(shard.annotations)
        shard.images, shard.annotations = [], []

    image_id = first_image_id
    with in_fs.open(path, "rb") as f:
        batches = pq.ParquetFile(f).iter_batches(batch_size=min(shard_size, _READ_ROWS),
                                                  columns=_COLUMNS)
        for batch in batches:
            for row in batch.to_pylist():
                _add_row(shard, row, image_id, min_confidence, counts)
                image_id += 1
                if len(shard.images) >= shard_size:
                    flush()
    if shard.images or not counts["files"]:
        flush()  # the last shard (an empty part still gets a valid, empty file)
    return counts


def _add_row(shard: _Shard, row: dict, image_id: int, min_confidence: float | None,
             counts: dict) -> None:
    width, height = row["width"], row["height"]
    if width is None or height is None:
        counts["unsized_errors"] += 1
        return
    shard.images.append(image_entry(image_id, _file_name(row["source"], row["key"]), width,
                                    height, row["key"]))
    if row["error"] is None and row["objects"]:
        shard.annotations += object_annotations(
            image_id, (image_id - 1) * MAX_OBJECTS + 1, row["objects"], row["grid_h"],
            row["grid_w"], width, height, min_confidence=min_confidence)


def _in_run_order(fs, root: str, parts: list[str]) -> list[str]:
    """``parts`` in the order their runs started (the manifest's ``runs``), then by task: a
    resumed run's parts come after the earlier ones, so an export after a resume keeps every
    earlier image's id. Parts of runs the manifest does not list come last, by name."""
    from selfment_dist.pipeline._internal.manifest import read_manifest
    from selfment_dist.pipeline._internal.parts import PART_RE

    runs = (read_manifest(fs, root) or {}).get("runs") or []
    rank = {str(r.get("run_id")): i for i, r in enumerate(runs) if isinstance(r, dict)}

    def order(path: str):
        match = PART_RE.match(path.rstrip("/").rsplit("/", 1)[-1])
        run = match["run"]
        return (rank.get(run, len(rank)), "" if run in rank else run, int(match["task"]))

    return sorted(parts, key=order)


def _parts_and_offsets(labels: str, storage_options: dict | None) -> list[tuple[str, int]]:
    """``[(part URI, first image id)]`` from the parts' footers, in run order
    (:func:`_in_run_order`); checks the ``objects`` column."""
    from selfment_dist.pipeline._internal.parts import list_parts

    fs, root = url_to_fs(labels, storage_options)
    root = root.rstrip("/")
    parts = _in_run_order(fs, root, list_parts(fs, root))
    if not parts:
        raise UserInputNotFoundError(f"no pseudo-label parts in {labels}")
    out, next_id = [], 1
    for path in parts:
        with fs.open(path, "rb") as f:
            pf = open_part(f, path)
            if "objects" not in pf.schema_arrow.names:
                raise UserValueError(f"{labels} has no objects column: pseudo-label it with "
                                     "--max-objects N (N > 1) to export instances")
            n = pf.metadata.num_rows
        out.append((join(labels, path.rstrip("/").rsplit("/", 1)[-1]), next_id))
        next_id += n
    return out


def _run_tasks(parts: list[tuple[str, int]], s: ExportCocoSettings) -> list[dict]:
    """One Ray task per part, a few per CPU in flight; results (small) in part order."""
    import ray

    from selfment_dist.pipeline._internal.ray_runtime import LIGHT_TASK_CPUS, MAX_RETRIES

    task = ray.remote(num_cpus=LIGHT_TASK_CPUS, max_retries=MAX_RETRIES)(export_part)
    window = max(4, 2 * int(ray.cluster_resources().get("CPU", 1)))
    results: list[dict] = []
    in_flight: deque = deque()
    todo = deque(enumerate(parts))
    while todo or in_flight:
        while todo and len(in_flight) < window:
            index, (part, first_id) = todo.popleft()
            in_flight.append(task.remote(part, first_id, index, s.output,
                                         shard_size=s.shard_size,
                                         min_confidence=s.min_object_confidence,
                                         storage_options=s.storage_options))
        results.append(ray.get(in_flight.popleft()))
    return results


def merge_shards(output: str, files: list[str], storage_options: dict | None) -> str:
    """Stream the shard files into ``instances.json``: the images of every shard, then the
    annotations of every shard, each shard read on its own (two reads per shard, no more than
    one shard in memory)."""
    fs, root = url_to_fs(output, storage_options)
    root = root.rstrip("/")

    def items(field: str):
        for name in files:
            with fs.open(f"{root}/{name}", "r") as f:
                yield from json.load(f)[field]

    with fs.open(f"{root}/{MERGED_NAME}", "w") as out:
        out.write('{"info": ' + json.dumps(INFO) + ', "licenses": [], "categories": '
                  + json.dumps(CATEGORIES))
        for field in ("images", "annotations"):
            out.write(f', "{field}": [')
            for i, item in enumerate(items(field)):
                out.write(("," if i else "") + json.dumps(item))
            out.write("]")
        out.write("}")
    return join(output, MERGED_NAME)


def _clear_old_shards(output: str, storage_options: dict | None, create_bucket: bool) -> None:
    """Shards of an earlier export (another shard size) would mix with this one's."""
    fs, root = url_to_fs(output, storage_options)
    root = root.rstrip("/")
    prepare_output(fs, root, output, create_bucket=create_bucket)  # or one line: why not
    fs.invalidate_cache(root)
    try:
        listed = fs.ls(root, detail=False)
    except FileNotFoundError:  # an object store has no empty folders: nothing there yet
        return
    old = [p for p in listed if p.rstrip("/").rsplit("/", 1)[-1].startswith(SHARD_PREFIX)
           or p.rstrip("/").endswith("/" + MERGED_NAME)]
    if old:
        fs.rm(old)


def run_export_coco(*args: ExportCocoSettings | str, **options: Any) -> dict:
    """COCO instance JSON of the ``objects`` of the pseudo-labels at ``labels``.

    Called as ``run_export_coco(settings)`` or ``run_export_coco(labels, output, **options)``.

    Returns:
        ``labels``, ``output``, ``files`` (shard URIs in id order), ``merged`` (URI or None),
        ``images``, ``annotations``, ``unsized_errors``, ``parts``, ``wall_s``.
    Raises:
        UserInputNotFoundError: no label parts at ``labels``.
        UserValueError: labels without an ``objects`` column.
        MissingBucketError, OutputNotWritableError: the output cannot be written.
    """
    from selfment_dist.pipeline._internal.ray_runtime import ensure_ray

    start = time.perf_counter()
    s = build_settings(ExportCocoSettings, args, options)
    parts = _parts_and_offsets(s.labels, s.storage_options)
    _clear_old_shards(s.output, s.storage_options, s.create_bucket)
    ensure_ray(s.address)
    results = _run_tasks(parts, s)
    files = [name for r in results for name in r["files"]]
    merged = merge_shards(s.output, files, s.storage_options) if s.merge else None
    summary = {"labels": s.labels, "output": s.output,
               "files": [join(s.output, name) for name in files], "merged": merged,
               "images": sum(r["images"] for r in results),
               "annotations": sum(r["annotations"] for r in results),
               "unsized_errors": sum(r["unsized_errors"] for r in results),
               "parts": len(parts), "wall_s": round(time.perf_counter() - start, 3)}
    logger.info("export-coco: %d images, %d annotations in %d shards -> %s", summary["images"],
                summary["annotations"], len(files), s.output)
    return summary
