"""Parquet-part outputs shared by the pipelines: atomic parts, resume by key, duplicates.

A part is ``part-<run id>-<write task>.parquet`` and only ever appears complete: on local disk
it is written under ``_tmp/`` and renamed; an object store publishes an object only when its
upload completes. A re-run reads the ``key`` column of the complete parts (removing unreadable
ones) and redoes only what is missing. A write task publishes only while its run holds the
output (fencing: see :mod:`.lease`).

After writing, a run rewrites in place (atomically, under the same name) the parts that hold
rows a re-run must redo (``error_kind`` ``transient``: dropped before the re-run lists what is
done) or rows whose key another container also gave (see :func:`resolve_duplicates`).
"""
from __future__ import annotations

import logging
import re
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data import Datasink

from selfment_dist.io.storage import is_local, url_to_fs
from selfment_dist.pipeline._internal import faults
from selfment_dist.pipeline._internal.done_keys import SortedKeys
from selfment_dist.pipeline._internal.lease import holder

# Re-exported for the CLI, the chain and inspect, which name them from here.
from selfment_dist.pipeline._internal.lease import FencedError, OutputBusyError  # noqa: F401
from selfment_dist.pipeline._internal.manifest import MANIFEST_NAME, read_manifest  # noqa: F401

logger = logging.getLogger(__name__)

TMP_DIR = "_tmp"
PART_RE = re.compile(r"^part-(?P<run>[0-9a-f]+)-(?P<task>\d+)\.parquet$")


class PartsSink(Datasink):
    """One parquet part per write task, published atomically under a deterministic name."""

    def __init__(self, output: str, schema: pa.Schema, run_id: str, rows_per_file: int,
                 storage_options: dict | None, manifest: str | None = None):
        """``manifest``: the file name (at ``output``) of the run manifest that fences writes:
        a part is published only while ``run_id`` holds the output (:func:`holder`)."""
        self.output = output
        self.manifest = manifest
        self.schema = schema
        self.run_id = run_id
        self.rows_per_file = rows_per_file
        self.storage_options = storage_options
        self.results: list[dict] = []
        self.fenced: list[str] = []  # parts not published: another run took the output

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_file

    def get_name(self) -> str:
        return "WritePseudoLabels"

    def write(self, blocks: Iterable, ctx) -> dict:
        name = f"part-{self.run_id}-{ctx.task_idx:06d}.parquet"
        fs, root = url_to_fs(self.output, self.storage_options)
        final = f"{root.rstrip('/')}/{name}"
        local = is_local(fs)
        target = f"{root.rstrip('/')}/{TMP_DIR}/{name}" if local else final
        if local:
            fs.makedirs(f"{root.rstrip('/')}/{TMP_DIR}", exist_ok=True)
        rows = errors = 0
        feature_dim = None
        handle = writer = None
        try:
            for block in blocks:
                table = _as_table(block)
                if table.num_rows == 0:  # empty blocks may lack columns
                    continue
                table = table.select(self.schema.names).cast(self.schema)
                rows += table.num_rows
                errors += table.num_rows - table.column("error").null_count
                if feature_dim is None and "features" in self.schema.names:
                    feature_dim = _feature_dim(table)
                if writer is None:
                    handle = fs.open(target, "wb")
                    writer = pq.ParquetWriter(handle, self.schema)
                writer.write_table(table)
            if writer is None:
                return {"file": None, "rows": 0, "errors": 0, "feature_dim": None}
            if feature_dim is not None:
                writer.add_key_value_metadata({"selfment.feature_dim": str(feature_dim)})
            writer.close()
            writer = None
            faults.publish_pause()
            if not local and self._fenced(fs, root, name):
                return _fenced_result(name)  # ``finally`` aborts the upload
            handle.close()  # the object store publishes the part here, complete
            handle = None
        finally:
            if writer is not None:
                writer.close()
            if handle is not None:  # failed mid-way (or fenced): never publish a partial part
                _discard(handle)
        if local:
            faults.publish_pause()
            if self._fenced(fs, root, name):
                fs.rm(target)
                return _fenced_result(name)
            fs.mv(target, final)
        return {"file": name, "rows": rows, "errors": errors, "feature_dim": feature_dim}

    def _fenced(self, fs, root: str, name: str) -> bool:
        """True when a later run has registered in the manifest: this run's part must not
        appear (that run is redoing its keys)."""
        if not self.manifest:
            return False
        try:
            manifest = read_manifest(fs, root, self.manifest) or {}
        except Exception as exc:  # no readable manifest: publishing loses nothing
            logger.debug("fencing check skipped for %s: %s", name, exc)
            return False
        latest = holder(manifest)
        if latest is None or latest == self.run_id:
            return False
        logger.warning("not publishing %s: run %s has taken over this output since run %s "
                       "started (its rows are redone there)", name, latest, self.run_id)
        return True

    def on_write_complete(self, write_result) -> None:
        self.results = [r for r in write_result.write_returns if r and r.get("file")]
        self.fenced = [r["fenced"] for r in write_result.write_returns if r and r.get("fenced")]


