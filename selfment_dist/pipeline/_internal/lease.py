"""One run per output at a time: the lease, and fencing of an earlier run's leftover writers.

A killed run can leave Ray workers behind for a few seconds (each worker has its own process
group), and a write task among them may still publish a part. To keep such a part from
duplicating keys that a re-run is redoing, a run registers itself in the manifest before it
lists what is done, and a write task publishes only while its run is still the manifest's latest
(*fencing*, see :class:`.parts.PartsSink`); the re-run waits :data:`FENCE_GRACE_S` for writes
already past that check.

A run holds a *lease* in the manifest (its id, host and driver pid, and a heartbeat renewed every
:data:`HEARTBEAT_S`). A run that finds another run's live lease is refused at start
(:class:`OutputBusyError`); a lease is dead when its heartbeat is older than
:data:`LEASE_TTL_S`, or at once when its driver ran on this host and is gone (a killed run never
blocks its re-run). Two runs starting in the same instant both write their lease, then read it
back after :data:`LEASE_SETTLE_S`: the one whose lease was overwritten steps back. Should both
still go on (a store slower than the settle time), write tasks publish only while their run holds
the lease, and a run with a fenced write, or whose lease was taken, fails
(:class:`FencedError`), never reports success. Every manifest write after the start is a
read-modify-write of the stored manifest, never of a stale copy.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Callable

from selfment_dist.errors import FencedError, SelfmentUserError  # noqa: F401 (imported from here)
from selfment_dist.pipeline._internal.manifest import read_manifest, write_manifest

logger = logging.getLogger(__name__)

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


def await_leftover_writers(unfinished: list[str], output: str) -> None:
    """After registering, give the leftover workers of an unfinished run time to finish the
    publishes that passed the fencing check before the registration (see module docstring)."""
    if not unfinished:
        return
    logger.warning("run %s into %s did not finish (killed?); waiting %.0f s for writes of its "
                   "leftover workers before resuming. Never run twice into one output at a "
                   "time.", unfinished[-1], output, FENCE_GRACE_S)
    time.sleep(FENCE_GRACE_S)
