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
``pipeline/_parts.py``: the container whose URI sorts first keeps the key).

A WebDataset shard must end with its end-of-archive marker: a shard cut short (inside a header,
inside a member, or just before the marker) gives the samples read so far plus an error row
naming the shard and its last complete sample.
"""
from __future__ import annotations

import logging
import posixpath
import tarfile
from collections import Counter, defaultdict
from typing import Container, Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from selfment_dist.io.images import DEFAULT_MAX_BYTES, IMAGE_EXTENSIONS, too_many_bytes
from selfment_dist.io.schema import PERMANENT, TRANSIENT
from selfment_dist.io.skip_rules import NOT_AN_IMAGE, SkipCounter, skipped_part
from selfment_dist.io.tar_members import member_value
from selfment_dist.io.storage import is_local, to_uri, url_to_fs

logger = logging.getLogger(__name__)

__all__ = ["enumerate_units", "iter_records", "container_keys", "container_key_array",
           "classify", "LIST_EXTENSIONS", "Units",
           "PARQUET_IMAGE_COLUMNS", "IMAGE", "PARQUET", "TAR"]

IMAGE, PARQUET, TAR = "image", "parquet", "tar"
#: Extensions of list files (one URI per line).
LIST_EXTENSIONS = frozenset({"txt", "lst", "list"})
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
#: Image columns looked for in parquet inputs, in order (binary, or a struct with ``bytes``).
PARQUET_IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp", "image", "img", "image_bytes", "bytes")
# Preference among several image members of one WebDataset sample.
_WDS_IMAGE_ORDER = ("jpg", "jpeg", "png", "webp")
_GLOB_CHARS = "*?["
_PARQUET_BATCH_ROWS = 64


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


def _strip_ext(rel: str) -> str:
    head, base = posixpath.split(rel)
    stem = base.rsplit(".", 1)[0] if "." in base else base
    return posixpath.join(head, stem) if head else stem


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
                    raise ValueError(f"two inputs give the same key {k!r}: {final[k]} and {uri}; "
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


def enumerate_units(inputs: str | Iterable[str], storage_options: dict | None = None) -> Units:
    """List the work units of ``inputs`` (see module docstring); no image is opened.

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
                raise FileNotFoundError(f"input glob matches no file: {uri}")
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
            raise FileNotFoundError(f"input not found: {uri}")
    units = col.units()
    logger.info("enumerated %d work units (%d image files, %d containers) from %d input(s)",
                len(units), sum(u["kind"] == IMAGE for u in units),
                sum(u["kind"] != IMAGE for u in units), len(inputs))
    return units


# ---------------------------------------------------------------------------------------------
# Expansion (worker side)



def _record(key, source, data=None, error=None, kind=None) -> dict:
    if error is not None and kind is None:
        kind = PERMANENT
    return {"key": key, "source": source, "data": data, "error": error,
            "error_kind": kind if error is not None else None}


def error_kind(exc: BaseException) -> str:
    """``transient`` for failures a re-run may not meet again (I/O, timeouts, throttling, the
    network), ``permanent`` for ones it will (missing files, bad data)."""
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError,
                        PermissionError)):
        return PERMANENT
    if isinstance(exc, (OSError, TimeoutError, ConnectionError)):
        return TRANSIENT
    module = type(exc).__module__ or ""
    if module.startswith(("botocore", "aiobotocore", "aiohttp", "urllib3", "requests",
                          "google", "azure", "s3fs", "gcsfs", "adlfs")):
        return TRANSIENT
    return PERMANENT


def _one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text[:500]


class _Dedup:
    """Suffixes keys repeated inside one container (``k#dup1``) so no row is lost or doubled."""

    def __init__(self):
        self.seen: Counter = Counter()

    def __call__(self, key: str) -> tuple[str, str | None]:
        self.seen[key] += 1
        n = self.seen[key] - 1
        if n == 0:
            return key, None
        return f"{key}#dup{n}", f"duplicate key {key!r} inside this file (occurrence {n + 1})"


def _iter_image(unit: dict, storage_options, max_bytes: int | None) -> Iterator[dict]:
    try:
        fs, path = url_to_fs(unit["uri"], storage_options)
        with fs.open(path, "rb") as f:
            size = getattr(f, "size", None)
            if size is None:
                size = fs.size(path)
            if max_bytes is not None and size is not None and size > max_bytes:
                yield _record(unit["key"], unit["uri"], error=too_many_bytes(size, max_bytes))
                return
            # Read one byte past the limit: a file that grew, or reports no size, still stops.
            data = f.read() if max_bytes is None else f.read(max_bytes + 1)
    except Exception as exc:
        yield _record(unit["key"], unit["uri"], error=f"cannot read file: {_one_line(exc)}",
                      kind=error_kind(exc))
        return
    if max_bytes is not None and len(data) > max_bytes:
        yield _record(unit["key"], unit["uri"], error=too_many_bytes(len(data), max_bytes))
        return
    yield _record(unit["key"], unit["uri"], data=data)


