"""Input sources: enumerate inputs into file-level work units; expand one unit into records.

Two steps, so that whoever holds the list of work (the Ray driver) never holds image bytes:

1. :func:`enumerate_units` (driver): lists files only. Each unit is a plain dict
   ``{"kind": "image"|"parquet"|"tar", "uri": str, "key": str}`` — for an image, ``key`` is the
   image's key; for a container (parquet file, tar shard) it names the container itself and is
   used only for a row that reports the whole container unreadable.
2. :func:`iter_records` (worker): opens one unit and yields records
   ``{"key": str, "source": str, "data": bytes | None, "error": str | None,
   "error_kind": "transient" | "permanent" | None}`` — exactly one per image (``data`` set) or
   per thing that failed (``error`` set; ``error_kind`` says whether a re-run retries it: I/O
   failures, timeouts and throttling are ``transient``, bad data is ``permanent``).

Byte limit: an image file, a tar member or a parquet cell larger than ``max_bytes`` becomes an
error row; files and tar members are checked by their size before they are read.

Accepted inputs (local paths or any fsspec URL), mixed freely:

- a folder (searched recursively) or a glob (``s3://b/imgs/**/*.jpg``): image files, parquet
  files and tar shards inside are all taken, whatever their names start with (``_DSC1234.JPG``,
  ``_selects/``); only the few names of :mod:`.skip_rules` (hidden ``.`` names, system litter,
  job markers, selfment's own outputs) are skipped, and every skipped file is counted
  (``enumerate_units(...).skipped``). A path is taken as written when it exists, even with
  ``*``, ``?`` or ``[`` in it (a folder ``photos [2020]``); otherwise those make it a glob
  (``docs/inputs.md``);
- a list file (``.txt``/``.lst``/``.list``): one URI or path per line (relative paths are relative
  to the list file; blank lines and ``#`` comments are skipped);
- a single image, parquet file (img2dataset layout: a binary image column such as ``jpg``/
  ``png``/``webp``/``image`` plus ``key``) or WebDataset tar shard (``.tar``, ``.tar.gz``, ``.tgz``).

Keys (stable across runs, ``docs/architecture.md``): for image files the path relative to the
input root (the folder, the glob's fixed prefix, the list's common folder) without the extension
(``sub/dir/name``); when two files would share a key (``a.jpg`` and ``a.png``) both keep their
extension (``a.jpg``, ``a.png``). For parquet: the ``key`` column (or ``<file key>/<row index>``
when there is none). For WebDataset: the sample's ``__key__`` (member path up to the first dot of
its basename); every regular member is read, links and special files (symlinks, hard links,
devices, fifos) give an error row and are never followed, folder members are structure (no row),
and members named by :mod:`.skip_rules` (``._*``, ``.DS_Store``) are skipped and logged. Keys
repeated inside one container (also one name twice in a row, as ``tar -r`` appends) get a
``#dup<n>`` suffix and an error row;
keys repeated across containers are resolved by the pipeline after writing (see
``pipeline/_internal/parts.py``: the container whose URI sorts first keeps the key).

A WebDataset shard must end with its end-of-archive marker: a shard cut short (inside a header,
inside a member, or just before the marker) gives the samples read so far plus an error row
naming the shard and its last complete sample.

The readers live by container kind: :mod:`.records` (the record, one image file),
:mod:`.parquet_source`, :mod:`.tar_source`; this module lists inputs and dispatches.
"""
from __future__ import annotations

import logging
import posixpath
from collections import Counter, defaultdict
from typing import Container, Iterable, Iterator

from selfment_dist.io.images import DEFAULT_MAX_BYTES, IMAGE_EXTENSIONS
from selfment_dist.io.parquet_source import (PARQUET_IMAGE_COLUMNS, _iter_parquet,
                                             container_key_array, container_keys)
from selfment_dist.io.records import IMAGE, PARQUET, TAR, _iter_image, _strip_ext, error_kind
from selfment_dist.io.skip_rules import NOT_AN_IMAGE, SkipCounter, skipped_part
from selfment_dist.io.storage import is_local, to_uri, url_to_fs
from selfment_dist.io.tar_source import _iter_tar
from selfment_dist.errors import UserInputNotFoundError, UserValueError

logger = logging.getLogger(__name__)

