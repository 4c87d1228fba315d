"""The ``selfment`` command line: parse options and a YAML config, then call ``pipeline``.

Every option's default lives in the pipeline function it reaches: the parser only records
what was given (``argparse.SUPPRESS``), the config fills in under it, and anything set nowhere
is left to the function.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

from .config import merge_options, normalise_key, options_for, read_config
from .io.storage import parse_storage_options

logger = logging.getLogger("selfment_dist")


def _benchmark(text: str) -> tuple[str, tuple[str, str]]:
    name, sep, rest = text.partition("=")
    images, comma, masks = rest.partition(",")
    if not (sep and comma and name and images and masks):
        raise argparse.ArgumentTypeError(f"--benchmark {text!r} is not NAME=IMAGES_URI,MASKS_URI")
    return name, (images, masks)


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value:
        raise argparse.ArgumentTypeError(f"{text} must be ≥ 0")
    return value


def _actor_options() -> list[Opt]:
    """The model-actor options of pseudo-label, segment and evaluate --model."""
    return [
        opt("--num-actors", type=int, help="most model replicas"),
        opt("--num-gpus-per-actor", type=_fraction,
            help="GPUs per replica, 0 to 1 (asks an autoscaler for GPU nodes)"),
        opt("--cpu-fallback", action="store_true",
            help="let GPU actors run on CPU where CUDA is unusable (default: they refuse)"),
        opt("--actor-wait-s", type=float,
            help="longest wait for the first model actor (default 600), then fail"),
    ]


@dataclass
class Opt:
    flags: tuple[str, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)


def opt(*flags: str, **kwargs) -> Opt:
    return Opt(flags, kwargs)


COMMON = [
    opt("--config", metavar="FILE.yaml", help="YAML config (any option; the command line wins)"),
    opt("--address", help="Ray cluster address (default: a local Ray started in-process)"),
    opt("--storage-option", dest="storage_options", action="append", metavar="KEY=VALUE",
        help="fsspec option for every URI, e.g. endpoint_url=http://127.0.0.1:9000 (repeatable)"),
]
# backbone.PRECISIONS, spelled out so that ``--help`` does not import torch.
PRECISIONS = ("auto", "fp32", "bf16")
INPUTS = opt("--input", dest="inputs", nargs="+", required=True, metavar="URI",
             help="folders, globs, list files, img2dataset parquet or WebDataset tar shards")

COMMANDS: dict[str, dict[str, Any]] = {
    "pseudo-label": dict(
        help="DINO features → NCut → IPO pseudo-masks, as a parquet dataset",
        target="selfment_dist.pipeline.pseudo_label:run_pseudo_label",
        options=[
            INPUTS,
            opt("--output", required=True, metavar="URI"),
            opt("--backbone", help="timm DINO name (default vit_small_patch16_dinov3.lvd1689m)"),
            opt("--weights", help="hub | random | PATH | URI of a checkpoint"),
            opt("--image-size", type=int, help="square input size (default 768)"),
            opt("--precision", choices=PRECISIONS,
                help="backbone numerics: auto (bf16 on GPU, fp32 on CPU), fp32 or bf16"),
            opt("--batch-size", type=int),
            opt("--tau", type=float), opt("--eps", type=float),
            opt("--non-binary-graph", dest="binary_graph", action="store_false",
                help="keep affinities ≥ tau instead of setting them to 1"),
            opt("--n-iter", type=int), opt("--sample-size", type=int),
            opt("--save-ncut", action="store_true", help="also store the NCut mask before IPO"),
            opt("--save-features", action="store_true", help="also store float16 patch features"),
            opt("--max-pixels", type=int, help="refuse larger images (decompression bombs)"),
            *_actor_options(),
            opt("--rows-per-file", type=int, help="rows per parquet part"),
            opt("--no-progress", dest="progress", action="store_false", help="no progress bars"),
        ]),
    "train": dict(
        help="train the segmentation head with Ray Train (DDP)",
        target="selfment_dist.pipeline.train:run_train",
        options=[
            opt("--labels", required=True, metavar="URI", help="pseudo-label parquet dataset"),
            opt("--output", required=True, metavar="URI", help="model artifact folder"),
            opt("--workers", type=int), opt("--use-gpu", action="store_true"),
            opt("--epochs", type=int), opt("--batch-size", type=int),
            opt("--lr", type=float), opt("--weight-decay", type=float),
            opt("--sim-weight", type=float), opt("--temperature", type=float),
            opt("--checkpoint-every", type=int, help="steps between checkpoints"),
            opt("--max-failures", type=int, help="worker failures Ray Train retries"),
            opt("--embed-dim", type=int), opt("--seed", type=int),
            opt("--features", choices=["auto", "stored", "backbone"],
                help="stored feature column, or recompute with the frozen backbone"),
            opt("--max-pixels", type=int),
            opt("--resources-per-worker", type=json.loads, metavar="JSON",
                help='e.g. \'{"CPU": 4, "GPU": 1}\''),
        ]),
    "segment": dict(
        help="saliency maps of images with a trained model",
        target="selfment_dist.pipeline.segment:run_segment",
        options=[
            opt("--model", required=True, metavar="URI", help="model artifact folder"),
            INPUTS,
            opt("--output", required=True, metavar="URI"),
            opt("--image-size", type=int, help="may exceed the training size"),
            opt("--batch-size", type=int),
            opt("--format", dest="output_format", choices=["png", "parquet"]),
            opt("--overlays", action="store_true", help="also write images with the mask tinted"),
            *_actor_options(),
        ]),
    "evaluate": dict(
        help="SOD/COD and unsupervised-SOD metrics, reports and plots",
        target="selfment_dist.pipeline.evaluate:run_evaluate",
        options=[
            opt("--predictions", metavar="URI", help="folder of saliency PNGs"),
            opt("--masks", metavar="URI", help="folder of ground-truth PNGs"),
            opt("--name", help="dataset name in the reports"),
            opt("--model", metavar="URI", help="model artifact: segment the benchmarks first"),
            opt("--benchmark", dest="benchmarks", action="append", type=_benchmark,
                metavar="NAME=IMAGES_URI,MASKS_URI"),
            opt("--output", required=True, metavar="URI"),
            opt("--image-size", type=int, help="inference size with --model"),
            opt("--batch-size", type=int, help="images per model call with --model"),
            *_actor_options(),
            opt("--num-shards", type=int),
        ]),
    "demo": dict(
        help="synthetic data through the whole pipeline, locally",
        target="selfment_dist.pipeline.demo:run_demo",
        options=[opt("--output", dest="output_dir", metavar="DIR")]),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="selfment", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING …")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, spec in COMMANDS.items():
        p = sub.add_parser(name, help=spec["help"], argument_default=argparse.SUPPRESS)
        for o in COMMON + spec["options"]:
            p.add_argument(*o.flags, **o.kwargs)
    return parser


def _dest(o: Opt) -> str:
    return o.kwargs.get("dest") or normalise_key(o.flags[0].lstrip("-"))


def _accepted(command: str) -> set[str]:
    return {_dest(o) for o in COMMON + COMMANDS[command]["options"]} - {"config"}


def flag_aliases(command: str) -> dict[str, tuple[str, bool]]:
    """Config keys may be spelt like the flag (``input``) or like the option (``inputs``).

    Maps each spelling to ``(option name, inverted)``; ``inverted`` marks negative flags such as
    ``--non-binary-graph`` (``non_binary_graph: true`` means ``binary_graph=False``).
    """
    return {normalise_key(flag.lstrip("-")): (_dest(o), o.kwargs.get("action") == "store_false")
            for o in COMMON + COMMANDS[command]["options"] for flag in o.flags}


def apply_aliases(config: dict[str, Any], command: str) -> dict[str, Any]:
    """Rename the top-level keys and the command's own section by the command's flag names."""
    aliases = flag_aliases(command)

    def rename(items: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for key, value in items.items():
            dest, inverted = aliases.get(key, (key, False))
            out[dest] = (not value) if inverted and isinstance(value, bool) else value
        return out

    section = normalise_key(command)
    out = rename({k: v for k, v in config.items() if k != section})
    if isinstance(config.get(section), dict):
        out[section] = rename(config[section])
    elif section in config:
        out[section] = config[section]
    return out


def resolve_options(command: str, given: dict[str, Any]) -> dict[str, Any]:
    """Config file (if any) under the command-line options; storage options parsed."""
    given = dict(given)
    config_uri = given.pop("config", None)
    if "storage_options" in given:
        given["storage_options"] = parse_storage_options(given["storage_options"])
    if "benchmarks" in given:
        given["benchmarks"] = dict(given["benchmarks"])
    from_config: dict[str, Any] = {}
    if config_uri:
        config = apply_aliases(read_config(config_uri, given.get("storage_options")), command)
        others = set().union(*(_accepted(c) for c in COMMANDS))
        from_config = options_for(config, normalise_key(command), _accepted(command), others)
        if isinstance(from_config.get("benchmarks"), dict):
            from_config["benchmarks"] = {k: tuple(v) for k, v in from_config["benchmarks"].items()}
    return merge_options(from_config, given)


def _missing_required(command: str, options: dict[str, Any]) -> list[str]:
    required = [o for o in COMMANDS[command]["options"] if o.kwargs.get("required")]
    return [o.flags[0] for o in required if _dest(o) not in options]


def _target(command: str) -> Callable[..., dict]:
    module, _, func = COMMANDS[command]["target"].partition(":")
    return getattr(importlib.import_module(module), func)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Required options may come from --config, so the parser checks them after the merge.
    parser = build_parser()
    for action in _all_actions(parser):
        action.required = False
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    command = args.command
    given = {k: v for k, v in vars(args).items() if k not in ("command", "log_level")}
    try:
        options = resolve_options(command, given)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    missing = _missing_required(command, options)
    if missing:
        parser.error(f"{command}: {', '.join(missing)} required (on the command line or in --config)")
    if command == "evaluate":
        _check_evaluate_modes(parser, options)
    from .pipeline._ray import call_as_driver  # ray:// runs the driver on the cluster

    summary = call_as_driver(_target(command), options)
    print(json.dumps(summary, indent=2, default=str))
    return 0 if not (isinstance(summary, dict) and summary.get("failed")) else 1


def _check_evaluate_modes(parser: argparse.ArgumentParser, options: dict[str, Any]) -> None:
    by_files = "predictions" in options or "masks" in options
    by_model = "model" in options or "benchmarks" in options
    if by_files == by_model:
        parser.error("evaluate takes either --predictions and --masks, or --model and --benchmark")
    if by_files and not ("predictions" in options and "masks" in options):
        parser.error("evaluate: --predictions and --masks go together")
    if by_model and not ("model" in options and options.get("benchmarks")):
        parser.error("evaluate: --model needs at least one --benchmark NAME=IMAGES_URI,MASKS_URI")


def _all_actions(parser: argparse.ArgumentParser):
    for action in parser._actions:
        yield action
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from sub._actions


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
