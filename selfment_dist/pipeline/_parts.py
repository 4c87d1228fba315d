"""Parquet-part outputs shared by the pipelines: atomic parts, resume by key, the manifest.

A part is ``part-<run id>-<write task>.parquet`` and only ever appears complete: on local disk
it is written under ``_tmp/`` and renamed; an object store publishes an object only when its
upload completes. A re-run reads the ``key`` column of the complete parts (removing unreadable
ones) and redoes only what is missing.

A killed run can leave Ray workers behind for a few seconds (each worker has its own process
group), and a write task among them may still publish a part. To keep such a part from
duplicating keys that a re-run is redoing, a run registers itself in the manifest before it
lists what is done, and a write task publishes only while its run is still the manifest's latest
(*fencing*); the re-run waits :data:`FENCE_GRACE_S` for writes already past that check. One run
per output at a time: a second live run fences the first one's remaining writes.
"""
from __future__ import annotations

import json
import logging
import platform
import re
import time
import uuid
from datetime import datetime, timezone
from importlib import metadata
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq
from ray.data import Datasink

from ..io.storage import is_local, to_uri, url_to_fs

logger = logging.getLogger(__name__)

MANIFEST_NAME = "_selfment.json"
TMP_DIR = "_tmp"
#: Seconds a re-run waits, after registering itself, for the publishes of an unfinished earlier
#: run's leftover workers that passed the fencing check before the registration.
FENCE_GRACE_S = 5.0
PART_RE = re.compile(r"^part-(?P<run>[0-9a-f]+)-(?P<task>\d+)\.parquet$")


class PartsSink(Datasink):
    """One parquet part per write task, published atomically under a deterministic name."""

    def __init__(self, output: str, schema: pa.Schema, run_id: str, rows_per_file: int,
                 storage_options: dict | None, manifest: str | None = None):
        """``manifest``: the file name (at ``output``) of the run manifest that fences writes:
        a part is published only while ``run_id`` is the manifest's latest run."""
        self.output = output
        self.manifest = manifest
        self.schema = schema
        self.run_id = run_id
        self.rows_per_file = rows_per_file
        self.storage_options = storage_options
        self.results: list[dict] = []

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
            runs = (read_manifest(fs, root, self.manifest) or {}).get("runs") or []
        except Exception as exc:  # no readable manifest: publishing loses nothing
            logger.debug("fencing check skipped for %s: %s", name, exc)
            return False
        latest = runs[-1].get("run_id") if runs else None
        if latest is None or latest == self.run_id:
            return False
        logger.warning("not publishing %s: run %s has taken over this output since run %s "
                       "started (its rows are redone there)", name, latest, self.run_id)
        return True

    def on_write_complete(self, write_result) -> None:
        self.results = [r for r in write_result.write_returns if r and r.get("file")]


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


def existing_keys(fs, root: str) -> set[str]:
    """Keys in the complete parts at ``root`` (``key`` column only); removes unreadable parts."""
    done: set[str] = set()
    duplicates = 0
    for path in list_parts(fs, root):
        try:
            with fs.open(path, "rb") as f:
                keys = pq.read_table(f, columns=["key"]).column("key").to_pylist()
        except Exception as exc:
            logger.warning("removing unreadable part %s (%s); its rows will be redone", path, exc)
            fs.rm(path)
            continue
        before = len(done)
        done.update(keys)
        duplicates += len(keys) - (len(done) - before)
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


def read_manifest(fs, root: str, name: str = MANIFEST_NAME) -> dict | None:
    """The run manifest ``name`` at ``root``, or None where there is none yet."""
    path = f"{root.rstrip('/')}/{name}"
    if not fs.exists(path):
        return None
    with fs.open(path, "rt", encoding="utf-8") as f:
        return json.load(f)


def write_manifest(fs, root: str, manifest: dict, name: str = MANIFEST_NAME) -> None:
    """Replace the manifest ``name`` at ``root`` whole (atomic rename on local disk; an object
    store replaces an object in one PUT)."""
    path = f"{root.rstrip('/')}/{name}"
    text = json.dumps(manifest, indent=2, sort_keys=False)
    if is_local(fs):
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with fs.open(tmp, "wt", encoding="utf-8") as f:
            f.write(text)
        fs.mv(tmp, path)
    else:
        with fs.open(path, "wt", encoding="utf-8") as f:
            f.write(text)


def check_resume(previous: dict | None, config: dict, output: str, *, keys: tuple[str, ...],
                 holds: str, same: str = "the same settings") -> None:
    """Refuse to resume into ``output`` when its manifest's config differs from ``config`` in any
    of ``keys`` (settings that change what a row holds; keys the old run did not record pass)."""
    if not previous:
        return
    old = previous.get("config", {})
    diff = [f"{k}: {old.get(k)!r} there, {config[k]!r} now" for k in keys
            if k in old and old[k] != config[k]]
    if diff:
        raise ValueError(f"{output} holds {holds} made with other settings ("
                         + "; ".join(diff) + f"); resume with {same} or choose a new output")


def outside_output(units: list[dict], fs, root: str) -> list[dict]:
    """Drop input files that lie inside the output (an output folder under an input folder):
    what a run writes there must not become input of the next run."""
    prefix = to_uri(fs, root.rstrip("/")) + "/"
    kept = [u for u in units if not u["uri"].startswith(prefix)]
    if len(kept) < len(units):
        logger.warning("ignoring %d input files inside the output %s", len(units) - len(kept),
                       prefix)
    return kept


def versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in ("selfment-dist", "torch", "timm", "ray", "pyarrow", "numpy"):
        try:
            out[dist.replace("-", "_")] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist.replace("-", "_")] = None
    return out


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def register_run(manifest: dict, run_id: str) -> tuple[dict, list[str]]:
    """Append run ``run_id`` (status ``running``) to ``manifest["runs"]``, and mark runs still
    ``running`` there as ``interrupted`` (killed before they could say so).

    Returns:
        the new run entry (update it when the run ends), and the ids of those unfinished runs.
    """
    runs = manifest.setdefault("runs", [])
    unfinished = [r["run_id"] for r in runs if r.get("status") == "running"]
    for r in runs:
        if r.get("status") == "running":
            r["status"] = "interrupted"
    entry = {"run_id": run_id, "started": now(), "status": "running"}
    runs.append(entry)
    return entry, unfinished


def await_leftover_writers(unfinished: list[str], output: str) -> None:
    """After registering, give the leftover workers of an unfinished run time to finish the
    publishes that passed the fencing check before the registration (see module docstring)."""
    if not unfinished:
        return
    logger.warning("run %s into %s did not finish (killed?); waiting %.0f s for writes of its "
                   "leftover workers before resuming. Never run twice into one output at a "
                   "time.", unfinished[-1], output, FENCE_GRACE_S)
    time.sleep(FENCE_GRACE_S)