__all__ = ["enumerate_units", "iter_records", "container_keys", "container_key_array",
           "classify", "error_kind", "LIST_EXTENSIONS", "Units",
           "PARQUET_IMAGE_COLUMNS", "IMAGE", "PARQUET", "TAR"]

#: Extensions of list files (one URI per line).
LIST_EXTENSIONS = frozenset({"txt", "lst", "list"})
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_GLOB_CHARS = "*?["


# ---------------------------------------------------------------------------------------------
# Enumeration (driver side)

def _ext(path: str) -> str:
    base = posixpath.basename(path)
    return base.rsplit(".", 1)[-1].lower() if "." in base else ""


def classify(path: str) -> str | None:
    """``"image"``, ``"parquet"``, ``"tar"``, ``"list"`` or None (not an input) by file name."""
    low = path.lower()
    if low.endswith(_TAR_SUFFIXES):
        return TAR
    ext = _ext(path)
    if ext == "parquet":
        return PARQUET
    if ext in IMAGE_EXTENSIONS:
        return IMAGE
    if ext in LIST_EXTENSIONS:
        return "list"
    return None




def _glob_root(path: str) -> str:
    parts = path.split("/")
    fixed = []
    for part in parts:
        if any(c in part for c in _GLOB_CHARS):
            break
        fixed.append(part)
    return "/".join(fixed)


class _Collector:
    """Accumulates units from several inputs; resolves key collisions at the end."""

    def __init__(self):
        self.images: list[tuple[str, str, str]] = []   # (uri, rel path with extension, root)
        self.containers: list[dict] = []
        self.ignored = Counter()
        self.skipped = SkipCounter()

    def add_file(self, fs, path: str, root: str, *, explicit: bool = False) -> None:
        rel = posixpath.relpath(path, root) if root else posixpath.basename(path)
        kind = classify(path)
        if kind is None and explicit:
            kind = IMAGE  # a file named on purpose is tried as an image; decoding tells
        if kind == "list" and explicit:
            self.add_list(fs, path)
            return
        if kind in (PARQUET, TAR):
            self.containers.append({"kind": kind, "uri": to_uri(fs, path), "key": rel})
        elif kind == IMAGE:
            self.images.append((to_uri(fs, path), rel, root))
        else:
            self.ignored[_ext(path) or "(none)"] += 1
            self.skipped.add(NOT_AN_IMAGE, rel)

    def add_tree(self, fs, paths: Iterable[str], root: str) -> None:
        for path in sorted(paths):
            rel = posixpath.relpath(path, root)
            skipped = skipped_part(rel)
            if skipped:  # counted, never silent (skip_rules)
                self.skipped.add(skipped[1], skipped[0])
                continue
            self.add_file(fs, path, root)

    def add_list(self, fs, list_path: str, storage_options: dict | None = None) -> None:
        base = posixpath.dirname(list_path)
        with fs.open(list_path, "rt", encoding="utf-8") as f:
            lines = [ln.strip() for ln in f]
        entries = [ln for ln in lines if ln and not ln.startswith("#")]
        resolved = []
        for entry in entries:
            if "://" in entry:
                efs, epath = url_to_fs(entry, storage_options)
            elif entry.startswith("/"):
                efs, epath = url_to_fs(entry) if is_local(fs) else (fs, entry.lstrip("/"))
            else:
                efs, epath = fs, posixpath.normpath(posixpath.join(base, entry))
            resolved.append((efs, epath))
        if not resolved:
            logger.warning("list file %s names no inputs", list_path)
            return
        root = posixpath.commonpath([posixpath.dirname(p) or "." for _, p in resolved]) \
            if len({type(efs) for efs, _ in resolved}) == 1 else ""
        for efs, epath in resolved:
            self.add_file(efs, epath, root, explicit=True)

    def units(self) -> "Units":
        by_key: dict[str, list[tuple[str, str]]] = defaultdict(list)
        for uri, rel, _root in self.images:
            by_key[_strip_ext(rel)].append((uri, rel))
        units = []
        final: dict[str, str] = {}
        for key, items in by_key.items():
            for uri, rel in items:
                k = key if len(items) == 1 else rel  # a.jpg + a.png: both keep the extension
                if k in final:
                    raise UserValueError(f"two inputs give the same key {k!r}: {final[k]} and {uri}; "
                                     "pass inputs whose relative paths differ")
                final[k] = uri
                units.append({"kind": IMAGE, "uri": uri, "key": k})
        units.sort(key=lambda u: u["key"])
        if self.ignored:
            logger.info("skipped files that are not inputs, by extension: %s",
                        dict(self.ignored.most_common(10)))
        skipped = self.skipped.report()
        if skipped["total"]:
            logger.warning("skipped %d input files on purpose (%s), e.g. %s; see docs/inputs.md",
                           skipped["total"], skipped["by_reason"], skipped["examples"][:3])
        return Units(units + self.containers, skipped=skipped)


