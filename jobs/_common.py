"""What every Ray Jobs entrypoint shares: its arguments, the YAML config, one stage's options.

The config is the ``selfment`` command line's format (:mod:`selfment_dist.config`): top-level
keys (``address``, ``storage_options``) apply to every stage, a section per stage
(``pseudo_label``, ``train``, ``segment``, ``evaluate``) to that stage only. Option names are the
keyword arguments of the stage's pipeline function (``inputs``, ``output``, ``image_size`` …), so
the function stays the one source of truth for names and defaults, and every one of them can be
set here (``rows_per_file``, ``features``, ``progress`` … too); keys may also be spelt like the
command line's flags (``input``, ``format``), as in ``selfment --config``. ``jobs/pipeline.py``
adds a ``pipeline`` section of its own.

The entrypoints run as scripts (``python jobs/<stage>.py``), so this module is imported as
``_common`` from the script's folder.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import logging
import sys
from typing import Any, Callable, Mapping

from selfment_dist.cli import apply_aliases, flag_aliases  # the CLI's spellings of config keys
from selfment_dist.config import merge_options, options_for, read_config
from selfment_dist.io.storage import join, parse_storage_options

logger = logging.getLogger("selfment_dist.jobs")

#: Stage name (config section) → its pipeline function, in pipeline order.
STAGES: dict[str, str] = {
    "pseudo_label": "selfment_dist.pipeline.pseudo_label:run_pseudo_label",
    "train": "selfment_dist.pipeline.train:run_train",
    "segment": "selfment_dist.pipeline.segment:run_segment",
    "evaluate": "selfment_dist.pipeline.evaluate:run_evaluate",
}
#: Top-level sections that are not a stage's (``jobs/pipeline.py``'s own settings).
OTHER_SECTIONS = ("pipeline",)
#: Never written to a summary: credentials may sit in storage options.
PRIVATE_OPTIONS = ("storage_options",)


def stage_function(stage: str) -> Callable[..., Any]:
    """The pipeline function of ``stage`` (imported on first use)."""
    try:
        module, _, name = STAGES[stage].partition(":")
    except KeyError:
        raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}") from None
    return getattr(importlib.import_module(module), name)


def _command(stage: str) -> str:
    return stage.replace("_", "-")  # the CLI's command name


def parameters(func: Callable[..., Any]) -> dict[str, inspect.Parameter]:
    """The keyword-settable parameters of ``func`` by name."""
    return {name: p for name, p in inspect.signature(func).parameters.items()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def required(func: Callable[..., Any]) -> list[str]:
    """Parameters of ``func`` without a default."""
    return [name for name, p in parameters(func).items() if p.default is p.empty]


def parse_args(description: str, argv: list[str] | None = None,
               extra: Callable[[argparse.ArgumentParser], None] | None = None
               ) -> argparse.Namespace:
    """``--config FILE.yaml`` (required), ``--storage-option KEY=VALUE`` (repeatable, wins over
    the config's ``storage_options``), ``--log-level``; ``extra`` adds a script's own flags."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, metavar="FILE.yaml",
                        help="YAML config: local path or fsspec URL (relative paths are relative "
                             "to the job's working directory)")
    parser.add_argument("--storage-option", dest="storage_options", action="append",
                        default=[], metavar="KEY=VALUE",
                        help="fsspec option for every URI, e.g. endpoint_url=http://127.0.0.1:9000 "
                             "(repeatable; also used to read --config)")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING …")
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    args.storage_options = parse_storage_options(args.storage_options)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args


def load_config(uri: str, cli_storage_options: dict | None = None) -> dict[str, Any]:
    """The config at ``uri`` with ``--storage-option`` merged over its ``storage_options``."""
    config = read_config(uri, cli_storage_options or None)
    if cli_storage_options:
        config.update(merge_options({"storage_options": config.get("storage_options") or {}},
                                    {"storage_options": cli_storage_options}))
    return config


def stage_options(config: Mapping[str, Any], stage: str) -> dict[str, Any]:
    """The keyword arguments ``config`` sets for ``stage`` (top level under the stage's section).

    Raises:
        ValueError: a key no stage takes (a typo), naming the valid ones.
    """
    others: set[str] = set(OTHER_SECTIONS)
    for name in STAGES:
        others |= set(parameters(stage_function(name))) | set(flag_aliases(_command(name)))
    config = apply_aliases(dict(config), _command(stage))
    options = options_for(config, stage, parameters(stage_function(stage)), others)
    if isinstance(options.get("inputs"), str):
        options["inputs"] = [options["inputs"]]
    if isinstance(options.get("benchmarks"), Mapping):  # YAML lists → (images, masks) pairs
        options["benchmarks"] = {k: tuple(v) for k, v in options["benchmarks"].items()}
    return options


def missing_options(stage: str, options: Mapping[str, Any]) -> list[str]:
    """What ``stage`` cannot run without and ``options`` lacks."""
    missing = [name for name in required(stage_function(stage)) if name not in options]
    if stage == "evaluate":  # two modes: folders (predictions + masks) or model + benchmarks
        if options.get("benchmarks") or "model" in options:
            missing += [k for k in ("model", "benchmarks") if not options.get(k)]
        else:
            missing += [k for k in ("predictions", "masks") if k not in options]
    return missing


# ---------------------------------------------------------------------------------------------
# The pipeline's wiring: each stage's outputs feed the next

