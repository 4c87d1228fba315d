"""The stage chain: pseudo-label → train → segment → evaluate from one config, skipping finished stages.

    run_chain(load_config("jobs/configs/local.yaml"))   # = selfment run --config jobs/configs/local.yaml

What uses it: ``selfment run``, ``selfment demo`` (:mod:`.demo`), ``jobs/pipeline.py``, and, for
one stage's settings out of a config, every ``selfment <stage> --config`` and ``jobs/<stage>.py``.

The config is the command line's (:mod:`selfment_dist.config`): top-level ``address`` and
``storage_options``, a section per stage, and a ``pipeline:`` section
(:class:`~selfment_dist.settings.ChainSettings`: the run's root ``output``, ``stages``,
``synthetic``, ``force``). What a stage's section leaves out is wired from the other stages
(:func:`stage_values`): each stage's output feeds the next.

Under ``pipeline.output``, ``pipeline_summary.json`` is rewritten after every stage: the status,
each stage's settings (as :meth:`Settings.record` serialises them: secrets left out), its own
summary and wall time, and at the end the metrics. A stage is skipped when it is recorded there
as complete with the same settings, its output is still complete (pseudo-label and segment
manifests say ``complete``, ``model.json``, ``metrics.json``), and no stage before it ran; so a
failed run goes on where it stopped. ``force`` runs every stage again (each resumes on its own).
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
from datetime import datetime, timezone
from typing import Any, Callable, ContextManager, Mapping

from selfment_dist.config import values_for
from selfment_dist.data.synthetic_sets import synthetic_layout, write_synthetic_sets
from selfment_dist.io.output_access import prepare_output
from selfment_dist.io.storage import join, read_json, url_to_fs
from selfment_dist.settings import (STAGE_SETTINGS, ChainSettings, SettingsError, StageSettings,
                                    SyntheticSettings, validate)
from selfment_dist.stages import CHAIN, CHAIN_SUMMARY_NAME

logger = logging.getLogger(__name__)

__all__ = ["STAGES", "SUMMARY_NAME", "run_chain", "plan", "chain_settings", "stage_values",
           "stage_settings", "stage_function", "write_synthetic", "output_complete"]

#: Stage name (config section) → its pipeline function ("module:function"), in pipeline order
#: (from the stage registry, :mod:`selfment_dist.stages`).
STAGES: dict[str, str] = {name: stage.run_ref for name, stage in CHAIN.items()}
SUMMARY_NAME = CHAIN_SUMMARY_NAME
#: Each stage's output folder under ``pipeline.output``.
FOLDERS: dict[str, str] = {name: stage.folder for name, stage in CHAIN.items()}
#: Paths that differ from stage to stage: not top-level keys of a config with a pipeline section.
_PER_STAGE = ("inputs", "output", "labels", "model", "predictions", "masks")


def stage_function(stage: str) -> Callable[[StageSettings], dict]:
    """The pipeline function of ``stage`` (imported on first use); it takes the stage's settings."""
    return CHAIN[stage].run_function()


# ---------------------------------------------------------------------------------------------
# From a config to settings

def chain_settings(config: Mapping[str, Any]) -> ChainSettings:
    """The ``pipeline:`` section, validated; ``synthetic.root`` defaults to ``<output>/data``."""
    chain = validate(ChainSettings, values_for(config, ChainSettings, top_level=False),
                     "pipeline")
    if chain.synthetic is not None and chain.synthetic.root is None:
        if not chain.output:
            raise SettingsError(["pipeline.synthetic needs a root (or pipeline.output)"])
        chain.synthetic = chain.synthetic.model_copy(
            update={"root": join(chain.output, "data")})
    return chain


