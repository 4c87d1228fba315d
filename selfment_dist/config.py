"""YAML configuration: read a file, pick what applies to a settings model, merge the command line.

A config file is a mapping. Keys may be spelt with ``-`` or ``_``, and like the option (``inputs``)
or like its flag (``input``; ``non_binary_graph: true`` means ``binary_graph: false``). Top-level
keys apply to every stage that takes them (``address``, ``storage_options`` …); a section named
after a stage (``pseudo_label:``, ``train:``, ``segment:``, ``evaluate:``) applies to that stage
only and wins over the top level; ``pipeline:`` holds the chain's settings
(:class:`~selfment_dist.settings.ChainSettings`) and ``demo:`` the demo's. The command line wins
over both, and whatever is set nowhere takes the settings model's default (the one source of
truth, :mod:`selfment_dist.settings`).

    address: auto
    storage_options: {endpoint_url: "http://127.0.0.1:9000"}
    pseudo_label: {input: [s3://bucket/images/], output: s3://bucket/labels, image_size: 768}
    train: {labels: s3://bucket/labels, output: s3://bucket/model, workers: 8, use_gpu: true}

Refused when read, each with one line (docs/inputs.md): a file that expands to more than
:data:`MAX_CONFIG_VALUES` values (a YAML "billion laughs": aliases repeating a structure; small
anchors and merge keys are fine), a section that is not a mapping, and one option set twice in
one mapping under two spellings (``image_size`` and ``image-size``, ``input`` and ``inputs``).
"""
from __future__ import annotations

from typing import Any, Mapping

import yaml

from selfment_dist.errors import SelfmentUserError
from selfment_dist.io.storage import url_to_fs
from selfment_dist.settings import ChainSettings, DemoSettings, Settings, SettingsError, flag_of
from selfment_dist.stages import STAGES
from selfment_dist.errors import UserInputNotFoundError, UserValueError

#: Sections of a config file: one per stage (the registry's), the chain's and the demo's.
SECTIONS = (*(s.name for s in STAGES), "pipeline", "demo")
#: Most values (mappings, lists, keys and scalars, counted as expanded) a config may hold: real
#: configs hold a few hundred; a YAML alias bomb expands to billions from a few hundred bytes,
#: which validation (and its error messages) would otherwise walk.
MAX_CONFIG_VALUES = 100_000


class ConfigError(SelfmentUserError, ValueError):
    """A config file that cannot be read as settings (one line, exit 2)."""


def normalise_key(key: str) -> str:
    return str(key).strip().replace("-", "_")


def read_config(uri: str, storage_options: dict | None = None) -> dict[str, Any]:
    """Read a YAML mapping from a local path or fsspec URL (keys normalised to ``snake_case``)."""
    fs, path = url_to_fs(uri, storage_options)
    if not fs.exists(path):
        raise UserInputNotFoundError(f"config file not found: {uri}")
    try:
        with fs.open(path, "r") as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as exc:  # syntax errors, and tags such as !!python/object (refused)
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserValueError(f"config {uri}: not valid YAML{at}: {problem}") from None
    except UnicodeDecodeError as exc:
        raise UserValueError(f"config {uri}: not a text file ({exc.reason})") from None
    except IsADirectoryError:
        raise UserValueError(f"config {uri} is a folder, not a YAML file") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"config {uri} must be a YAML mapping, got {type(data).__name__}")
    _check_expanded_size(data, uri)
    config = _normalise(data, f"config {uri}: ")
    _check_spellings(config, uri)
    return config


def _check_expanded_size(data: Any, uri: str) -> None:
    """Refuse a config that expands to more than MAX_CONFIG_VALUES values; stops counting there,
    so a bomb (or a structure that holds itself, ``&a [*a]``) costs a few milliseconds."""
    stack, n = [data], 0
    while stack:
        node = stack.pop()
        n += 1
        if n > MAX_CONFIG_VALUES:
            raise ConfigError(f"config {uri} expands to more than {MAX_CONFIG_VALUES:,} values "
                              "(YAML aliases repeating a structure?); refused")
        if isinstance(node, Mapping):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)