#: Keys of the ``pipeline:`` section.
PIPELINE_KEYS = ("output", "stages", "synthetic")
#: Paths that differ from stage to stage: not top-level keys of a config with a pipeline section.
_PER_STAGE = ("inputs", "output", "labels", "model", "predictions", "masks")


def pipeline_section(config: Mapping[str, Any]) -> dict[str, Any]:
    """The ``pipeline:`` section, checked: ``output`` (root URI), ``stages``, ``synthetic``."""
    section = dict(config.get("pipeline") or {})
    unknown = sorted(set(section) - set(PIPELINE_KEYS))
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(unknown)} in section 'pipeline'; "
                         f"valid: {', '.join(PIPELINE_KEYS)}")
    stages = section.get("stages") or list(STAGES)
    stages = [stages] if isinstance(stages, str) else list(stages)
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise ValueError(f"pipeline.stages: unknown stage(s) {', '.join(map(str, bad))}; "
                         f"stages: {', '.join(STAGES)}")
    section["stages"] = [s for s in STAGES if s in stages]  # always in pipeline order
    synthetic = section.get("synthetic")
    if synthetic is not None:
        from selfment_dist.pipeline.demo import write_synthetic_sets

        valid = set(parameters(write_synthetic_sets)) - {"storage_options"}
        if not isinstance(synthetic, Mapping) or set(synthetic) - valid:
            raise ValueError(f"pipeline.synthetic must be a mapping of {', '.join(sorted(valid))}"
                             f", got {synthetic!r}")
        synthetic = dict(synthetic)
        if "root" not in synthetic:
            if not section.get("output"):
                raise ValueError("pipeline.synthetic needs a root (or pipeline.output)")
            synthetic["root"] = join(section["output"], "data")
        section["synthetic"] = synthetic
    return section


def write_synthetic(config: Mapping[str, Any]) -> dict[str, Any] | None:
    """Write ``pipeline.synthetic``'s scenes (left as they are when already there); None without."""
    from selfment_dist.pipeline.demo import write_synthetic_sets

    spec = pipeline_section(config).get("synthetic")
    if not spec:
        return None
    return write_synthetic_sets(**spec, storage_options=config.get("storage_options"))


def resolve(config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Every stage's options, with what the config leaves out wired from the other stages.

    Under ``pipeline.output`` (the root) the outputs default to ``labels/``, ``model/``,
    ``predictions/`` and ``report/``; ``train.labels`` to the pseudo-labels, ``segment.model`` to
    the trained model, ``evaluate.predictions`` to the saliency maps (or ``evaluate.model`` to the
    model in benchmark mode). With ``pipeline.synthetic``, pseudo-labels are made from its
    training images, and its held-out images are segmented and evaluated against their masks;
    without it, ``segment.inputs`` defaults to ``pseudo_label.inputs``. What the config sets
    always wins.
    """
    from selfment_dist.pipeline.demo import synthetic_layout

    section = pipeline_section(config)
    root = section.get("output")
    shared = sorted(k for k in _PER_STAGE if k in config)
    if shared and "pipeline" in config:  # every stage would read or write the same place
        raise ValueError(f"{', '.join(shared)} at the top level would apply to every stage; set "
                         "them in the stages' sections (and the run's root as pipeline.output)")
    opts = {stage: stage_options(config, stage) for stage in STAGES}
    pl, tr, sg, ev = (opts[s] for s in STAGES)
    if root:
        for stage, folder in zip(STAGES, ("labels", "model", "predictions", "report")):
            opts[stage].setdefault("output", join(root, folder))
    if section.get("synthetic"):
        data = synthetic_layout(section["synthetic"]["root"])
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
    return opts


def public(options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` without credentials, JSON-safe (for summaries and logs)."""
    return json.loads(json.dumps({k: v for k, v in options.items() if k not in PRIVATE_OPTIONS},
                                 default=str))


def print_summary(summary: Any) -> None:
    """The result as JSON on stdout: the last thing in the job's logs (``ray job logs``)."""
    print(json.dumps(summary, indent=2, default=str), flush=True)


def run_stage(stage: str, argv: list[str] | None = None) -> int:
    """``main`` of a one-stage entrypoint: read the stage's section, call its pipeline function."""
    args = parse_args(f"Ray Jobs entrypoint: `{stage}` from a YAML config "
                      f"(section `{stage}:` over the top-level keys).", argv)
    try:
        config = load_config(args.config, args.storage_options)
        options = resolve(config)[stage]
        missing = missing_options(stage, options)
        if missing:
            raise ValueError(f"{args.config}: section '{stage}' needs {', '.join(missing)}")
    except (ValueError, FileNotFoundError) as err:
        logger.error("%s", err)
        return 2
    write_synthetic(config)  # pipeline.synthetic's scenes, if any and not there yet
    logger.info("%s options: %s", stage, public(options))
    from selfment_dist.validation import SettingsError
    try:
        summary = stage_function(stage)(**options)
    except SettingsError as err:  # checked before anything runs: a config mistake
        for problem in err.problems:
            logger.error("%s: %s", stage, problem)
        return 2
    print_summary(summary)
    return 0 if not (isinstance(summary, dict) and summary.get("failed")) else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit("jobs/_common.py is a helper module; run jobs/<stage>.py or jobs/pipeline.py")