def stage_values(config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Every stage's values, with what the config leaves out wired from the other stages.

    Under ``pipeline.output`` (the root) the outputs default to ``labels/``, ``model/``,
    ``predictions/`` and ``report/``; ``train.labels`` to the pseudo-labels, ``segment.model`` to
    the trained model, ``evaluate.predictions`` to the saliency maps (or ``evaluate.model`` to the
    model in benchmark mode). With ``pipeline.synthetic``, pseudo-labels are made from its
    training images, and its held-out images are segmented and evaluated against their masks;
    without it, ``segment.inputs`` defaults to ``pseudo_label.inputs``. What the config sets
    always wins. Values are not validated here (see :func:`plan`).
    """
    chain = chain_settings(config)
    shared = sorted(k for k in _PER_STAGE if k in config)
    if shared and "pipeline" in config:  # every stage would read or write the same place
        raise SettingsError([f"{', '.join(shared)} at the top level would apply to every stage; "
                             "set them in the stages' sections (and the run's root as "
                             "pipeline.output)"])
    values = {stage: values_for(config, model) for stage, model in STAGE_SETTINGS.items()}
    pl, tr, sg, ev = (values[s] for s in STAGE_SETTINGS)
    if chain.output:
        for stage, folder in FOLDERS.items():
            values[stage].setdefault("output", join(chain.output, folder))
    if chain.synthetic is not None:
        data = synthetic_layout(chain.synthetic.root)
        pl.setdefault("inputs", [data["train_images"]])
        sg.setdefault("inputs", [data["eval_images"]])
        if not ev.get("benchmarks"):
            ev.setdefault("masks", data["eval_masks"])
            ev.setdefault("name", "synthetic")
    if "output" in pl:
        tr.setdefault("labels", pl["output"])
    if "output" in tr:
        sg.setdefault("model", tr["output"])
        if ev.get("benchmarks"):
            ev.setdefault("model", tr["output"])
    if "inputs" in pl:
        sg.setdefault("inputs", pl["inputs"])
    if "output" in sg and not ev.get("benchmarks") and "model" not in ev:
        ev.setdefault("predictions", sg["output"])
    return values


def stage_settings(config: Mapping[str, Any], stage: str) -> StageSettings:
    """One stage's settings out of ``config`` (wired as in the chain), validated."""
    return validate(STAGE_SETTINGS[stage], stage_values(config)[stage], stage)


def plan(config: Mapping[str, Any]) -> tuple[ChainSettings, dict[str, StageSettings]]:
    """The chain's settings and those of every stage it runs; every problem at once, before
    anything runs.

    Raises:
        SettingsError: one line per problem (a missing root, unknown keys, missing or bad values).
    """
    chain = chain_settings(config)
    values = stage_values(config)
    problems = [] if chain.output else [
        f"pipeline.output is required (the root of the run and of {SUMMARY_NAME})"]
    settings: dict[str, StageSettings] = {}
    for stage in chain.stages:
        try:
            settings[stage] = validate(STAGE_SETTINGS[stage], values[stage], stage)
        except SettingsError as exc:
            problems += exc.problems
    if problems:
        raise SettingsError(problems)
    return chain, settings


# ---------------------------------------------------------------------------------------------
# Is a stage's output complete? (its own marker, as the stage writes it)

def output_complete(stage: str, settings: StageSettings) -> bool:
    """Whether the stage's output holds its completion marker (the registry's ``marker``)."""
    entry = CHAIN[stage]
    document = _read_json(join(settings.output, entry.marker), settings.storage_options)
    return document is not None and (not entry.marker_status
                                     or document.get("status") == "complete")


def _read_json(uri: str, storage_options: dict | None) -> dict | None:
    return read_json(*url_to_fs(uri, storage_options))


def _write_json(uri: str, document: dict, storage_options: dict | None) -> None:
    fs, path = url_to_fs(uri, storage_options)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, json.dumps(document, indent=2, default=str).encode())


def _prepare_root(output: str, storage_options: dict | None,
                  settings: Mapping[str, StageSettings]) -> None:
    """The run's root made ready to write, or one line (:func:`prepare_output`). Its bucket is
    the stages' outputs' by default: created when any stage may create its own."""
    fs, root = url_to_fs(output, storage_options)
    create_bucket = any(getattr(s, "create_bucket", False) for s in settings.values())
    prepare_output(fs, root, output, create_bucket=create_bucket)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------
