"""The ``selfment`` command line: flags generated from the settings models, then the pipeline.

User mistakes (:class:`~selfment_dist.errors.SelfmentUserError`: bad paths, values, YAML,
checkpoints, a busy output) and usage errors print one line per problem,
``selfment: error: ...``, and exit 2; any other exception is a bug and keeps its traceback
(exit 1). ``--log-level`` sets this
package's loggers only (other libraries stay at WARNING, so e.g. botocore never logs request
headers), and log records are scrubbed of the credentials in the storage options.

Each command's flags and ``--help`` come from its settings model (:mod:`selfment_dist.settings`):
one flag per field, spelt as the field says. The parser records only what was given
(``argparse.SUPPRESS``); ``--config`` fills in under it (:mod:`selfment_dist.config`, wired like
the stage chain: :mod:`selfment_dist.pipeline.chain`), the model validates the result and
supplies every default, and the stage function gets the settings object.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import types
import typing
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Literal, Mapping

from selfment_dist.config import load_config, values_for, with_overrides
from selfment_dist.errors import FencedError, SelfmentUserError
from selfment_dist.io.storage import parse_storage_options
from selfment_dist.settings import (ChainSettings, DemoSettings, Settings, SettingsError,
                                    StageSettings, flag_of, validate)
from selfment_dist.stages import STAGES, Stage, load

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


@dataclass(frozen=True)
class Command:
    help: str
    settings: type[Settings]
    target: str  # "module:function", imported when the command runs
    stage: Stage | None = None  # the registry's entry; None for demo and run


#: One subcommand per stage of the registry (:mod:`selfment_dist.stages`), then the demo and the
#: chain, which run stages.
COMMANDS: dict[str, Command] = {
    **{s.command: Command(s.help, s.settings, s.run_ref, s) for s in STAGES},
    "demo": Command("synthetic data through the whole pipeline, locally", DemoSettings,
                    "selfment_dist.pipeline.demo:run_demo"),
    "run": Command("the whole chain from --config, skipping finished stages", ChainSettings,
                   "selfment_dist.pipeline.chain:run_chain"),
}
#: Options of ``selfment run`` that go to the config's top level (they apply to every stage).
RUN_TOP_LEVEL = ("address", "storage_options")


# ---------------------------------------------------------------------------------------------
# Flags from fields

def _benchmark(text: str) -> tuple[str, tuple[str, str]]:
    name, sep, rest = text.partition("=")
    images, comma, masks = rest.partition(",")
    if not (sep and comma and name and images and masks):
        raise argparse.ArgumentTypeError(f"--benchmark {text!r} is not NAME=IMAGES_URI,MASKS_URI")
    return name, (images, masks)


def _value_type(annotation: Any) -> Any:
    """The annotation without ``None`` (``int | None`` → ``int``)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _plain(annotation: Any) -> Any:
    """``Annotated[int, ...]`` → ``int``."""
    return typing.get_args(annotation)[0] if typing.get_origin(annotation) is typing.Annotated \
        else annotation


def argument(model: type[Settings], name: str) -> tuple[list[str], dict[str, Any]] | None:
    """``add_argument``'s flags and keywords for ``model``'s field ``name`` (None: not a flag)."""
    info = model.model_fields[name]
    extra = info.json_schema_extra or {}
    if extra.get("cli") == "none":
        return None
    flag = flag_of(model, name)
    kind = _value_type(info.annotation)
    help_text = info.description or ""
    if info.is_required():
        help_text += " (required, here or in --config)"
    elif info.default is not None and kind is not bool:
        help_text += f" (default: {info.default})"
    kwargs: dict[str, Any] = {"dest": name, "help": help_text.replace("%", "%%")}
    if "metavar" in extra:
        kwargs["metavar"] = extra["metavar"]
    cli = extra.get("cli")
    if cli in ("key=value", "benchmark"):
        kwargs["action"] = "append"
        if cli == "benchmark":
            kwargs["type"] = _benchmark
    elif cli == "json":
        kwargs["type"] = json.loads
    elif kind is bool:
        if info.default is True:  # a flag that turns it off
            kwargs["help"] = f"sets {name} to false ({kwargs['help']})"
            return [extra["negative_flag"]], {**kwargs, "action": "store_false"}
        kwargs["action"] = "store_true"
    elif typing.get_origin(kind) is Literal:
        kwargs["choices"] = typing.get_args(kind)
    elif typing.get_origin(kind) is list:
        item = _plain(typing.get_args(kind)[0])
        kwargs["nargs"] = "+"
        if typing.get_origin(item) is Literal:
            kwargs["choices"] = typing.get_args(item)
        elif item in (int, float):
            kwargs["type"] = item
    elif kind in (int, float):
        kwargs["type"] = kind
    return [flag], kwargs


def add_settings_arguments(parser: argparse.ArgumentParser, model: type[Settings],
                           names: tuple[str, ...] | None = None) -> None:
    """One flag per field of ``model`` (or of ``names``)."""
    for name in names or model.model_fields:
        spec = argument(model, name)
        if spec is not None:
            parser.add_argument(*spec[0], **spec[1])


