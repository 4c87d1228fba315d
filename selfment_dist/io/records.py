"""Records and error rows shared by the input readers (:mod:`.sources`, :mod:`.parquet_source`,
:mod:`.tar_source`): the record dict, how a failure is classified, in-container key repeats, and
the reader of one plain image file."""
from __future__ import annotations

import posixpath
from collections import Counter
from typing import Iterator

from selfment_dist.io.images import too_many_bytes
from selfment_dist.io.schema import PERMANENT, TRANSIENT
from selfment_dist.io.storage import url_to_fs

IMAGE, PARQUET, TAR = "image", "parquet", "tar"


def _strip_ext(rel: str) -> str:
    head, base = posixpath.split(rel)
    stem = base.rsplit(".", 1)[0] if "." in base else base
    return posixpath.join(head, stem) if head else stem



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
