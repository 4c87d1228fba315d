"""Class-agnostic instance metrics of COCO predictions against COCO ground truth (pycocotools).

    metrics = evaluate_instances(predictions, ground_truth)       # two parsed COCO documents
    write_instance_reports("s3://b/report", metrics)              # metrics.json + metrics.md

pycocotools' ``COCOeval`` is the reference implementation; this module only prepares its
inputs and names its numbers:

- Class-agnostic: every category becomes one (id 1) and ``useCats`` is off, as CutLER scores
  its single "fg" category.
- ``predictions``: a COCO instance document (``selfment export-coco``'s files: annotations with
  ``score``), or a COCOeval results list (``image_id``, ``segmentation``, ``score``). An
  annotation without ``score`` counts as score 1.
- Images are paired by ``file_name`` (default) or by ``id``. By file name, a prediction image
  matches the ground-truth image whose ``file_name`` is a path ending of its own, on ``/``
  boundaries: ``s3://b/data/img/a.png`` (a pseudo-label source) matches ``img/a.png`` or
  ``a.png``. Prediction images that match nothing are left out and counted; ground-truth images
  without predictions count as misses (that is what AR measures).
- ``segm`` and ``bbox`` are both scored (boxes from the results' own ``bbox``, else from their
  masks). Numbers are fractions in [0, 1]; a metric COCOeval cannot compute (no ground truth
  in that area range) is None.

No Ray, no torch.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
from typing import Any

import numpy as np

from selfment_dist.errors import UserValueError
from selfment_dist.io.storage import join, read_file, url_to_fs

logger = logging.getLogger(__name__)

__all__ = ["METRIC_NAMES", "load_coco_json", "evaluate_instances", "write_instance_reports"]

#: COCOeval's ``stats``, in its order.
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs",
                "ARm", "ARl")
_IOU_TYPES = ("segm", "bbox")


def load_coco_json(uri: str, storage_options: dict | None = None) -> Any:
    """A COCO JSON file (local path or fsspec URL), parsed: an instance document (a JSON object
    with ``images`` or ``annotations``) or a COCOeval results list (a list of objects).

    Raises:
        UserInputNotFoundError: nothing at ``uri``.
        UserValueError: a folder, not JSON (a binary file, a syntax error) or JSON of another
            shape; the message names the file.
        UserPermissionError: a file this process may not read.
    """
    data = read_file(*url_to_fs(uri, storage_options), f"COCO JSON file {uri}")
    try:
        doc = json.loads(data)  # bytes: UTF-8/16/32 detected, a BOM allowed
    except UnicodeDecodeError:
        raise UserValueError(f"{uri} is not a COCO JSON file: not text (a binary file?)") \
            from None
    except json.JSONDecodeError as exc:
        raise UserValueError(f"{uri} is not a COCO JSON file: not JSON ({exc})") from None
    if isinstance(doc, dict) and ("images" in doc or "annotations" in doc):
        return doc
    if isinstance(doc, list) and all(isinstance(item, dict) for item in doc):
        return doc
    kind = ("an object without images or annotations" if isinstance(doc, dict)
            else "a list of non-objects" if isinstance(doc, list) else type(doc).__name__)
    raise UserValueError(f"{uri} is JSON but not COCO: {kind} (expected an instance document "
                         "with images and annotations, or a results list)")


def _suffixes(file_name: str) -> list[str]:
    """``a/b/c.png`` → ``["a/b/c.png", "b/c.png", "c.png"]`` (a URL's scheme dropped)."""
    parts = str(file_name).split("://", 1)[-1].strip("/").split("/")
    return ["/".join(parts[i:]) for i in range(len(parts))]


def _image_map(pred_images: list[dict], gt_images: list[dict], by: str) -> dict[int, int]:
    """prediction image id → ground-truth image id."""
    if by == "id":
        gt_ids = {int(im["id"]) for im in gt_images}
        return {int(im["id"]): int(im["id"]) for im in pred_images if int(im["id"]) in gt_ids}
    gt_by_name: dict[str, int] = {}
    for im in gt_images:
        name = str(im["file_name"]).split("://", 1)[-1].strip("/")
        if name in gt_by_name:
            raise UserValueError(f"ground truth lists file_name {name!r} twice: match images "
                                 "by id")
        gt_by_name[name] = int(im["id"])
    out = {}
    for im in pred_images:
        for suffix in _suffixes(im["file_name"]):
            if suffix in gt_by_name:
                out[int(im["id"])] = gt_by_name[suffix]
                break
    return out


def _objects(items: Any, what: str, fields: tuple[str, ...],
             int_fields: tuple[str, ...] = ()) -> list[dict]:
    """``items``, checked to be a list of objects that each have ``fields`` (``int_fields``
    among them as integers); else a :class:`UserValueError` that says where."""
    if not isinstance(items, list):
        raise UserValueError(f"{what} must be a list, not {type(items).__name__}")
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise UserValueError(f"{what}[{i}] must be an object, not {type(item).__name__}")
        missing = [f for f in fields if f not in item]
        if missing:
            raise UserValueError(f"{what}[{i}] has no {', '.join(missing)}")
        for f in int_fields:
            try:
                int(item[f])
            except (TypeError, ValueError):
                raise UserValueError(f"{what}[{i}].{f} must be an integer, not "
                                     f"{item[f]!r:.40}") from None
        if "segmentation" in fields and not isinstance(item["segmentation"], (list, dict)):
            raise UserValueError(f"{what}[{i}].segmentation must be polygons or an RLE")
    return items


def _check_ground_truth(gt: Any, match_images: str) -> None:
    """A ground truth :func:`_ground_truth` can take, else a :class:`UserValueError`."""
    if not isinstance(gt, dict) or "images" not in gt:
        raise UserValueError("ground truth must be a COCO instance document (a JSON object "
                             "with images and annotations)")
    names = ("file_name",) if match_images == "file_name" else ()
    images = _objects(gt["images"], "ground truth: images", ("id", "height", "width", *names),
                      ("id", "height", "width"))
    anns = _objects(gt.get("annotations", []), "ground truth: annotations",
                    ("image_id", "segmentation"), ("image_id",))
    ids = {int(im["id"]) for im in images}
    for i, ann in enumerate(anns):
        if int(ann["image_id"]) not in ids:
            raise UserValueError(f"ground truth: annotations[{i}] is of image_id "
                                 f"{ann['image_id']}, which its images do not list")


def _ground_truth(gt: dict):
    """A ``COCO`` object of ``gt`` with one category, ``iscrowd`` and ``area`` filled in."""
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    data = {"images": gt.get("images", []), "categories": [{"id": 1, "name": "fg"}],
            "annotations": []}
    sizes = {int(im["id"]): (int(im["height"]), int(im["width"])) for im in data["images"]}
    for i, ann in enumerate(gt.get("annotations", [])):
        ann = {**ann, "category_id": 1, "iscrowd": int(ann.get("iscrowd", 0)),
               "id": ann.get("id", i + 1)}
        if "area" not in ann:
            h, w = sizes[int(ann["image_id"])]
            seg = ann["segmentation"]
            rle = (mask_utils.merge(mask_utils.frPyObjects(seg, h, w)) if isinstance(seg, list)
                   else seg if isinstance(seg.get("counts"), str)
                   else mask_utils.frPyObjects(seg, h, w))
            ann["area"] = float(mask_utils.area(rle))
        data["annotations"].append(ann)
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    return coco


def _results(predictions: Any, gt: dict, match_images: str) -> tuple[list[dict], dict]:
    """COCOeval results (ground-truth image ids) and the matching counts."""
    if isinstance(predictions, list):  # a results list: its image ids are the ground truth's
        if match_images != "id":
            raise UserValueError("predictions are a results list (no images, no file names): "
                                 "match images by id")
        anns = _objects(predictions, "predictions", ("image_id", "segmentation"), ("image_id",))
        images = [{"id": a["image_id"]} for a in anns]
    elif isinstance(predictions, dict) and "annotations" in predictions:
        names = ("file_name",) if match_images == "file_name" else ()
        images = _objects(predictions.get("images", []), "predictions: images",
                          ("id", *names), ("id",))
        anns = _objects(predictions["annotations"], "predictions: annotations",
                        ("image_id", "segmentation"), ("image_id",))
    else:
        raise UserValueError("predictions must be a COCO instance document (a JSON object with "
                             "annotations) or a results list")
    mapping = _image_map(images, gt.get("images", []), match_images)
    results = [{"image_id": mapping[int(a["image_id"])], "category_id": 1,
                "segmentation": a["segmentation"], "score": float(a.get("score", 1.0)),
                **({"bbox": a["bbox"]} if "bbox" in a else {})}
               for a in anns if int(a["image_id"]) in mapping]
    pred_ids = {int(im["id"]) for im in images}
    counts = {"prediction_images": len(pred_ids), "matched_images": len(mapping),
              "unmatched_prediction_images": len(pred_ids - set(mapping)),
              "ground_truth_images": len(gt.get("images", [])),
              "ground_truth_instances": len(gt.get("annotations", [])),
              "predicted_instances": len(results)}
    return results, counts


def _score(coco_gt, results: list[dict], iou_type: str) -> tuple[dict, str]:
    """COCOeval's 12 numbers (None where it has none), and its printed summary."""
    from pycocotools.cocoeval import COCOeval

    if not results:  # loadRes cannot take an empty list; nothing found scores 0
        return {k: 0.0 for k in METRIC_NAMES}, "no predictions"
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        coco_dt = coco_gt.loadRes(copy.deepcopy(results))  # loadRes writes into them
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        ev.params.useCats = 0
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = np.asarray(ev.stats, dtype=float)
    return {k: (None if v < 0 else round(float(v), 6)) for k, v in zip(METRIC_NAMES, stats)}, \
        text.getvalue()


def evaluate_instances(predictions: Any, ground_truth: dict, *,
                       match_images: str = "file_name") -> dict:
    """Class-agnostic ``segm`` and ``bbox`` AP/AR of ``predictions`` against ``ground_truth``.

    Args:
        predictions: a parsed COCO instance document, or a COCOeval results list.
        ground_truth: a parsed COCO instance document (RLE or polygon segmentations).
        match_images: ``"file_name"`` or ``"id"`` (see the module's docstring).
    Returns:
        ``{"segm": {AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl}, "bbox":
        {...}, "counts": {...}, "summary": {"segm": COCOeval's printed table, "bbox": ...}}``.
    """
    _check_ground_truth(ground_truth, match_images)
    results, counts = _results(predictions, ground_truth, match_images)
    if counts["prediction_images"] and not counts["matched_images"]:
        raise UserValueError(f"no prediction image matches a ground-truth image by "
                             f"{match_images}")
    coco_gt = _ground_truth(ground_truth)
    out: dict[str, Any] = {"counts": counts, "summary": {}}
    for iou_type in _IOU_TYPES:
        out[iou_type], out["summary"][iou_type] = _score(coco_gt, results, iou_type)
    return out


def _markdown(metrics: dict) -> str:
    """The headline numbers as a Markdown table (percent, as COCO papers print them)."""
    names = ("AP", "AP50", "AP75", "AR1", "AR10", "AR100")
    lines = ["# Instance metrics (class-agnostic, pycocotools COCOeval)", "",
             "| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for iou_type in _IOU_TYPES:
        row = metrics[iou_type]
        cells = ["–" if row[n] is None else f"{100 * row[n]:.1f}" for n in names]
        lines.append(f"| {iou_type} | " + " | ".join(cells) + " |")
    c = metrics["counts"]
    lines += ["", f"{c['matched_images']} of {c['prediction_images']} prediction images matched "
              f"{c['ground_truth_images']} ground-truth images; {c['predicted_instances']} "
              f"predicted and {c['ground_truth_instances']} true instances."]
    return "\n".join(lines) + "\n"


def write_instance_reports(output: str, metrics: dict, *,
                           storage_options: dict | None = None) -> dict:
    """``metrics.json`` and ``metrics.md`` under ``output``; returns ``metrics`` with ``files``."""
    fs, root = url_to_fs(output, storage_options)
    root = root.rstrip("/")
    fs.makedirs(root, exist_ok=True)
    files = {"metrics.json": join(output, "metrics.json"), "metrics.md": join(output, "metrics.md")}
    doc = {**metrics, "files": files}
    with fs.open(f"{root}/metrics.json", "w") as f:
        json.dump(doc, f, indent=2)
    with fs.open(f"{root}/metrics.md", "w") as f:
        f.write(_markdown(metrics))
    return doc