def _from_command_line(model: type[Settings], given: Mapping[str, Any]) -> dict[str, Any]:
    """Values as the models take them: KEY=VALUE lists → dicts, NAME=pair lists → dicts."""
    out = dict(given)
    for name, value in given.items():
        cli = (model.model_fields[name].json_schema_extra or {}).get("cli") \
            if name in model.model_fields else None
        if cli == "key=value":
            out[name] = parse_storage_options(value)
        elif cli == "benchmark":
            out[name] = dict(value)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="selfment", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO",
                        help="DEBUG, INFO, WARNING … (this package's loggers only)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help,
                           argument_default=argparse.SUPPRESS)
        p.add_argument("--config", metavar="FILE.yaml",
                       help="YAML config (any option; the command line wins)"
                            + (" (required)" if command.settings is ChainSettings else ""))
        add_settings_arguments(p, command.settings)
        if command.settings is ChainSettings:
            add_settings_arguments(p, StageSettings, RUN_TOP_LEVEL)
    from selfment_dist.pipeline.plan_command import add_plan_parser  # `selfment plan STAGE`
    add_plan_parser(sub, add_settings_arguments)
    return parser


# ---------------------------------------------------------------------------------------------
# Settings from the command line and --config, then the run

def _target(command: str) -> Callable[..., Any]:
    return load(COMMANDS[command].target)


def command_settings(command: str, given: Mapping[str, Any], config_uri: str | None = None
                     ) -> Settings | dict[str, Any]:
    """What the command runs with: the stage's (or the demo's) settings; for ``run``, the config
    with the command line merged in (checked by the chain's plan).

    Raises:
        SelfmentUserError (SettingsError, an unreadable config …): before anything runs.
    """
    model = COMMANDS[command].settings
    given = dict(given)
    top = _from_command_line(StageSettings, {k: given.pop(k) for k in RUN_TOP_LEVEL if k in given})
    given = _from_command_line(model, given)
    config = load_config(config_uri, top.get("storage_options")) if config_uri else {}
    if model is ChainSettings:
        from selfment_dist.pipeline.chain import plan

        if not config_uri:
            raise SettingsError(["run: --config is required"])
        config = with_overrides(config, "pipeline", given, top)
        plan(config)
        return config
    stage = COMMANDS[command].stage
    if stage is None or not stage.in_chain:  # the demo, and stages outside the chain
        values = {**values_for(config, model), **given, **top}
        return validate(model, values, model.section)
    from selfment_dist.pipeline.chain import stage_settings

    if "address" in top:  # over the stage's own section too
        given["address"] = top.pop("address")
    return stage_settings(with_overrides(config, stage.name, given, top), stage.name)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    level = args.log_level.upper()
    if not isinstance(logging.getLevelName(level), int):
        parser.error(f"--log-level {args.log_level!r} is not a log level (DEBUG, INFO, WARNING, "
                     "ERROR)")
    command = args.command
    if command == "plan":  # no settings object and no run: the plan is printed (plan_command)
        from selfment_dist.pipeline.plan_command import NOT_SETTINGS, STAGES, print_plan
        try:
            given = _from_command_line(STAGES[args.plan_stage],
                                       {k: v for k, v in vars(args).items()
                                        if k not in NOT_SETTINGS})
            print_plan(args, given)
        except (ValueError, FileNotFoundError) as err:
            parser.error(str(err) if isinstance(err, SettingsError) else f"plan: {err}")
        return 0
    given = {k: v for k, v in vars(args).items() if k not in ("command", "log_level", "config")}
    try:
        settings = command_settings(command, given, getattr(args, "config", None))
    except SelfmentUserError as err:
        parser.error(str(err) if isinstance(err, SettingsError) else f"{command}: {err}")
    storage_options = (settings.get("storage_options") if isinstance(settings, dict)
                       else getattr(settings, "storage_options", None))
    configure_logging(level, storage_options)
    from selfment_dist.pipeline.driver import call_as_driver  # ray:// runs the driver on the cluster

    try:
        if command == "run":
            summary = _target(command)(settings, config_uri=args.config)
        else:
            summary = call_as_driver(partial(_call_target, command),
                                     {"settings": settings,
                                      "address": getattr(settings, "address", None)})
    except SelfmentUserError as err:  # anything else is a bug: its traceback, exit 1
        logger.debug("user error", exc_info=True)
        problems = getattr(err, "problems", None)  # SettingsError: one line per problem
        _print_error("\n".join(problems) if problems
                     else " ".join(str(err).split()) or type(err).__name__)
        return USAGE_ERROR
    except Exception as err:
        if not isinstance(err, FencedError):
            raise
        _print_error(str(err))
        return 1
    if command != "demo":  # the demo prints its own short summary (all of it is in a file)
        print(json.dumps(summary, indent=2, default=str))
    return 0 if not (isinstance(summary, dict) and summary.get("failed")) else 1


def _call_target(command: str, settings: Settings, address: str | None = None) -> Any:
    """The command's function with its settings (``address`` only routes ``call_as_driver``);
    a stage's as the registry says it takes them."""
    target, stage = _target(command), COMMANDS[command].stage
    if stage is not None and not stage.takes_settings:
        return target(**{name: getattr(settings, name) for name in type(settings).model_fields})
    return target(settings)


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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