# The run

def write_synthetic(synthetic: SyntheticSettings | None, storage_options: dict | None
                    ) -> dict[str, Any] | None:
    """Write ``pipeline.synthetic``'s scenes (left as they are when already there); None without."""
    if synthetic is None:
        return None
    return write_synthetic_sets(**synthetic.model_dump(), storage_options=storage_options)


def run_chain(config: Mapping[str, Any], *, config_uri: str = "", force: bool | None = None,
              stage_context: Callable[[str], ContextManager] | None = None) -> dict[str, Any]:
    """Run the stages of ``config`` in order; returns what ``pipeline_summary.json`` holds.

    Args:
        config: a config mapping (:func:`selfment_dist.config.load_config`).
        config_uri: where it came from (recorded in the summary).
        force: overrides ``pipeline.force``: run every stage, even those recorded complete.
        stage_context: a context manager to run each stage in, by stage name (the demo's
            progress bars).
    Raises:
        SettingsError (from :func:`plan`), OutputNotWritableError / MissingBucketError (the
            root cannot be written: :func:`_prepare_root`): before anything runs.
        Whatever a stage raises (after recording it as failed in the summary).
    """
    chain, settings = plan(config)
    force = chain.force if force is None else force
    storage_options = config.get("storage_options")
    _prepare_root(chain.output, storage_options, settings)
    summary_uri = join(chain.output, SUMMARY_NAME)
    previous = (_read_json(summary_uri, storage_options) or {}).get("stages") or {}
    values = stage_values(config)
    start = time.perf_counter()
    summary: dict[str, Any] = {
        "status": "running", "config": config_uri, "output": chain.output, "started": _now(),
        "stages_requested": chain.stages,
        "outputs": {stage: values[stage].get("output") for stage in STAGES},
        # in pipeline order; stages not asked for keep their record from an earlier run
        "stages": {s: {"status": "pending"} if s in chain.stages else previous[s]
                   for s in STAGES if s in chain.stages or s in previous},
    }

    def save() -> None:
        _write_json(summary_uri, summary, storage_options)

    synthetic = write_synthetic(chain.synthetic, storage_options)
    if synthetic is not None:
        summary["synthetic"] = synthetic
    save()
    upstream_ran = False  # once a stage runs, the ones after it read new outputs: run them too
    for stage in chain.stages:
        current = settings[stage]
        record: dict[str, Any] = {"options": current.record()}
        summary["stages"][stage] = record
        before = previous.get(stage) or {}
        if (not force and not upstream_ran and before.get("status") in ("complete", "skipped")
                and before.get("options") == record["options"]
                and output_complete(stage, current)):
            logger.info("%s: skipped, already complete at %s (same settings; force to rerun)",
                        stage, current.output)
            record.update(status="skipped", summary=before.get("summary"))
            continue
        logger.info("%s: starting with %s", stage, record["options"])
        upstream_ran = True
        record["status"] = "running"
        save()
        t0 = time.perf_counter()
        try:
            with stage_context(stage) if stage_context else contextlib.nullcontext():
                result = stage_function(stage)(current)
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
    _log_metrics(summary)
    logger.info("pipeline complete in %.1fs; summary at %s", summary["wall_s"], summary_uri)
    return summary


def _log_metrics(summary: dict[str, Any]) -> None:
    """The scores table of the run's evaluation, when it has one."""
    if summary["metrics"]:
        from selfment_dist.evaluation.reports import DatasetEvaluation, scores_table

        table = scores_table([DatasetEvaluation(name=n, scores=m["scores"], n_images=m["n_images"])
                              for n, m in summary["metrics"].items()])
        logger.info("metrics (%s):\n%s", summary["outputs"]["evaluate"], table)