def _fenced_result(name: str) -> dict:
    return {"file": None, "rows": 0, "errors": 0, "feature_dim": None, "fenced": name}


def _discard(handle) -> None:
    try:
        if hasattr(handle, "discard"):  # fsspec buffered uploads: abort instead of commit
            handle.discard()
            handle.closed = True  # else its __del__ still tries to flush the dropped buffer
        else:
            handle.close()
    except Exception as exc:
        logger.debug("discarding a partial part failed: %s", exc)


def _as_table(block) -> pa.Table:
    if isinstance(block, pa.Table):
        return block
    from ray.data.block import BlockAccessor
    return BlockAccessor.for_block(block).to_arrow()


def _feature_dim(table: pa.Table) -> int | None:
    feats, gh, gw = (table.column(c) for c in ("features", "grid_h", "grid_w"))
    for i in range(table.num_rows):
        if feats[i].is_valid:
            return len(feats[i].as_py()) // (2 * int(gh[i].as_py()) * int(gw[i].as_py()))
    return None


def list_parts(fs, root: str) -> list[str]:
    fs.invalidate_cache(root)  # object-store listings are cached per process; workers wrote here
    try:
        entries = fs.ls(root, detail=False)
    except FileNotFoundError:
        return []
    return sorted(p for p in entries if PART_RE.match(p.rstrip("/").rsplit("/", 1)[-1]))


def existing_keys(fs, root: str) -> SortedKeys:
    """Keys in the complete parts at ``root`` (``key`` column only, kept as one sorted array:
    about the keys' bytes, with no Python object per key); removes unreadable parts."""
    columns = []
    for path in list_parts(fs, root):
        try:
            with fs.open(path, "rb") as f:
                columns.append(pq.read_table(f, columns=["key"]).column("key"))
        except Exception as exc:
            logger.warning("removing unreadable part %s (%s); its rows will be redone", path, exc)
            fs.rm(path)
            continue
    done, duplicates = SortedKeys.from_arrow(columns)
    if duplicates:
        logger.error("output already holds %d duplicate keys", duplicates)
    tmp = f"{root.rstrip('/')}/{TMP_DIR}"
    if fs.exists(tmp):
        fs.rm(tmp, recursive=True)  # leftovers of a killed run: never published, never counted
    return done


def count_parts(fs, root: str) -> dict:
    """Rows, error rows and files of the complete parts, from parquet footers."""
    rows = errors = files = 0
    feature_dim = None
    for path in list_parts(fs, root):
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            md = pf.metadata
            col = pf.schema_arrow.get_field_index("error")
            nulls = 0
            for g in range(md.num_row_groups):
                stats = md.row_group(g).column(col).statistics
                if stats is not None and stats.has_null_count:
                    nulls += stats.null_count
                else:
                    nulls += pf.read_row_group(g, columns=["error"]).column(0).null_count
            kv = md.metadata or {}
            if b"selfment.feature_dim" in kv:
                feature_dim = int(kv[b"selfment.feature_dim"])
        rows += md.num_rows
        errors += md.num_rows - nulls
        files += 1
    return {"rows": rows, "errors": errors, "files": files, "feature_dim": feature_dim}


def has_parts(fs, root: str) -> bool:
    return bool(list_parts(fs, root))


