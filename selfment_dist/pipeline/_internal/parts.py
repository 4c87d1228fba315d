"""Parquet-part outputs shared by the pipelines: atomic parts, resume by key, the manifest.

A part is ``part-<run id>-<write task>.parquet`` and only ever appears complete: on local disk
it is written under ``_tmp/`` and renamed; an object store publishes an object only when its
upload completes. A re-run reads the ``key`` column of the complete parts (removing unreadable
ones) and redoes only what is missing.

A killed run can leave Ray workers behind for a few seconds (each worker has its own process
group), and a write task among them may still publish a part. To keep such a part from
duplicating keys that a re-run is redoing, a run registers itself in the manifest before it
lists what is done, and a write task publishes only while its run is still the manifest's latest
(*fencing*); the re-run waits :data:`FENCE_GRACE_S` for writes already past that check.

One run per output at a time: a run holds a *lease* in the manifest (its id, host and driver pid,
and a heartbeat renewed every :data:`HEARTBEAT_S`). A run that finds another run's live lease is
refused at start (:class:`OutputBusyError`); a lease is dead when its heartbeat is older than
:data:`LEASE_TTL_S`, or at once when its driver ran on this host and is gone (a killed run never
blocks its re-run). Two runs starting in the same instant both write their lease, then read it
back after :data:`LEASE_SETTLE_S`: the one whose lease was overwritten steps back. Should both
still go on (a store slower than the settle time), write tasks publish only while their run holds
the lease, and a run with a fenced write, or whose lease was taken, fails
(:class:`FencedError`), never reports success. Every manifest write after the start is a
read-modify-write of the stored manifest, never of a stale copy.

After writing, a run rewrites in place (atomically, under the same name) the parts that hold
rows a re-run must redo (``error_kind`` ``transient``: dropped before the re-run lists what is
done) or rows whose key another container also gave (see :func:`resolve_duplicates`).
"""
from __future__ import annotations

from selfment_dist.errors import SelfmentUserError

import errno
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data import Datasink

from selfment_dist.io.storage import is_local, read_json, to_uri, url_to_fs
from selfment_dist.stages import MANIFEST_NAME  # noqa: F401 (also imported from here)
from selfment_dist.pipeline._internal.done_keys import SortedKeys
from selfment_dist.errors import FencedError, UserValueError  # noqa: F401 (FencedError: imported from here)
from selfment_dist.versions import versions  # noqa: F401 (imported from here by the stages)

logger = logging.getLogger(__name__)

TMP_DIR = "_tmp"
#: Seconds a re-run waits, after registering itself, for the publishes of an unfinished earlier
#: run's leftover workers that passed the fencing check before the registration.
FENCE_GRACE_S = 5.0
#: Seconds between lease heartbeats, and the age at which a heartbeat counts as dead.
HEARTBEAT_S = 5.0
LEASE_TTL_S = 60.0
#: Seconds a starting run waits before reading its lease back (two runs starting at once).
LEASE_SETTLE_S = 0.5


class OutputBusyError(SelfmentUserError, RuntimeError):
    """Another live run holds the output."""


#: Test hook (kill tests): seconds a write task pauses between writing a part and its fencing
#: check, so that a test can freeze a writer there.
PUBLISH_DELAY_ENV = "SELFMENT_TEST_PUBLISH_DELAY_S"
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
            _test_pause()
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
            _test_pause()
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


def _test_pause() -> None:
    delay = os.environ.get(PUBLISH_DELAY_ENV)
    if delay:
        time.sleep(float(delay))


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


def read_manifest(fs, root: str, name: str = MANIFEST_NAME) -> dict | None:
    """The run manifest ``name`` at ``root``, or None where there is none yet."""
    return read_json(fs, f"{root.rstrip('/')}/{name}")


#: Spaces after the JSON of a manifest on local disk: room kept for the failure record, which
#: :func:`write_manifest` writes in place when the disk is full (JSON allows trailing blanks).
MANIFEST_SLACK = 8192


def write_manifest(fs, root: str, manifest: dict, name: str = MANIFEST_NAME) -> None:
    """Replace the manifest ``name`` at ``root`` whole (atomic rename on local disk; an object
    store replaces an object in one PUT).

    On local disk a failed write leaves no temp file; when it failed because the disk is full,
    the manifest is overwritten in place instead, within the room its slack keeps (not atomic,
    but a run's last word, ``failed``, is not lost to a full disk)."""
    path = f"{root.rstrip('/')}/{name}"
    text = json.dumps(manifest, indent=2, sort_keys=False)
    if is_local(fs):
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with fs.open(tmp, "wt", encoding="utf-8") as f:
                f.write(text + " " * MANIFEST_SLACK + "\n")
            fs.mv(tmp, path)
        except BaseException as exc:
            if os.path.exists(tmp):
                os.remove(tmp)
            if not (isinstance(exc, OSError) and exc.errno in _DISK_FULL
                    and _overwrite_in_place(path, text)):
                raise
    else:
        with fs.open(path, "wt", encoding="utf-8") as f:
            f.write(text)


