"""``selfment plan STAGE --nodes 'CPU=16,GPU=1' [--nodes …] [--config FILE] [stage options]``.

Prints, as JSON, the plan a stage would make on a cluster of the given node shapes, without
starting Ray or running anything: model actors (min, max, how many the nodes hold now), GPUs and
CPUs per actor, batch size, decode concurrency (min, max; ``null`` max = elastic), precision,
the per-stage rates assumed, the expected images/s and which stage bounds it. A run plans with
the same function (plan_stage in selfment_dist/pipeline/_internal/plan.py, fed the alive nodes),
so a cluster can be sized before it is paid for.

Each ``--nodes`` is one node (a head without CPUs is ``--nodes CPU=0``); ``--nodes 4xCPU=16,GPU=1``
repeats a shape. The stage's own flags and its ``--config`` section are accepted as for a run;
only those that change the plan are read. ``--rate NAME=VALUE`` replaces an assumed rate with a
measured one (benchmarks/gpu_check.sh prints them as ``RESULT`` lines; docs/cluster.md).
"""
from __future__ import annotations

import argparse
import json
import re
from typing import Any, Mapping

from pydantic import create_model

from selfment_dist.pipeline._internal.rates import ASSUMED_RATES
from selfment_dist.pipeline._internal.plan import (parse_node_shape, plan_stage,
                                                   workers_that_fit)
from selfment_dist.settings import (EvaluateSettings, PseudoLabelSettings, SegmentSettings,
                                    Settings, SettingsError, TrainSettings, validate)

#: ``selfment plan`` STAGE → the stage's settings model.
STAGES: dict[str, type[Settings]] = {
    "pseudo-label": PseudoLabelSettings, "segment": SegmentSettings,
    "evaluate": EvaluateSettings, "train": TrainSettings,
}
#: The settings a plan reads (the others are accepted and ignored).
PLAN_FIELDS = ("num_actors", "num_gpus_per_actor", "cpu_fallback", "require_gpu", "image_size",
               "batch_size", "precision", "workers", "use_gpu", "resources_per_worker",
               "backbone")
_REPEAT = re.compile(r"^\s*(\d+)\s*[x*]\s*(.+)$")

HELP = "the resource plan of a stage on given node shapes, as JSON (nothing runs)"


def add_plan_parser(sub: Any, add_settings_arguments: Any) -> None:
    """``plan`` and one sub-command per stage, each with the stage's flags."""
    p = sub.add_parser("plan", help=HELP, description=__doc__.split("\n\n")[1])
    stages = p.add_subparsers(dest="plan_stage", required=True, metavar="STAGE")
    for name, model in STAGES.items():
        sp = stages.add_parser(name, help=f"plan of `selfment {name}`",
                               argument_default=argparse.SUPPRESS)
        sp.add_argument("--nodes", action="append", required=True, metavar="[Nx]CPU=16,GPU=1",
                        help="one node's resources (repeatable; Nx repeats it N times)")
        sp.add_argument("--config", metavar="FILE.yaml", help="YAML config; its section for "
                        "this stage is read (the command line wins)")
        sp.add_argument("--rate", action="append", metavar="NAME=VALUE",
                        help=f"a measured rate instead of the assumed one ({', '.join(ASSUMED_RATES)})")
        add_settings_arguments(sp, model)


def parse_nodes(texts: list[str]) -> list[dict[str, float]]:
    nodes: list[dict[str, float]] = []
    for text in texts:
        match = _REPEAT.match(text)
        count, shape = (int(match.group(1)), match.group(2)) if match else (1, text)
        nodes += [parse_node_shape(shape) for _ in range(count)]
    return nodes


def parse_rates(texts: list[str] | None) -> dict[str, float]:
    rates = {}
    for text in texts or []:
        name, sep, value = text.partition("=")
        try:
            rates[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise ValueError(f"--rate {text!r}: expected NAME=VALUE, e.g. "
                             f"gpu_actor_images_per_s_fp32=85")
    return rates


def planning_settings(model: type[Settings], values: Mapping[str, Any]) -> Settings:
    """The plan's fields of ``model``, validated as the stage validates them (the others, such
    as inputs and outputs, are not needed to plan and may be left out)."""
    fields = {n: (model.model_fields[n].annotation, model.model_fields[n])
              for n in PLAN_FIELDS if n in model.model_fields}
    view = create_model(f"{model.__name__}Plan", __base__=Settings, **fields)
    view.section = model.section
    return validate(view, {k: v for k, v in values.items() if k in fields}, model.section)


def plan_of(stage: str, nodes: list[dict[str, float]], values: Mapping[str, Any],
            rates: Mapping[str, float] | None = None) -> dict[str, Any]:
    """The JSON-safe plan of ``stage`` (a :data:`STAGES` name) on ``nodes``."""
    s = planning_settings(STAGES[stage], values)
    if stage == "train":
        return _train_plan(s, nodes)
    # The rates are scaled to this backbone; None (segment: the artifact's, unread here):
    # the reference ViT-S/16.
    backbone = getattr(s, "backbone", None)
    plan = plan_stage(nodes, num_actors=s.num_actors, num_gpus_per_actor=s.num_gpus_per_actor,
                      allow_cpu_fallback=s.cpu_fallback, image_size=s.image_size,
                      batch_size=s.batch_size, precision=getattr(s, "precision", "auto"),
                      require_gpu=s.require_gpu, stage=stage, rates=rates, backbone=backbone)
    out = plan.record()
    out["image_size"] = s.image_size  # None: the model's own (rates are stated at 768 px)
    out["backbone"] = backbone
    return out


def _train_plan(s: Settings, nodes: list[dict[str, float]]) -> dict[str, Any]:
    """Training: whether the nodes hold the DDP workers, each with what it asks for."""
    from selfment_dist.pipeline.train import _plan_workers

    resources, threads = _plan_workers(s.workers, s.use_gpu, s.resources_per_worker,
                                       nodes=nodes)
    need = resources or {"CPU": 1.0, "GPU": 1.0}  # Ray Train's default with use_gpu
    held = workers_that_fit(need, nodes)
    return {"stage": "train", "workers": s.workers, "use_gpu": s.use_gpu,
            "resources_per_worker": need, "torch_threads": threads,
            "workers_the_nodes_hold": min(held, 1 << 20), "fits": held >= s.workers,
            "nodes": nodes}


#: Parsed arguments of ``selfment plan`` that are not the stage's settings.
NOT_SETTINGS = frozenset({"command", "log_level", "plan_stage", "nodes", "config", "rate"})


def run_plan_command(args: argparse.Namespace, given: Mapping[str, Any]) -> dict[str, Any]:
    """``selfment plan``'s JSON from its parsed arguments; ``given``: the stage options set on
    the command line, as settings values (the CLI converts them). User mistakes: ValueError."""
    from selfment_dist.config import load_config, values_for

    stage, model = args.plan_stage, STAGES[args.plan_stage]
    config_uri = getattr(args, "config", None)
    config = load_config(config_uri, given.get("storage_options")) if config_uri else {}
    values = {**values_for(config, model), **given}
    return plan_of(stage, parse_nodes(args.nodes), values, parse_rates(getattr(args, "rate", None)))


def print_plan(args: argparse.Namespace, given: Mapping[str, Any]) -> None:
    print(json.dumps(run_plan_command(args, given), indent=2))


__all__ = ["STAGES", "add_plan_parser", "parse_nodes", "plan_of", "print_plan",
           "run_plan_command", "SettingsError"]
