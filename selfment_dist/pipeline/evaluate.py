"""Evaluate saliency maps against ground-truth masks, fanned out over Ray tasks.

Two modes of :func:`run_evaluate`:

- ``predictions`` + ``masks``: two folders (local or fsspec URL) of 8-bit images matched by key,
  the path relative to the folder without its extension (``sub/dir/name``).
- ``model`` + ``benchmarks`` (``{NAME: (images_uri, masks_uri)}``): each benchmark is segmented by
  :func:`selfment_dist.pipeline.segment.run_segment` into ``<output>/predictions/<NAME>`` and then
  evaluated like the first mode. :data:`STANDARD_BENCHMARKS` lists the usual test sets' layouts.

The matched pairs are cut into shards; a Ray task per shard reads its files through fsspec and
returns one :func:`selfment_dist.evaluation.metrics.image_record` per image; the driver takes the shards in
key order (a few in flight per CPU) and folds each record into running sums as it arrives
(:mod:`._eval_merge`: about 200 bytes per image stay, for the 1-D means and the per-image CSV,
instead of the ~12 KB record), so scores do not depend on the sharding and are bit for bit those
of :func:`selfment_dist.evaluation.metrics.merge_records`, and writes the reports
(:mod:`selfment_dist.evaluation.reports`). Problems never stop a run: an empty folder (one that
exists but holds no image), predictions without a mask, masks without a prediction, duplicate
keys, unreadable files and size mismatches (resized as the official runner does: the mask to the
prediction; still scored) are counted, logged and listed in ``metrics.json``.

Mistakes in the inputs' paths are errors instead, raised by :func:`run_evaluate` before Ray
starts (and before any benchmark is segmented): a ``predictions`` or ``masks`` folder, or a
benchmark's masks folder, that does not exist (:class:`~selfment_dist.errors.UserInputNotFoundError`)
or is a file (:class:`~selfment_dist.errors.UserValueError`). On an object store a prefix with
objects under it is a folder, and one with none is missing.
"""
from __future__ import annotations

import importlib
import io
import json
import logging
import math
import posixpath
import re
from collections import deque
from typing import Any, Iterator

import numpy as np
import ray
from PIL import Image

from selfment_dist.errors import UserInputNotFoundError, UserValueError
from selfment_dist.io.skip_rules import skipped_part
from selfment_dist.io.output_access import prepare_output
from selfment_dist.io.storage import join, url_to_fs
from selfment_dist.evaluation.metrics import SCORE_KEYS, image_record
from selfment_dist.evaluation.reports import STANDARD_BENCHMARKS, DatasetEvaluation, write_reports
from selfment_dist.pipeline._internal.instances import run_instance_evaluation
from selfment_dist.settings import EvaluateSettings, build_settings
from selfment_dist.pipeline._internal.eval_merge import RecordStream
from selfment_dist.pipeline._internal.ray_runtime import ensure_ray
from selfment_dist.versions import versions

