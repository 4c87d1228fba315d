"""Parquet inputs (img2dataset layout): rows → records, and a file's keys without its image bytes."""
from __future__ import annotations

import logging
from typing import Container, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from selfment_dist.io.images import too_many_bytes
from selfment_dist.io.records import (IMAGE, PARQUET, _Dedup, _one_line, _record, _strip_ext,
                                      error_kind)
from selfment_dist.io.storage import url_to_fs

logger = logging.getLogger(__name__)

#: Image columns looked for in parquet inputs, in order (binary, or a struct with ``bytes``).
PARQUET_IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp", "image", "img", "image_bytes", "bytes")
_PARQUET_BATCH_ROWS = 64


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