def _image_column(schema: pa.Schema) -> tuple[str | None, bool]:
    """(column name, is a struct with ``bytes``) of the image column of a parquet schema."""
    names = {n.lower(): n for n in schema.names}
    for cand in PARQUET_IMAGE_COLUMNS:
        name = names.get(cand)
        if name is None:
            continue
        typ = schema.field(name).type
        if pa.types.is_binary(typ) or pa.types.is_large_binary(typ):
            return name, False
        if pa.types.is_struct(typ) and typ.get_field_index("bytes") >= 0:
            return name, True
    return None, False


def _unskipped_batches(pf, columns: list[str], key_col: str | None, skip: Container[str],
                       dedup: "_Dedup"):
    """Record batches of ``pf``; a row group whose keys are all in ``skip`` is replaced by its
    row count after reading only its key column (a resume over a finished shard then reads no
    image bytes). Its keys still pass through ``dedup``, which must see every key."""
    for g in range(pf.metadata.num_row_groups):
        if skip and key_col:
            keys = [None if k is None else str(k)
                    for k in pf.read_row_group(g, columns=[key_col]).column(0).to_pylist()]
            fresh = len(set(keys)) == len(keys) and not any(dedup.seen[k] for k in keys)
            if fresh and all(k and k in skip for k in keys):  # no duplicate: keys stay as they are
                for k in keys:
                    dedup(k)
                yield len(keys)
                continue
        yield from pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=columns,
                                   row_groups=[g])


def _iter_parquet(unit: dict, storage_options, skip: Container[str],
                  max_bytes: int | None) -> Iterator[dict]:
    source, shard_key = unit["uri"], unit["key"]
    n_done = 0
    try:
        fs, path = url_to_fs(source, storage_options)
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            img_col, is_struct = _image_column(pf.schema_arrow)
            if img_col is None:
                raise ValueError("no image column: expected a binary column named one of "
                                 f"{', '.join(PARQUET_IMAGE_COLUMNS)}; found "
                                 f"{', '.join(pf.schema_arrow.names)}")
            names = set(pf.schema_arrow.names)
            key_col = "key" if "key" in names else None
            extra = [c for c in ("status", "error_message") if c in names]
            columns = [c for c in (key_col, img_col, *extra) if c]
            dedup = _Dedup()
            row = 0
            for batch in _unskipped_batches(pf, columns, key_col, skip, dedup):
                if isinstance(batch, int):  # a row group whose keys are all done
                    row += batch
                    continue
                cols = batch.to_pydict()
                for i in range(batch.num_rows):
                    raw_key = cols[key_col][i] if key_col else None
                    if raw_key is None or raw_key == "":
                        raw_key = f"{_strip_ext(shard_key)}/{row:09d}"
                    key, dup_error = dedup(str(raw_key))
                    row += 1
                    if key in skip:
                        continue
                    value = cols[img_col][i]
                    data = value.get("bytes") if is_struct and value is not None else value
                    error = dup_error
                    if error is None and not data:
                        why = "; ".join(f"{c}={cols[c][i]}" for c in extra if cols[c][i])
                        error = ("no image bytes in this row" if data is None
                                 else "empty image bytes (0 bytes)") + (f" ({why})" if why else "")
                    elif error is None and max_bytes is not None and len(data) > max_bytes:
                        error = too_many_bytes(len(data), max_bytes)
                    yield _record(key, source, data=None if error else data, error=error)
                    n_done += 1
    except Exception as exc:
        if shard_key not in skip:
            yield _record(shard_key, source, error=f"unreadable parquet file after {n_done} rows: "
                                                   f"{_one_line(exc)}", kind=error_kind(exc))


def _wds_split(name: str) -> tuple[str, str]:
    """WebDataset member name → (sample key, extension): the key ends at the basename's first dot."""
    head, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return (posixpath.join(head, stem) if head else stem), ext.lower()


class _EndAwareTarInfo(tarfile.TarInfo):
    """Notes on the archive how its member list ended: ``tarfile`` in stream mode reads a cut
    (end of data inside or instead of a header) as the end of the archive, silently."""

    @classmethod
    def fromtarfile(cls, tf):
        try:
            return super().fromtarfile(tf)
        except tarfile.EOFHeaderError:  # a block of zeros: the end-of-archive marker
            tf.selfment_end = "marker"
            raise
        except tarfile.EmptyHeaderError:
            tf.selfment_end = "no end-of-archive marker (the data stops between two members)"
            raise
        except tarfile.TruncatedHeaderError:
            tf.selfment_end = "cut inside a member header"
            raise
        except tarfile.HeaderError as exc:
            tf.selfment_end = f"invalid member header ({exc})"
            raise