logger = logging.getLogger(__name__)
_BYTESIO = re.compile(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>")

__all__ = ["STANDARD_BENCHMARKS", "IMAGE_EXTENSIONS", "PROBLEM_KINDS", "list_images",
           "score_shard", "evaluate_folders", "run_evaluate"]

#: File extensions taken as images when listing a folder (case-insensitive).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
#: Every problem kind, always present (0 or more) in ``problems["counts"]``.
PROBLEM_KINDS = ("missing_mask", "missing_prediction", "size_mismatch", "unreadable_prediction",
                 "unreadable_mask", "duplicate_key", "empty_folder", "failed")
_EXT_RANK = {ext: i for i, ext in enumerate(IMAGE_EXTENSIONS)}
MAX_EXAMPLES = 20  # examples kept per problem kind
_SHARD_TARGET = 128  # images per shard once there are enough shards to fill the cluster


class _Problems:
    """Counts and a few examples per problem kind."""

    def __init__(self) -> None:
        self.counts = dict.fromkeys(PROBLEM_KINDS, 0)
        self.examples: dict[str, list[str]] = {k: [] for k in PROBLEM_KINDS}

    def add(self, kind: str, example: str) -> None:
        self.counts[kind] += 1
        if len(self.examples[kind]) < MAX_EXAMPLES:
            self.examples[kind].append(example)

    def log(self, name: str) -> None:
        for kind in PROBLEM_KINDS:
            if self.counts[kind]:
                logger.warning("%s: %d %s, e.g. %s", name, self.counts[kind], kind,
                               "; ".join(self.examples[kind][:3]))

    def to_json(self) -> dict:
        return {"counts": dict(self.counts),
                "examples": {k: v for k, v in self.examples.items() if v}}


def list_images(uri: str, storage_options: dict | None = None
                ) -> tuple[dict[str, str], list[str]]:
    """Image files under a folder, by key.

    Keys are paths relative to ``uri`` without the extension, ``/``-separated. Skipped: files
    whose extension is not in :data:`IMAGE_EXTENSIONS` and names the inputs' rule skips
    (:mod:`selfment_dist.io.skip_rules`: hidden ``.*`` names, ``__MACOSX`` archive litter,
    ``_overlays`` of the segment stage); ``_selects/`` is kept. A missing folder lists as empty.

    Returns:
        ``({key: path inside the filesystem}, duplicates)`` where ``duplicates`` describes keys
        held by several files (the one whose extension comes first in :data:`IMAGE_EXTENSIONS`,
        PNG, is kept).
    """
    fs, root = url_to_fs(uri, storage_options)
    root = root.rstrip("/")
    fs.invalidate_cache(root)  # listings may be cached from before another stage wrote here
    candidates: dict[str, list[str]] = {}
    for path in fs.find(root):
        if not path.startswith(root + "/"):
            continue
        rel = path[len(root) + 1:]
        if skipped_part(rel):  # the inputs' rule (io/skip_rules.py): _selects/ is kept
            continue
        key, ext = posixpath.splitext(rel)
        if ext.lower() in IMAGE_EXTENSIONS:
            candidates.setdefault(key, []).append(path)
    found: dict[str, str] = {}
    duplicates: list[str] = []
    for key in sorted(candidates):
        paths = sorted(candidates[key], key=lambda p: (_EXT_RANK[posixpath.splitext(p)[1].lower()], p))
        found[key] = paths[0]
        if len(paths) > 1:
            duplicates.append(f"{key}: {posixpath.basename(paths[0])} kept, "
                              + ", ".join(posixpath.basename(p) for p in paths[1:]) + " ignored")
    return found, duplicates


def _read_gray(fs, path: str) -> np.ndarray:
    """An image file as ``uint8 (H, W)`` (PIL ``convert("L")`` for any other mode)."""
    with Image.open(io.BytesIO(fs.cat_file(path))) as image:
        image.load()
        if image.mode != "L":
            image = image.convert("L")
        return np.array(image)


def _message(exc: BaseException, path: str = "") -> str:
    # PIL names the in-memory buffer it was given; name the file instead
    text = _BYTESIO.sub(repr(posixpath.basename(path)) if path else "the file", str(exc))
    return f"{type(exc).__name__}: {text}"[:300]


def score_shard(predictions: str, masks: str, items: list[tuple[str, str, str]],
                storage_options: dict | None = None, resize: str = "mask"
                ) -> list[tuple[str, dict | None, list]]:
    """Records of one shard (no Ray: the body of the Ray task).

    Args:
        predictions, masks: the folders' URIs (to rebuild their filesystems here).
        items: ``(key, prediction path, mask path)`` with paths inside those filesystems.
        resize: which one is resized when the sizes differ (:func:`image_record`).

    Returns:
        ``[(key, record or None, [(problem kind, message), ...])]``, one per item; a record is
        None when a file could not be read or scored.
    """
    pred_fs, _ = url_to_fs(predictions, storage_options)
    mask_fs, _ = url_to_fs(masks, storage_options)
    out = []
    for key, pred_path, mask_path in items:
        problems = []
        arrays = []
        for fs, path, kind in ((pred_fs, pred_path, "unreadable_prediction"),
                               (mask_fs, mask_path, "unreadable_mask")):
            try:
                arrays.append(_read_gray(fs, path))
            except Exception as exc:  # any decoding/storage error is a reported problem
                problems.append((kind, f"{key}: {_message(exc, path)}"))
        record = None
        if not problems:
            try:
                record = image_record(*arrays, resize=resize)
            except Exception as exc:
                problems.append(("failed", f"{key}: {_message(exc)}"))
        out.append((key, record, problems))
    return out


_score_shard_task = ray.remote(num_cpus=1)(score_shard)


def _num_shards(n: int, requested: int | None) -> int:
    if requested is not None:
        if requested < 1:
            raise ValueError(f"num_shards must be >= 1, got {requested}")
        return max(1, min(n, requested))
    cpus = int(ray.cluster_resources().get("CPU", 1)) or 1
    return max(1, min(n, max(2 * cpus, math.ceil(n / _SHARD_TARGET))))


def _shard_results(items: list[tuple[str, str, str]], predictions: str, masks: str, *,
                   name: str, storage_options: dict | None, num_shards: int | None,
                   resize: str = "mask") -> Iterator[list[tuple[str, dict | None, list]]]:
    """Run :func:`score_shard` as Ray tasks over contiguous shards of ``items``; yield each
    shard's results in shard order (so in the items' order). At most a few shards per CPU are in
    flight: finished results wait in the object store, not in the driver."""
    if not items:
        return
    n = _num_shards(len(items), num_shards)
    bounds = np.linspace(0, len(items), n + 1).round().astype(int)
    shards = [items[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])]
    window = max(4, 2 * int(ray.cluster_resources().get("CPU", 1)))
    logger.info("%s: scoring %d pairs in %d Ray tasks", name, len(items), n)
    in_flight: deque = deque()
    submitted, next_log = 0, 0.1
    for i, shard in enumerate(shards):
        while submitted < len(shards) and len(in_flight) < window:
            in_flight.append(_score_shard_task.remote(predictions, masks, shards[submitted],
                                                      storage_options, resize))
            submitted += 1
        ref = in_flight.popleft()
        try:
            yield ray.get(ref)
        except ray.exceptions.RayError as exc:  # the task itself died: report its keys
            message = _message(getattr(exc, "cause", None) or exc).splitlines()[0]
            yield [(key, None, [("failed", f"{key}: {message}")]) for key, _, _ in shard]
        del ref
        if (i + 1) / n >= next_log and i + 1 < n:
            logger.info("%s: %d/%d tasks done", name, i + 1, n)
            next_log = (i + 1) / n + 0.1


