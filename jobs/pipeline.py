"""Ray Jobs entrypoint: pseudo-label → train → segment → evaluate from one YAML config.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/pipeline.py --config jobs/configs/local.yaml

The config is the ``selfment`` command line's (top-level ``address``/``storage_options``, a
section per stage) plus a ``pipeline:`` section: ``output`` (the root of this run), optionally
``stages`` (a subset, run in pipeline order) and ``synthetic`` (make synthetic scenes first).
Each stage's outputs feed the next unless the config says otherwise (see ``_common.resolve``).

Under ``pipeline.output``, ``pipeline_summary.json`` is rewritten after every stage: the status,
each stage's options (storage options left out: they may hold credentials), its own summary and
wall time, and at the end the metrics. Re-running the same config skips every stage recorded
there as complete with the same options whose output is still complete (pseudo-label and segment
manifests say ``complete``, ``model.json``, ``metrics.json``) and that comes before any stage
that runs, so a failed run goes on where it stopped; ``--force`` runs every stage again (each
resumes on its own: pseudo-label and segment skip the images already done, train returns a
finished run).
"""
from __future__ import annotations

import json
import logging
import sys
import time
from datetime import datetime, timezone
from typing import Any, Mapping

from _common import (STAGES, load_config, missing_options, parse_args, pipeline_section,
                     print_summary, public, resolve, stage_function, write_synthetic)

from selfment_dist.artifact import META_NAME
from selfment_dist.io.storage import join, url_to_fs

logger = logging.getLogger("selfment_dist.jobs.pipeline")

SUMMARY_NAME = "pipeline_summary.json"


# ---------------------------------------------------------------------------------------------
# Is a stage's output complete? (its own marker, as the stage writes it)

def _marker(stage: str) -> tuple[str, bool]:
    """(file in the stage's output, whether its ``status`` must be ``complete``)."""
    if stage == "pseudo_label":
        from selfment_dist.pipeline.pseudo_label import MANIFEST_NAME
        return MANIFEST_NAME, True
    if stage == "segment":
        from selfment_dist.pipeline.segment import MANIFEST_NAME
        return MANIFEST_NAME, True
    if stage == "train":
        return META_NAME, False  # written last, once the model is saved
    return "metrics.json", False  # evaluate: written last by reports.write_reports


def output_complete(stage: str, options: Mapping[str, Any], storage_options: dict | None) -> bool:
    name, check_status = _marker(stage)
    document = _read_json(join(options["output"], name), storage_options)
    return document is not None and (not check_status or document.get("status") == "complete")


def _read_json(uri: str, storage_options: dict | None) -> dict | None:
    fs, path = url_to_fs(uri, storage_options)
    try:
        with fs.open(path, "rt", encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def _write_json(uri: str, document: dict, storage_options: dict | None) -> None:
    fs, path = url_to_fs(uri, storage_options)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, json.dumps(document, indent=2, default=str).encode())


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------
# The run

def check(config: Mapping[str, Any]) -> tuple[dict, dict]:
    """``(pipeline section, every stage's options)``, or ValueError naming what is missing."""
    section = pipeline_section(config)
    plan = resolve(config)
    if not section.get("output"):
        raise ValueError(f"pipeline.output is required (the root of the run and of {SUMMARY_NAME})")
    problems = [f"{stage} needs {', '.join(missing)}" for stage in section["stages"]
                if (missing := missing_options(stage, plan[stage]))]
    if problems:
        raise ValueError("; ".join(problems))
    return section, plan


def run_pipeline(config: Mapping[str, Any], *, config_uri: str = "", force: bool = False) -> dict:
    """Run the stages of ``config`` in order; returns what ``pipeline_summary.json`` holds.

    Raises:
        ValueError: from :func:`check`, before anything runs.
        Whatever a stage raises (after recording it as failed in the summary).
    """
    section, plan = check(config)
    root = section["output"]
    storage_options = config.get("storage_options")
    summary_uri = join(root, SUMMARY_NAME)
    previous = (_read_json(summary_uri, storage_options) or {}).get("stages") or {}
    start = time.perf_counter()
    summary: dict[str, Any] = {
        "status": "running", "config": config_uri, "output": root, "started": _now(),
        "stages_requested": section["stages"],
        "outputs": {stage: plan[stage].get("output") for stage in STAGES},
        # in pipeline order; stages not asked for keep their record from an earlier run
        "stages": {s: {"status": "pending"} if s in section["stages"] else previous[s]
                   for s in STAGES if s in section["stages"] or s in previous},
    }

    def save() -> None:
        _write_json(summary_uri, summary, storage_options)

    synthetic = write_synthetic(config)
    if synthetic is not None:
        summary["synthetic"] = synthetic
    save()
    upstream_ran = False  # once a stage runs, the ones after it read new outputs: run them too
    for stage in section["stages"]:
        options = plan[stage]
        record: dict[str, Any] = {"options": public(options)}
        summary["stages"][stage] = record
        before = previous.get(stage) or {}
        if (not force and not upstream_ran and before.get("status") in ("complete", "skipped")
                and before.get("options") == record["options"]
                and output_complete(stage, options, storage_options)):
            logger.info("%s: skipped, already complete at %s (same options; --force to rerun)",
                        stage, options["output"])
            record.update(status="skipped", summary=before.get("summary"))
            continue
        logger.info("%s: starting with %s", stage, record["options"])
        upstream_ran = True
        record["status"] = "running"
        save()
        t0 = time.perf_counter()
        try:
            result = stage_function(stage)(**options)
        except BaseException as exc:
            record.update(status="failed", error=f"{type(exc).__name__}: {exc}"[:2000],
                          wall_s=round(time.perf_counter() - t0, 1))
            summary.update(status="failed", failed_stage=stage, finished=_now(),
                           wall_s=round(time.perf_counter() - start, 1))
            save()
            raise
        record.update(status="complete", wall_s=round(time.perf_counter() - t0, 1),
                      summary=json.loads(json.dumps(result, default=str)))
        save()
        logger.info("%s: complete in %.1fs", stage, record["wall_s"])

    evaluation = (summary["stages"].get("evaluate") or {}).get("summary") or {}
    summary["metrics"] = {name: {"n_images": d.get("n_images"), "scores": d.get("scores")}
                          for name, d in (evaluation.get("datasets") or {}).items()}
    summary.update(status="complete", finished=_now(), wall_s=round(time.perf_counter() - start, 1))
    save()
    if summary["metrics"]:
        from selfment_dist.reports import DatasetEvaluation, scores_table

        table = scores_table([DatasetEvaluation(name=n, scores=m["scores"], n_images=m["n_images"])
                              for n, m in summary["metrics"].items()])
        logger.info("metrics (%s):\n%s", summary["outputs"]["evaluate"], table)
    logger.info("pipeline complete in %.1fs; summary at %s", summary["wall_s"], summary_uri)
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(
        "Ray Jobs entrypoint: pseudo-label -> train -> segment -> evaluate from one YAML config.",
        argv, extra=lambda p: p.add_argument(
            "--force", action="store_true",
            help="run every stage, even those recorded complete in pipeline_summary.json"))
    try:
        config = load_config(args.config, args.storage_options)
        check(config)
    except (ValueError, FileNotFoundError) as err:
        logger.error("%s: %s", args.config, err)
        return 2
    summary = run_pipeline(config, config_uri=args.config, force=args.force)
    print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
