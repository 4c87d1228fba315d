"""The ``selfment`` command line: parse options and a YAML config, then call ``pipeline``.

Every option's default lives in the pipeline function it reaches: the parser only records
what was given (``argparse.SUPPRESS``), the config fills in under it, and anything set nowhere
is left to the function.

User mistakes (bad paths, values, YAML, checkpoints, a busy output) print one line per problem,
``selfment: error: ...``, and exit 2; tracebacks are for bugs. ``--log-level`` sets this
package's loggers only (other libraries stay at WARNING, so e.g. botocore never logs request
headers), and log records are scrubbed of the credentials in the storage options.
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

#: Exit status of a user mistake (as argparse uses).
USAGE_ERROR = 2


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one ``selfment: error: ...`` line, exit 2."""

    def error(self, message: str):  # noqa: D401 (argparse's signature)
        _print_error(message)
        sys.exit(USAGE_ERROR)


def _print_error(message: str) -> None:
    for line in str(message).splitlines() or [""]:
        print(f"selfment: error: {line}", file=sys.stderr)


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean a user mistake, not a bug (imported lazily: no torch for --help)."""
    from .pipeline._parts import OutputBusyError
    return (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
            PermissionError, OutputBusyError)


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
                help="backbone numerics: auto (= fp32, official), fp32 or bf16 (faster, approximate)"),
            opt("--batch-size", type=int),
            opt("--tau", type=float), opt("--eps", type=float),
            opt("--non-binary-graph", dest="binary_graph", action="store_false",
                help="keep affinities ≥ tau instead of setting them to 1"),
            opt("--n-iter", type=int), opt("--sample-size", type=int),
            opt("--no-object-threshold", type=float, metavar="X",
                help="flag rows whose confidence is below X as no_object (default 0.5)"),
            opt("--save-ncut", action="store_true", help="also store the NCut mask before IPO"),
            opt("--save-features", action="store_true", help="also store float16 patch features"),
            opt("--max-pixels", type=int, help="refuse larger images (decompression bombs)"),
            opt("--max-bytes", type=int, help="refuse larger encoded images (default 32 MiB)"),
            opt("--allow-empty", action="store_true", help="succeed on inputs without images"),
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
            opt("--lr-scaling", choices=["none", "sqrt", "linear"],
                help="lr x f(batch size) for the faster large-batch configuration"),
            opt("--shuffle", choices=["full", "local"],
                help="full: whole set reshuffled every epoch (official); local: small buffer"),
            opt("--contrastive", choices=["official", "supcon"],
                help="contrastive loss variant (official by default)"),
            opt("--sim-weight", type=float), opt("--temperature", type=float),
            opt("--checkpoint-every", type=int, help="steps between checkpoints"),
            opt("--max-failures", type=int, help="worker failures Ray Train retries"),
            opt("--embed-dim", type=int), opt("--seed", type=int),
            opt("--features", choices=["auto", "stored", "backbone"],
                help="stored feature column, or recompute with the frozen backbone"),
            opt("--min-confidence", type=float, metavar="X",
                help="train on rows with confidence >= X (default: skip rows flagged no_object;"
                     " 0 keeps all)"),
            opt("--keep-fraction", type=float, metavar="F",
                help="train on the most confident fraction F of the rows"),
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
            opt("--image-size", type=int,
                help="inference size (default: the model's, twice its training size)"),
            opt("--batch-size", type=int),
            opt("--format", dest="output_format", choices=["png", "parquet"]),
            opt("--overlays", action="store_true", help="also write images with the mask tinted"),
            opt("--max-pixels", type=int, help="refuse larger images (decompression bombs)"),
            opt("--max-bytes", type=int, help="refuse larger encoded images (default 32 MiB)"),
            opt("--allow-empty", action="store_true", help="succeed on inputs without images"),
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
            opt("--image-size", type=int,
                help="inference size with --model (default: the model's, twice its training size)"),
            opt("--batch-size", type=int, help="images per model call with --model"),
            *_actor_options(),
            opt("--num-shards", type=int),
        ]),
    "import-checkpoint": dict(
        help="turn an official Selfment head checkpoint (.pth) into a model artifact",
        target="selfment_dist.official_checkpoint:import_official_checkpoint",
        options=[
            opt("--head", required=True, metavar="HEAD.pth",
                help="official checkpoint: torch.save({'model_state': ..., 'args': ...})"),
            opt("--output", required=True, metavar="MODEL_URI", help="model artifact folder"),
            opt("--backbone", help="timm DINO name (default: from the checkpoint's "
                                   "dino_model_name, e.g. dinov3_vit7b16)"),
            opt("--weights", help="backbone weights for segment: hub | random | PATH | URI"),
            opt("--image-size", type=int,
                help="inference size (default: twice the checkpoint's img_size, i.e. 1536)"),
        ]),
    "inspect": dict(
        help="contact sheets, confidence histogram and an HTML page of pseudo-labels",
        target="selfment_dist.pipeline.inspect:run_inspect",
        options=[
            opt("--labels", required=True, metavar="URI", help="pseudo-label parquet dataset"),
            opt("--output", required=True, metavar="URI", help="folder for the pictures"),
            opt("--per-sheet", type=int, help="images per contact sheet (default 24)"),
            opt("--thumb-size", type=int, help="pixels per image tile (default 128)"),
            opt("--max-pixels", type=int),
        ]),
    "demo": dict(
        help="synthetic data through the whole pipeline, locally",
        target="selfment_dist.pipeline.demo:run_demo",
        options=[opt("--output", dest="output_dir", metavar="DIR"),
                 opt("--image-size", type=int, help="backbone input size (default 224)"),
                 opt("--epochs", type=int),
                 opt("--verbose", action="store_true",
                     help="show Ray's own output instead of one bar per stage")]),
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="selfment", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO",
                        help="DEBUG, INFO, WARNING … (this package's loggers only)")
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
    level = args.log_level.upper()
    if not isinstance(logging.getLevelName(level), int):
        parser.error(f"--log-level {args.log_level!r} is not a log level (DEBUG, INFO, WARNING, "
                     "ERROR)")
    command = args.command
    given = {k: v for k, v in vars(args).items() if k not in ("command", "log_level")}
    try:
        options = resolve_options(command, given)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    configure_logging(level, options.get("storage_options"))
    missing = _missing_required(command, options)
    if missing:
        parser.error(f"{command}: {', '.join(missing)} required (on the command line or in --config)")
    if command == "evaluate":
        _check_evaluate_modes(parser, options)
    from .pipeline._ray import call_as_driver  # ray:// runs the driver on the cluster

    try:
        summary = call_as_driver(_target(command), options)
    except _user_errors() as err:
        logger.debug("user error", exc_info=True)
        problems = getattr(err, "problems", None)  # SettingsError: one line per problem
        _print_error("\n".join(problems) if problems
                     else " ".join(str(err).split()) or type(err).__name__)
        return USAGE_ERROR
    except Exception as err:
        from .pipeline._parts import FencedError
        if not isinstance(err, FencedError):
            raise
        _print_error(str(err))
        return 1
    if command != "demo":  # the demo prints its own short summary (all of it is in a file)
        print(json.dumps(summary, indent=2, default=str))
    return 0 if not (isinstance(summary, dict) and summary.get("failed")) else 1


class _Redact(logging.Filter):
    """Replaces the given secrets in every record's final message with ``***``."""

    def __init__(self, secrets: list[str]):
        super().__init__()
        self.secrets = [s for s in secrets if len(s) >= 4]

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            message = record.getMessage()
            clean = message
            for secret in self.secrets:
                clean = clean.replace(secret, "***")
            if clean != message:
                record.msg, record.args = clean, None
        return True


def _secrets(options: Any) -> list[str]:
    """String values of storage options that look like credentials (any nesting)."""
    out: list[str] = []
    if isinstance(options, dict):
        for key, value in options.items():
            if isinstance(value, dict):
                out += _secrets(value)
            elif isinstance(value, str) and any(w in str(key).lower() for w in (
                    "key", "secret", "token", "password", "credential", "session")):
                out.append(value)
    return out


def configure_logging(level: str, storage_options: dict | None = None) -> None:
    """This package's loggers at ``level``; every other logger keeps the root's WARNING, so
    libraries' DEBUG output (request headers, credentials) never appears. The root handlers
    also redact the storage options' secrets from whatever they print."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.WARNING,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Records of this package's loggers reach the root's handlers whatever the root's level.
    logging.getLogger("selfment_dist").setLevel(level)
    redact = _Redact(_secrets(storage_options))
    for handler in root.handlers:
        for old in [f for f in handler.filters if isinstance(f, _Redact)]:
            handler.removeFilter(old)
        handler.addFilter(redact)

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