def evaluate_folders(predictions: str, masks: str, *, name: str = "default",
                     storage_options: dict | None = None, num_shards: int | None = None,
                     resize: str = "mask") -> DatasetEvaluation:
    """Score one dataset: list, match, fan out over Ray tasks, merge in sorted key order.

    ``resize``: when a prediction and its mask differ in size, ``"mask"`` resizes the mask to
    the prediction (the official runner), ``"prediction"`` the prediction to the mask.

    Ray must be initialised (see :func:`selfment_dist.pipeline._internal.ray_runtime.ensure_ray`).

    Returns:
        A :class:`selfment_dist.evaluation.reports.DatasetEvaluation` (scores None when no pair was scored).
    """
    problems = _Problems()
    preds, pred_dups = list_images(predictions, storage_options)
    gts, gt_dups = list_images(masks, storage_options)
    for folder, dups in (("predictions", pred_dups), ("masks", gt_dups)):
        for dup in dups:
            problems.add("duplicate_key", f"{folder}: {dup}")
    for folder, uri, found in (("predictions", predictions, preds), ("masks", masks, gts)):
        if not found:
            problems.add("empty_folder", f"{folder}: no images under {uri}")
    for key in sorted(preds.keys() - gts.keys()):
        problems.add("missing_mask", key)
    for key in sorted(gts.keys() - preds.keys()):
        problems.add("missing_prediction", key)

    items = [(k, preds[k], gts[k]) for k in sorted(preds.keys() & gts.keys())]
    # Records are merged as their shards arrive, in key order, and dropped (see _eval_merge).
    merged = RecordStream()
    for shard in _shard_results(items, predictions, masks, name=name,
                                storage_options=storage_options, num_shards=num_shards,
                                resize=resize):
        for key, record, issues in shard:
            for kind, message in issues:
                problems.add(kind, message)
            if record is None:
                continue
            if record["resized"]:
                (ph, pw), (h, w) = record["pred_shape"], record["mask_shape"]
                what = (f"mask {w}x{h} resized to the prediction's {pw}x{ph}" if resize == "mask"
                        else f"prediction {pw}x{ph} resized to the mask's {w}x{h}")
                problems.add("size_mismatch", f"{key}: {what}")
            merged.add(key, record)
    problems.log(name)
    if merged.n:
        scores, curves = merged.scores(), merged.curves()
        logger.info("%s: %d images, %s", name, merged.n,
                    ", ".join(f"{k}={scores[k]:.4f}" for k in SCORE_KEYS))
    else:
        scores, curves = dict.fromkeys(SCORE_KEYS), None
        logger.error("%s: no image could be scored (predictions %s, masks %s)", name,
                     predictions, masks)
    return DatasetEvaluation(name=name, scores=scores, n_images=merged.n, curves=curves,
                             per_image=merged.per_image(), problems=problems.to_json(),
                             sources={"predictions": predictions, "masks": masks})


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _require_folder(uri: str, what: str, storage_options: dict | None) -> None:
    """``uri`` is a folder (on an object store: a prefix with objects under it), else one line:
    a missing input or a file where a folder of images is wanted is a typo, not a dataset
    problem (an existing folder without images is one: ``empty_folder``)."""
    fs, path = url_to_fs(uri, storage_options)
    path = path.rstrip("/") or path
    fs.invalidate_cache(path)  # listings may be cached from before another stage wrote here
    if fs.isdir(path):
        return
    if fs.exists(path):
        raise UserValueError(f"{what}: {uri} is a file, not a folder of images")
    raise UserInputNotFoundError(f"{what}: no such folder: {uri}")