class Units(list):
    """The work units (a plain list of dicts) and ``skipped``: the files passed over while
    listing, ``{"total", "by_reason", "examples"}`` (:class:`.skip_rules.SkipCounter`)."""

    def __init__(self, units: Iterable[dict] = (), *, skipped: dict | None = None):
        super().__init__(units)
        self.skipped = skipped or SkipCounter().report()


def _is_glob(fs, path: str) -> bool:
    """A path with ``*``, ``?`` or ``[`` is a glob unless it exists as written (a folder
    ``photos [2020]``); a one-character class (``[g]``) forces a glob (docs/inputs.md)."""
    return any(c in path for c in _GLOB_CHARS) and not fs.exists(path)


def enumerate_units(inputs: str | Iterable[str], storage_options: dict | None = None, *,
                    quiet: bool = False) -> Units:
    """List the work units of ``inputs`` (see module docstring); no image is opened.

    ``quiet``: log the count at DEBUG, not INFO (a caller that lists one file at a time).

    Returns:
        units sorted by key, image files first: ``{"kind", "uri", "key"}`` dicts, as a list
        whose ``skipped`` attribute counts the files skipped on purpose (see :class:`Units`).
    Raises:
        FileNotFoundError: an input that does not exist (or a glob that matches nothing).
        ValueError: two inputs that would give the same key.
    """
    inputs = [inputs] if isinstance(inputs, str) else list(inputs)
    col = _Collector()
    for uri in inputs:
        fs, path = url_to_fs(uri, storage_options)
        path = path.rstrip("/") or path
        if _is_glob(fs, path):
            matches = [p for p in fs.glob(path) if fs.isfile(p)]
            if not matches:
                raise UserInputNotFoundError(f"input glob matches no file: {uri}")
            col.add_tree(fs, matches, _glob_root(path))
        elif fs.isdir(path):
            col.add_tree(fs, fs.find(path), path)
        elif fs.isfile(path):
            kind = classify(path)
            if kind == "list":
                col.add_list(fs, path, storage_options)
            else:
                col.add_file(fs, path, posixpath.dirname(path), explicit=True)
        else:
            raise UserInputNotFoundError(f"input not found: {uri}")
    units = col.units()
    (logger.debug if quiet else logger.info)(
        "enumerated %d work units (%d image files, %d containers) from %d input(s)",
        len(units), sum(u["kind"] == IMAGE for u in units),
        sum(u["kind"] != IMAGE for u in units), len(inputs))
    return units


# ---------------------------------------------------------------------------------------------
# Expansion (worker side)


def iter_records(unit: dict, *, storage_options: dict | None = None,
                 skip: Container[str] = frozenset(),
                 max_bytes: int | None = DEFAULT_MAX_BYTES) -> Iterator[dict]:
    """Expand one work unit into records (see module docstring); never raises for bad data.

    Args:
        unit: a dict from :func:`enumerate_units`.
        skip: keys not to yield (already done, e.g. on resume).
        max_bytes: largest accepted encoded image, in bytes (None: no limit).
    Yields:
        ``{"key", "source", "data": bytes | None, "error": str | None, "error_kind"}``.
    """
    kind = unit["kind"]
    if kind == IMAGE:
        if unit["key"] not in skip:
            yield from _iter_image(unit, storage_options, max_bytes)
    elif kind == PARQUET:
        yield from _iter_parquet(unit, storage_options, skip, max_bytes)
    elif kind == TAR:
        yield from _iter_tar(unit, storage_options, skip, max_bytes)
    else:
        raise UserValueError(f"unknown work unit kind {kind!r}")