_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _overwrite_in_place(path: str, text: str) -> bool:
    """Write ``text`` over the file at ``path`` keeping its size (blanks after the JSON): no
    new disk blocks on an overwrite-in-place file system. False when it does not fit."""
    data = text.encode("utf-8")
    try:
        size = os.path.getsize(path)
        if len(data) + 1 > size:
            return False
        with open(path, "r+b") as f:
            f.write(data + b" " * (size - len(data) - 1) + b"\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        logger.debug("in-place manifest write failed: %s", exc)
        return False
    logger.warning("disk full: manifest %s rewritten in place", path)
    return True


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
        raise UserValueError(f"{output} holds {holds} made with other settings ("
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


def list_inputs(inputs: list[str], output: str, storage_options: dict | None, *,
                allow_empty: bool) -> tuple:
    """``(fs, root, units)``: the output's filesystem and path, and the inputs' work units
    outside it. Listed before anything is written, so a missing or empty input (an error unless
    ``allow_empty``) or an output that is a file leaves no trace. ``units.skipped`` counts the
    input files skipped on purpose (io/skip_rules.py), for the manifest and the summary."""
    from selfment_dist.io.sources import Units, enumerate_units

    fs, root = url_to_fs(output, storage_options)
    if fs.isfile(root):
        raise UserValueError(f"output {output} is a file; give a folder or prefix")
    listed = enumerate_units(inputs, storage_options)
    units = Units(outside_output(listed, fs, root), skipped=listed.skipped)
    if not units and not allow_empty:
        raise UserValueError(f"no images found in {', '.join(inputs)} (pass allow_empty / "
                         "--allow-empty to accept empty inputs)")
    return fs, root, units


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


def holder(manifest: dict) -> str | None:
    """The run that owns the output: the lease holder, else (older manifests) the latest run."""
    lease = manifest.get("lease")
    if isinstance(lease, dict) and lease.get("run_id"):
        return lease["run_id"]
    runs = manifest.get("runs") or []
    return runs[-1].get("run_id") if runs else None


def _lease_alive(lease: dict) -> tuple[bool, float]:
    """(alive, seconds since its heartbeat) of a lease read from a manifest."""
    age = time.time() - float(lease.get("heartbeat") or 0)
    if age > LEASE_TTL_S:
        return False, age
    if lease.get("host") == socket.gethostname() and lease.get("pid"):
        try:
            os.kill(int(lease["pid"]), 0)
        except ProcessLookupError:
            return False, age  # its driver is gone: killed
        except PermissionError:
            pass
    return True, age


def check_lease(manifest: dict | None, output: str, run_id: str) -> None:
    """Raise :class:`OutputBusyError` when another run holds a live lease on ``output``."""
    lease = (manifest or {}).get("lease")
    if not isinstance(lease, dict) or lease.get("run_id") in (None, run_id) \
            or lease.get("released"):
        return
    alive, age = _lease_alive(lease)
    if alive:
        raise OutputBusyError(
            f"output {output} is in use by run {lease['run_id']} (host {lease.get('host')}, "
            f"pid {lease.get('pid')}, heartbeat {age:.0f} s ago); wait for it to finish or "
            f"choose another output (a killed run's lease expires {LEASE_TTL_S:.0f} s after its "
            "last heartbeat)")


def new_lease(run_id: str) -> dict:
    return {"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(),
            "heartbeat": time.time()}


def confirm_lease(fs, root: str, name: str, run_id: str, output: str) -> None:
    """Read the lease back after :data:`LEASE_SETTLE_S`; another run that wrote its lease in
    the same instant wins if its write came last."""
    time.sleep(LEASE_SETTLE_S)
    fs.invalidate_cache(root)
    manifest = read_manifest(fs, root, name) or {}
    if holder(manifest) != run_id:
        raise OutputBusyError(f"output {output} was taken by run {holder(manifest)} as this run "
                              f"({run_id}) started; wait for it to finish or choose another "
                              "output")


class Lease:
    """This run's hold on an output: heartbeats in a thread; every manifest change goes through
    :meth:`update` (a read-modify-write under one lock, so heartbeats never clobber it)."""

    def __init__(self, fs, root: str, name: str, run_id: str):
        self.fs, self.root, self.name, self.run_id = fs, root, name, run_id
        self.lost_to: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{run_id}", daemon=True)

    def start(self) -> "Lease":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2 * HEARTBEAT_S)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self.update(lambda m: m["lease"].update(heartbeat=time.time()))
            except Exception as exc:  # a missed beat is no failure; a lost lease is noted
                logger.debug("lease heartbeat of run %s failed: %s", self.run_id, exc)
            if self.lost_to:
                return

    def update(self, change: Callable[[dict], None], *, always: bool = False) -> dict:
        """Apply ``change`` to the stored manifest and write it back, while this run holds the
        lease (``always``: also after losing it; ``change`` must then touch only this run's
        own entry). Returns the manifest as written (or as read, when nothing was written)."""
        with self._lock:
            self.fs.invalidate_cache(self.root)
            manifest = read_manifest(self.fs, self.root, self.name) or {}
            owner = holder(manifest)
            if owner != self.run_id:
                if self.lost_to is None:
                    logger.error("run %s lost the output to run %s", self.run_id, owner)
                self.lost_to = owner or "?"
                if not always:
                    return manifest
            change(manifest)
            write_manifest(self.fs, self.root, manifest, self.name)
            return manifest


def run_entry(manifest: dict, run_id: str) -> dict:
    """This run's entry in ``manifest["runs"]`` (added back if another run's write dropped it)."""
    runs = manifest.setdefault("runs", [])
    for entry in runs:
        if entry.get("run_id") == run_id:
            return entry
    entry = {"run_id": run_id}
    runs.append(entry)
    return entry


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