def run_evaluate(settings: EvaluateSettings | None = None, /, **options: Any) -> dict:
    """Evaluate saliency maps and write the reports under ``settings.output``.

    Called as ``run_evaluate(settings)`` with an :class:`EvaluateSettings` (every option, its
    default and range is declared there), or in the keyword form ``run_evaluate(**options)``.
    Two modes: ``predictions`` + ``masks`` (folders of 8-bit PNGs matched by key: relative path
    without extension), or ``model`` + ``benchmarks`` (``{NAME: (images_uri, masks_uri)}``,
    each segmented with the model into ``output/predictions/<NAME>`` by ``run_segment`` with the
    settings' model-actor options, then evaluated).

    With ``instances``: class-agnostic instance AP/AR of two COCO files instead
    (:func:`selfment_dist.pipeline._internal.instances.run_instance_evaluation`).

    Returns:
        The metrics.json document: ``datasets`` → ``{NAME: {n_images, scores, problems,
        predictions, masks}}``, plus ``protocols``, ``config`` (the settings, without
        secrets), ``versions`` and ``files``.

    Raises:
        SettingsError: options that do not validate, or that mix or miss a mode.
        UserInputNotFoundError, UserValueError: a ``predictions``, ``masks`` or benchmark masks
            folder that does not exist or is a file (before Ray starts).
    """
    s = build_settings(EvaluateSettings, () if settings is None else (settings,), options)
    if not s.instances:  # a typo in an input path fails now, not as a report of empty folders
        if s.predictions is not None:
            _require_folder(s.predictions, "predictions (--predictions)", s.storage_options)
            _require_folder(s.masks, "masks (--masks)", s.storage_options)
        for bench, (_, masks_uri) in (s.benchmarks or {}).items():
            _require_folder(masks_uri, f"benchmark {bench}: masks", s.storage_options)
    # The reports are written last: an output that cannot take them fails now, in one line,
    # not after hours of segmenting.
    out_fs, out_root = url_to_fs(s.output, s.storage_options)
    prepare_output(out_fs, out_root, s.output, create_bucket=s.create_bucket)
    if s.instances:  # two COCO files, no Ray needed
        return run_instance_evaluation(s)
    output, storage_options, num_shards = s.output, s.storage_options, s.num_shards
    ensure_ray(s.address)
    datasets: list[DatasetEvaluation] = []
    if s.predictions is not None:
        datasets.append(evaluate_folders(s.predictions, s.masks, name=s.name,
                                         storage_options=storage_options, num_shards=num_shards,
                                         resize=s.resize))
    else:
        # The segment stage, looked up by name when this mode runs: stages do not import each
        # other (and the model stack is loaded only where it is needed).
        run_segment = importlib.import_module("selfment_dist.pipeline.segment").run_segment

        segment_options = {k: v for k, v in {
            "batch_size": s.batch_size, "num_actors": s.num_actors,
            "num_gpus_per_actor": s.num_gpus_per_actor, "actor_wait_s": s.actor_wait_s}.items()
            if v is not None}
        # The official runner's frame: images decoded as stored (no EXIF orientation, like
        # inference.py's Image.open), maps floored to 8 bits (unless the settings say otherwise).
        segment_options.update(cpu_fallback=s.cpu_fallback, model_workers=s.model_workers,
                               exif_orientation=s.exif_orientation, quantize=s.quantize,
                               require_gpu=s.require_gpu)
        for bench, (images_uri, masks_uri) in s.benchmarks.items():
            pred_uri = join(output, "predictions", bench)
            logger.info("%s: segmenting %s with %s into %s", bench, images_uri, s.model, pred_uri)
            summary = run_segment(s.model, [images_uri], pred_uri,
                                          image_size=s.image_size,
                                          storage_options=storage_options, **segment_options)
            dataset = evaluate_folders(pred_uri, masks_uri, name=bench,
                                       storage_options=storage_options, num_shards=num_shards,
                                       resize=s.resize)
            dataset.sources["images"] = images_uri
            dataset.sources["segment"] = _jsonable(summary)
            datasets.append(dataset)

    packages = ("selfment-dist", "pysodmetrics", "numpy", "ray")
    return write_reports(output, datasets, extra={"config": s.record(), "versions": versions(packages)},
                         storage_options=storage_options)
