"""YAML configuration: read a file, pick what applies to a command, merge under the command line.

A config file is a mapping. Keys may be spelt with ``-`` or ``_``. Top-level keys apply to
every command that takes them (``address``, ``storage_options`` …); a section named after a
command (``pseudo_label:``, ``train:``, ``segment:``, ``evaluate:``, ``demo:``) applies to that
command only and wins over the top level. The command line wins over both, and whatever is
set nowhere takes the pipeline function's own default (the one source of truth).

    address: auto
    storage_options: {endpoint_url: "http://127.0.0.1:9000"}
    pseudo_label: {input: [s3://bucket/images/], output: s3://bucket/labels, image_size: 768}
    train: {labels: s3://bucket/labels, output: s3://bucket/model, workers: 8, use_gpu: true}
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import yaml

from .io.storage import url_to_fs

COMMANDS = ("pseudo_label", "train", "segment", "evaluate", "demo")


def normalise_key(key: str) -> str:
    return str(key).strip().replace("-", "_")


def read_config(uri: str, storage_options: dict | None = None) -> dict[str, Any]:
    """Read a YAML mapping from a local path or fsspec URL (keys normalised to ``snake_case``)."""
    fs, path = url_to_fs(uri, storage_options)
    if not fs.exists(path):
        raise FileNotFoundError(f"config file not found: {uri}")
    try:
        with fs.open(path, "r") as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as exc:  # syntax errors, and tags such as !!python/object (refused)
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ValueError(f"config {uri}: not valid YAML{at}: {problem}") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"config {uri}: not a text file ({exc.reason})") from None
    except IsADirectoryError:
        raise ValueError(f"config {uri} is a folder, not a YAML file") from None
    if not isinstance(data, Mapping):
        raise ValueError(f"config {uri} must be a YAML mapping, got {type(data).__name__}")
    return _normalise(data)


def _normalise(data: Mapping) -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        key = normalise_key(key)
        # Sections are mappings of options; option values that are mappings (storage_options,
        # benchmarks) keep their own keys as written.
        out[key] = _normalise(value) if key in COMMANDS and isinstance(value, Mapping) else value
    return out


def options_for(config: Mapping[str, Any], command: str, accepted: Iterable[str],
                known_anywhere: Iterable[str] = ()) -> dict[str, Any]:
    """The options of ``config`` that apply to ``command``.

    Args:
        config: as returned by :func:`read_config`.
        command: a name of :data:`COMMANDS`.
        accepted: option names the command takes.
        known_anywhere: option names some other command takes (ignored here, not an error).
    Raises:
        ValueError: for a key no command knows (most likely a typo), naming the valid ones.
    """
    accepted = set(accepted)
    known = accepted | set(known_anywhere) | set(COMMANDS)
    unknown = sorted(k for k in config if k not in known)
    section = config.get(command) or {}
    if not isinstance(section, Mapping):
        raise ValueError(f"config section {command!r} must be a mapping")
    unknown += sorted(f"{command}.{k}" for k in section if k not in accepted)
    if unknown:
        raise ValueError(f"unknown config option(s) {', '.join(unknown)} for '{command}'; "
                         f"valid: {', '.join(sorted(accepted))}")
    merged = {k: v for k, v in config.items() if k in accepted}
    merged.update(section)
    return merged


def merge_options(defaults_from_config: Mapping[str, Any], from_cli: Mapping[str, Any]) -> dict[str, Any]:
    """Command line over config; ``storage_options`` dicts merge key by key (CLI wins)."""
    merged = dict(defaults_from_config)
    for key, value in from_cli.items():
        if key == "storage_options" and isinstance(merged.get(key), Mapping):
            merged[key] = {**merged[key], **(value or {})}
        else:
            merged[key] = value
    return merged