def _rewrite_part(fs, root: str, path: str, keep) -> int:
    """Rewrite the part at ``path`` with only the rows where ``keep`` (a bool array) is true,
    atomically under the same name (rename on local disk; one PUT on an object store); an
    emptied part is removed. Returns the rows removed."""
    with fs.open(path, "rb") as f:
        table = pq.read_table(f)
    kept = table.filter(pa.array(keep, type=pa.bool_()))
    removed = table.num_rows - kept.num_rows
    if not removed:
        return 0
    if kept.num_rows == 0:
        fs.rm(path)
        return removed
    name = path.rstrip("/").rsplit("/", 1)[-1]
    target = path
    if is_local(fs):
        fs.makedirs(f"{root.rstrip('/')}/{TMP_DIR}", exist_ok=True)
        target = f"{root.rstrip('/')}/{TMP_DIR}/rewrite-{name}"
    with fs.open(target, "wb") as f:
        pq.write_table(kept, f)
    if target != path:
        fs.mv(target, path)
    return removed


def retire_transient(fs, root: str) -> int:
    """Remove the rows whose ``error_kind`` is ``transient`` (so a re-run redoes their keys);
    returns how many."""
    removed = 0
    for path in list_parts(fs, root):
        try:
            with fs.open(path, "rb") as f:
                pf = pq.ParquetFile(f)
                if "error_kind" not in pf.schema_arrow.names:
                    continue
                kinds = pf.read(columns=["error_kind"]).column(0)
        except Exception as exc:  # unreadable: existing_keys removes it next
            logger.debug("retire_transient skips %s: %s", path, exc)
            continue
        keep = pc.fill_null(pc.not_equal(kinds, "transient"), True)
        if not pc.all(keep).as_py():
            removed += _rewrite_part(fs, root, path, keep.to_numpy(zero_copy_only=False))
    if removed:
        logger.info("%d rows with transient errors are redone by this run", removed)
    return removed


def resolve_duplicates(fs, root: str) -> tuple[list[dict], SortedKeys]:
    """Make every key appear once: where several rows share a key (one key in two containers,
    or a part published twice), the row whose ``source`` sorts first is kept and the others are
    removed. Deterministic (by ``source``, whatever the run order).

    Returns:
        one report per duplicated key, ``{"key", "kept": source, "removed": [sources]}``, and
        the keys now in the output.
    """
    paths = list_parts(fs, root)
    columns = []
    for path in paths:  # first pass: the key column only (what resume reads anyway)
        with fs.open(path, "rb") as f:
            columns.append(pq.read_table(f, columns=["key"]).column("key"))
    seen, n_repeats = SortedKeys.from_arrow(columns)
    if not n_repeats:
        return [], seen
    counts = pc.value_counts(pa.chunked_array([c for col in columns for c in col.chunks],
                                              type=pa.string()))
    repeated = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
    rows: dict[str, list[tuple[str, str, int]]] = {}
    for path in paths:
        with fs.open(path, "rb") as f:
            table = pq.read_table(f, columns=["key", "source"])
        hit = pc.is_in(table.column("key"), value_set=repeated).to_numpy(zero_copy_only=False)
        keys, sources = table.column("key"), table.column("source")
        for i in np.flatnonzero(hit).tolist():
            rows.setdefault(keys[i].as_py(), []).append((sources[i].as_py(), path, i))
    drop: dict[str, set[int]] = {}
    reports = []
    for key, found in sorted(rows.items()):
        found.sort()
        for _source, path, i in found[1:]:
            drop.setdefault(path, set()).add(i)
        reports.append({"key": key, "kept": found[0][0], "removed": [f[0] for f in found[1:]]})
    for path, idx in drop.items():
        with fs.open(path, "rb") as f:
            n = pq.ParquetFile(f).metadata.num_rows
        _rewrite_part(fs, root, path, [i not in idx for i in range(n)])
    logger.error("%d keys were found in more than one input; each keeps the row of the input "
                 "whose URI sorts first (listed in the manifest's duplicates), e.g. %r in %s",
                 len(reports), reports[0]["key"], reports[0]["removed"])
    return reports, seen