def _iter_tar(unit: dict, storage_options, skip: Container[str],
              max_bytes: int | None) -> Iterator[dict]:
    source, shard_key = unit["uri"], unit["key"]
    dedup = _Dedup()
    n_done = n_skipped = 0
    last_good: str | None = None
    sample_key: str | None = None
    members: dict[str, bytes | str | None] = {}

    def flush() -> Iterator[dict]:
        if sample_key is None:
            return
        key, dup_error = dedup(sample_key)
        if key in skip:
            return
        if dup_error:
            yield _record(key, source, error=dup_error)
            return
        images = [e for e in _WDS_IMAGE_ORDER if e in members] + \
                 [e for e in members if e in IMAGE_EXTENSIONS and e not in _WDS_IMAGE_ORDER]
        if not images:
            found = ", ".join("." + e for e in sorted(members)) or "nothing"
            yield _record(key, source, error=f"WebDataset sample has no image member (found {found})")
        elif isinstance(members[images[0]], str):  # over the byte limit: its message
            yield _record(key, source, error=members[images[0]])
        else:
            yield _record(key, source, data=members[images[0]])

    def where() -> str:
        return f"after {n_done} samples (last complete sample: " \
               f"{last_good if last_good is not None else 'none'})"

    try:
        fs, path = url_to_fs(source, storage_options)
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*",
                                                    tarinfo=_EndAwareTarInfo) as tf:
            for member in tf:
                if member.isdir():
                    continue  # structure, not an image (docs/inputs.md)
                if skipped_part(member.name):  # ._* resource forks, .DS_Store (skip_rules)
                    n_skipped += 1
                    continue
                key, ext = _wds_split(member.name)
                # A name repeated in a row (``tar -r``) starts a new sample: _Dedup then gives it
                # its #dup<n> key and error row, as a repeat anywhere else in the shard.
                if key != sample_key or ext in members:
                    for rec in flush():
                        yield rec
                    if sample_key is not None:
                        n_done += 1
                        last_good = sample_key
                    sample_key, members = key, {}
                members[ext] = member_value(tf, member, ext, max_bytes)
            if n_skipped:
                logger.warning("%s: skipped %d members by name (docs/inputs.md: ._*, .DS_Store "
                               "…)", source, n_skipped)
            # The pending sample's members were read whole, so it is yielded even when the
            # shard was cut right after them.
            for rec in flush():
                yield rec
            if sample_key is not None:
                n_done += 1
                last_good = sample_key
            end = getattr(tf, "selfment_end", None)
            if end == "marker":
                return
            if shard_key not in skip:
                yield _record(shard_key, source, error=f"truncated WebDataset shard: "
                                                       f"{end or 'no end-of-archive marker'} "
                                                       f"{where()}")
    except Exception as exc:
        if shard_key not in skip:
            yield _record(shard_key, source, error=f"unreadable WebDataset shard {where()}: "
                                                   f"{_one_line(exc)}", kind=error_kind(exc))


def container_keys(unit: dict, *, storage_options: dict | None = None) -> list[str] | None:
    """The keys :func:`iter_records` gives rows to for ``unit`` when nothing fails, told without
    reading any image bytes (a parquet file's ``key`` column; no column: its row numbers), so a
    resume can leave out containers whose keys are all done.

    Returns:
        the keys, with the ``#dup<n>`` suffixes of repeats; for a parquet file without an image
        column, the file's own key (its error row); ``None`` when the keys cannot be told
        without reading the whole container (tar shards, unreadable files).
    """
    kind, shard_key = unit["kind"], unit["key"]
    if kind == IMAGE:
        return [shard_key]
    if kind != PARQUET:
        return None
    try:
        fs, path = url_to_fs(unit["uri"], storage_options)
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            if _image_column(pf.schema_arrow)[0] is None:
                return [shard_key]
            if "key" in pf.schema_arrow.names:
                raw = pf.read(columns=["key"]).column(0).to_pylist()
            else:
                raw = [None] * pf.metadata.num_rows
    except Exception as exc:  # the read task reports it, with its error row
        logger.debug("keys of %s unknown without reading it: %s", unit["uri"], exc)
        return None
    dedup = _Dedup()
    stem = _strip_ext(shard_key)
    # The same naming as _iter_parquet: empty keys by row number, repeats suffixed.
    return [dedup(f"{stem}/{i:09d}" if k is None or k == "" else str(k))[0]
            for i, k in enumerate(raw)]


def container_key_array(unit: dict, *, storage_options: dict | None = None) -> pa.Array | None:
    """:func:`container_keys` as an arrow string array. A parquet file whose ``key`` column is
    plain (strings, none empty, none repeated: img2dataset's) is taken as it is, with no Python
    object per key; other files go through :func:`container_keys`."""
    if unit["kind"] == PARQUET:
        try:
            fs, path = url_to_fs(unit["uri"], storage_options)
            with fs.open(path, "rb") as f:
                pf = pq.ParquetFile(f)
                names = pf.schema_arrow.names
                if "key" in names and _image_column(pf.schema_arrow)[0] is not None \
                        and pa.types.is_string(pf.schema_arrow.field("key").type):
                    keys = pf.read(columns=["key"]).column(0).combine_chunks()
                    plain = keys.null_count == 0 and not pc.any(pc.equal(keys, "")).as_py() \
                        and pc.count_distinct(keys).as_py() == len(keys)
                    if plain:
                        return keys
        except Exception:  # container_keys below says None for an unreadable file
            pass
    keys = container_keys(unit, storage_options=storage_options)
    return None if keys is None else pa.array(keys, type=pa.string())


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
        raise ValueError(f"unknown work unit kind {kind!r}")