def _normalise(data: Mapping, where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    spelt: dict[str, Any] = {}
    for key, value in data.items():
        name = normalise_key(key)
        if name in spelt:
            raise ConfigError(f"{where}{spelt[name]} and {key} are the same option; keep one")
        spelt[name] = key
        if name in SECTIONS and value is not None and not isinstance(value, Mapping):
            shown = repr(value)
            raise ConfigError(f"{where}{name}: must be a mapping of options, got "
                              f"{shown if len(shown) <= 60 else shown[:57] + '...'}")
        # Sections are mappings of options; option values that are mappings (storage_options,
        # benchmarks) keep their own keys as written.
        out[name] = _normalise(value, f"{where}{name}: ") if name in SECTIONS and value else value
    return out


def _check_spellings(config: Mapping[str, Any], uri: str) -> None:
    """Refuse one option set twice in one mapping under two of its spellings (``input`` and
    ``inputs``, ``binary_graph`` and ``non_binary_graph``): which one wins would be a guess."""
    models = (*(s.settings for s in STAGES), ChainSettings, DemoSettings)
    top = [k for k in config if k not in SECTIONS]
    for model in models:
        for where, keys in (("", top), (f"{model.section}: ", config.get(model.section) or ())):
            seen: dict[str, str] = {}
            spelling = aliases(model)
            for key in keys:
                name = spelling.get(key, (None,))[0]
                if name is not None and name in seen:
                    raise ConfigError(f"config {uri}: {where}{seen[name]} and {key} both set "
                                      f"{name}; keep one")
                if name is not None:
                    seen[name] = key


def load_config(uri: str, cli_storage_options: dict | None = None) -> dict[str, Any]:
    """The config at ``uri`` with ``--storage-option`` values merged over its ``storage_options``."""
    config = read_config(uri, cli_storage_options or None)
    if cli_storage_options:
        config.update(merge_options({"storage_options": config.get("storage_options") or {}},
                                    {"storage_options": cli_storage_options}))
    return config


def aliases(model: type[Settings]) -> dict[str, tuple[str, bool]]:
    """Each spelling of ``model``'s options → ``(field name, inverted)``.

    A field answers to its name and to its flag without dashes (``input`` for ``inputs``);
    ``inverted`` marks a negative flag's spelling (``non_binary_graph``, ``no_progress``).
    """
    out: dict[str, tuple[str, bool]] = {}
    for name, info in model.model_fields.items():
        out[normalise_key(flag_of(model, name).lstrip("-"))] = (name, False)
        negative = (info.json_schema_extra or {}).get("negative_flag")
        if negative:
            out[normalise_key(negative.lstrip("-"))] = (name, True)
        out[name] = (name, False)
    return out


def _rename(values: Mapping[str, Any], model: type[Settings]) -> dict[str, Any]:
    spelling = aliases(model)
    out = {}
    for key, value in values.items():
        name, inverted = spelling.get(key, (key, False))
        out[name] = (not value) if inverted and isinstance(value, bool) else value
    return out


def _top_level_names() -> set[str]:
    names: set[str] = set(SECTIONS)
    for model in (*(s.settings for s in STAGES), DemoSettings):
        names |= set(aliases(model))
    return names


def values_for(config: Mapping[str, Any], model: type[Settings], *, section: str | None = None,
               top_level: bool = True) -> dict[str, Any]:
    """The values ``config`` sets for ``model``: its section over the top-level keys it takes.

    Keys come back as field names (flag spellings renamed, negative flags inverted); the values
    are not validated yet (the caller may still add to them, see ``pipeline.chain``).

    Raises:
        SettingsError: a top-level key no stage takes, or a key the section's model lacks (most
            likely typos), naming the valid ones.
    """
    section = section or model.section
    problems = [f"{key}: unknown top-level option" for key in config
                if key not in _top_level_names()] if top_level else []
    raw = config.get(section)
    if raw is not None and not isinstance(raw, Mapping):
        raise SettingsError([f"{section}: must be a mapping of options, got {raw!r}"])
    own = _rename(raw or {}, model)
    problems += [f"{section}.{key}: unknown option; valid: {', '.join(sorted(model.model_fields))}"
                 for key in own if key not in model.model_fields]
    if problems:
        raise SettingsError(problems)
    values = {}
    if top_level:
        top = _rename({k: v for k, v in config.items() if k not in SECTIONS}, model)
        values = {k: v for k, v in top.items() if k in model.model_fields}
    values.update(own)
    return values


def merge_options(defaults_from_config: Mapping[str, Any], from_cli: Mapping[str, Any]) -> dict[str, Any]:
    """Command line over config; ``storage_options`` dicts merge key by key (CLI wins)."""
    merged = dict(defaults_from_config)
    for key, value in from_cli.items():
        if key == "storage_options" and isinstance(merged.get(key), Mapping):
            merged[key] = {**merged[key], **(value or {})}
        else:
            merged[key] = value
    return merged


def with_overrides(config: Mapping[str, Any], section: str, values: Mapping[str, Any],
                   top_level: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``config`` with the command line's ``values`` over ``section`` and ``top_level`` over the
    top level; ``storage_options`` merge key by key (also into a section that has its own)."""
    out = dict(config)
    out[section] = merge_options(out.get(section) or {}, values)
    top_level = dict(top_level or {})
    out.update(merge_options({k: out[k] for k in top_level if k in out}, top_level))
    if "storage_options" in top_level and isinstance(out[section].get("storage_options"), Mapping):
        out[section] = merge_options(out[section],
                                     {"storage_options": top_level["storage_options"]})
    return out
