"""``selfment evaluate --instances``: two COCO files in, metrics.json and metrics.md out."""
from __future__ import annotations

import logging

from selfment_dist.evaluation.instances import (evaluate_instances, load_coco_json,
                                                write_instance_reports)
from selfment_dist.errors import UserValueError
from selfment_dist.settings import EvaluateSettings

logger = logging.getLogger(__name__)

__all__ = ["run_instance_evaluation"]


def run_instance_evaluation(s: EvaluateSettings) -> dict:
    """Class-agnostic AP/AR (pycocotools) of ``s.predictions`` against ``s.ground_truth``,
    written under ``s.output``; returns the metrics.json document (plus ``config``)."""
    predictions = load_coco_json(s.predictions, s.storage_options)
    ground_truth = load_coco_json(s.ground_truth, s.storage_options)
    try:
        metrics = evaluate_instances(predictions, ground_truth, match_images=s.match_images)
    except UserValueError as exc:  # it has the documents, not their paths: name the files
        raise UserValueError(f"{exc} (predictions {s.predictions}, ground truth "
                             f"{s.ground_truth})") from None
    metrics.update(config=s.record(), predictions=s.predictions, ground_truth=s.ground_truth)
    doc = write_instance_reports(s.output, metrics, storage_options=s.storage_options)
    logger.info("evaluate --instances: segm AP %s, AP50 %s (%s)", doc["segm"]["AP"],
                doc["segm"]["AP50"], doc["files"]["metrics.md"])
    return doc
