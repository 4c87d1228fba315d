"""Storage: one door to local disk and every fsspec filesystem (s3://, gs://, …).

Everything in the package reaches files through :func:`url_to_fs`, so a local path and an object
store URL behave the same; ``storage_options`` (``--storage-option KEY=VALUE`` on the command
line, e.g. ``endpoint_url=http://127.0.0.1:9000``) are handed to the fsspec filesystem.
"""
from __future__ import annotations

import json
import posixpath
from typing import Any, Iterable

import fsspec
from fsspec.implementations.local import LocalFileSystem

from selfment_dist.errors import UserInputNotFoundError, UserPermissionError, UserValueError
from selfment_dist.io.reachability import check_reachable

__all__ = ["parse_storage_options", "url_to_fs", "join", "is_local", "to_uri", "protocol_of",
           "read_file", "read_json"]

_TRUE = {"true", "yes", "on"}
_FALSE = {"false", "no", "off"}
_NONE = {"none", "null"}


def _parse_value(text: str) -> Any:
    """``"3"`` → 3, ``"0.5"`` → 0.5, ``"true"``/``"false"`` → bool, ``"none"`` → None,
    ``{...}``/``[...]`` → JSON; anything else stays a string."""
    low = text.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    if low in _NONE:
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if text[:1] in "{[":
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            pass
    return text


def parse_storage_options(pairs: Iterable[str] | None) -> dict[str, Any]:
    """Turn ``["KEY=VALUE", ...]`` into fsspec storage options.

    Values are parsed: integers, floats, booleans (``true``/``false``/``yes``/``no``/``on``/``off``),
    ``none``/``null`` and JSON objects/arrays; everything else is kept as a string (the first
    ``=`` splits, so values may hold ``=``). A dotted key nests: ``client_kwargs.region_name=eu``
    → ``{"client_kwargs": {"region_name": "eu"}}``.

    Raises:
        ValueError: on an item without ``=`` or with an empty key.
    """
    options: dict[str, Any] = {}
    for item in pairs or ():
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserValueError(f"storage option {item!r} is not KEY=VALUE")
        *parents, leaf = key.split(".")
        node = options
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UserValueError(f"storage option {item!r}: {part!r} is already set to a value")
            node = child
        node[leaf] = _parse_value(value)
    return options


def url_to_fs(uri: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """``(filesystem, path inside it)`` for a local path or any fsspec URL.

    Raises:
        StorageUnreachableError: the object store endpoint named in ``storage_options`` does
            not answer (checked once per process, within seconds: see ``io/reachability.py``).
    """
    check_reachable(uri, storage_options)
    fs, path = fsspec.core.url_to_fs(str(uri), **(storage_options or {}))
    return fs, path


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """True for the local filesystem (where rename is atomic and paths need no protocol)."""
    return isinstance(fs, LocalFileSystem)


def protocol_of(fs: fsspec.AbstractFileSystem) -> str:
    proto = fs.protocol
    return proto[0] if isinstance(proto, (tuple, list)) else proto


def to_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The URI of ``path`` inside ``fs``: a plain path for local files, ``proto://path`` else."""
    if is_local(fs):
        return path
    return fs.unstrip_protocol(path)


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a local path or URL with ``/`` (``join("s3://b/out", "x.parquet")``)."""
    uri = str(uri)
    scheme, sep, rest = uri.partition("://")
    if not sep:
        scheme, rest = "", uri
    joined = posixpath.join(rest, *(p.strip("/") for p in parts if p))
    return f"{scheme}://{joined}" if scheme else joined


def read_file(fs: fsspec.AbstractFileSystem, path: str, what: str) -> bytes:
    """The bytes of the file ``path`` on ``fs``, a file the user named; ``what`` names it (with
    its path) in the one-line errors.

    Raises:
        UserInputNotFoundError: no such file (also when a folder above it is a file).
        UserValueError: a folder (on an object store: a prefix with objects under it).
        UserPermissionError: a file this process may not read.
    """
    try:
        return fs.cat_file(path)
    except IsADirectoryError:
        raise UserValueError(f"{what} is a folder, not a file") from None
    except NotADirectoryError:
        raise UserInputNotFoundError(f"{what} not found (a folder above it is a file)") from None
    except FileNotFoundError:
        if fs.isdir(path):
            raise UserValueError(f"{what} is a folder, not a file") from None
        raise UserInputNotFoundError(f"{what} not found") from None
    except PermissionError:
        raise UserPermissionError(f"{what} cannot be read: permission denied") from None


def read_json(fs: fsspec.AbstractFileSystem, path: str) -> Any:
    """The JSON document at ``path`` on ``fs``, or None where there is no such file (also when
    a parent of ``path`` is a file: the caller's check of that folder says what is wrong).

    Raises:
        UserValueError: the file is not JSON (corrupt, truncated, or another kind of file).
    """
    try:
        with fs.open(path, "rb") as f:
            data = f.read()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except IsADirectoryError:
        raise UserValueError(f"{path} is a folder, not a JSON file") from None
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserValueError(f"{path} is not a readable JSON document ({exc}); move it away "
                             "or restore it") from None
