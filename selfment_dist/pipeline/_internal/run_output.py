"""The run skeleton of every stage that writes an output: lease, manifest, resume, fencing.

A stage's entry point reads, in order::

    out = RunOutput(fs, root, output, manifest_name=MANIFEST_NAME)
    unfinished = out.claim(config, manifest_for, written_before=..., resume_keys=..., holds=...)
    with out.held():                  # heartbeats; any exception is recorded, then re-raised
        out.await_leftover_writers()  # where parts of an unfinished run may still appear
        ... resume, write, out.check_sink(sink), out.check_held() ...
    out.finish(change)                # counts into the manifest; lost-to check

:meth:`RunOutput.claim` checks that no live run holds the output (:func:`.lease.check_lease`),
that the settings which shape what the output holds match the ones it was written with
(:func:`.manifest.check_resume`, only once something was written), registers the run in the
manifest (which fences the writes of an unfinished earlier run) and takes the lease. From then
on every manifest change is a read-modify-write under the lease (:class:`.lease.Lease`). A run
that fails records its status (``failed``, or ``fenced`` when it lost the output) in its own
entry always, and in the top-level status only while it still holds the lease: a run that lost
the output never overwrites the new holder's state.
"""
from __future__ import annotations

import contextlib
import logging
import uuid
from typing import Callable

from selfment_dist.io.output_access import disk_fault, prepare_output
from selfment_dist.pipeline._internal.lease import (FencedError, Lease, await_leftover_writers,
                                                    check_lease, confirm_lease, new_lease)
from selfment_dist.pipeline._internal.manifest import (check_resume, now, read_manifest,
                                                       register_run, run_entry, write_manifest)

logger = logging.getLogger(__name__)

__all__ = ["RunOutput", "new_run_id"]


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


class RunOutput:
    """One run's hold on its output folder (see the module docstring for the protocol).

    Args:
        fs, root: the output's filesystem and path in it; ``output``: its URI (for messages).
        manifest_name: the manifest's file name at ``root``.
        run_id: this run's id (default: a new one).
        create_bucket: create a missing bucket (else a missing bucket is refused: a typo must
            not create one).
    """

    def __init__(self, fs, root: str, output: str, *, manifest_name: str,
                 run_id: str | None = None, create_bucket: bool = False):
        self.fs, self.root, self.output = fs, root.rstrip("/"), output
        self.manifest_name = manifest_name
        self.create_bucket = create_bucket
        self.run_id = run_id or new_run_id()
        self.unfinished: list[str] = []
        self.lease: Lease | None = None

    @property
    def lost_to(self) -> str | None:
        """The run that took the output from this one, if any."""
        return self.lease.lost_to if self.lease else None

    def claim(self, config: dict, manifest_for: Callable[[dict | None], dict], *,
              written_before: Callable[[], bool], resume_keys: tuple[str, ...], holds: str,
              same: str = "the same settings") -> list[str]:
        """Take the output: refuse a busy one or one written with other settings, register the
        run, write the manifest and start the lease.

        Args:
            config: this run's config, compared on ``resume_keys`` with the stored one.
            manifest_for: the manifest to write from the stored one (None when there is none);
                the lease is added here.
            written_before: whether the output holds rows or maps already (asked after the
                lease check: settings are locked by what was written, not by a manifest).
            holds, same: words for the refusal message.
        Returns:
            the ids of earlier runs that never finished (killed).
        """
        fs, root = self.fs, self.root
        # A missing bucket, a read-only or full disk: one line here, before anything is written.
        prepare_output(fs, root, self.output, create_bucket=self.create_bucket,
                       manifest=self.manifest_name)
        fs.invalidate_cache(root)
        previous = read_manifest(fs, root, self.manifest_name)
        check_lease(previous, self.output, self.run_id)
        check_resume(previous if written_before() else None, config, self.output,
                     keys=resume_keys, holds=holds, same=same)
        manifest = manifest_for(previous)
        manifest["lease"] = new_lease(self.run_id)
        _entry, self.unfinished = register_run(manifest, self.run_id)
        write_manifest(fs, root, manifest, self.manifest_name)
        confirm_lease(fs, root, self.manifest_name, self.run_id, self.output)
        self.lease = Lease(fs, root, self.manifest_name, self.run_id).start()
        return self.unfinished

    @contextlib.contextmanager
    def held(self):
        """The run proper: the lease heartbeats inside; an exception is recorded in the manifest
        (``fenced`` for :class:`FencedError`, else ``failed``) and re-raised."""
        try:
            yield self
        except BaseException as exc:
            self.lease.stop()
            status = "fenced" if isinstance(exc, FencedError) else "failed"
            fault = disk_fault(exc, self.output)  # a full or read-only disk: one line
            self.record_failure(status, str(fault) if fault is not None
                                else f"{type(exc).__name__}: {exc}")
            if fault is not None and fault is not exc:
                raise fault from exc
            raise
        self.lease.stop()

    def await_leftover_writers(self) -> None:
        """Wait for the publishes of an unfinished earlier run's leftover workers."""
        await_leftover_writers(self.unfinished, self.output)

    def check_sink(self, sink) -> None:
        """Raise :class:`FencedError` when some of the sink's parts were not published."""
        fenced = getattr(sink, "fenced", None)
        if fenced:
            raise FencedError(f"run {self.run_id}: {len(fenced)} parts were not published "
                              f"because run {self.lost_to or 'another run'} took over "
                              f"{self.output}; re-run to complete the output")

    def check_held(self) -> None:
        """Raise :class:`FencedError` when another run took the output."""
        if self.lost_to:
            raise FencedError(f"run {self.run_id} lost {self.output} to run {self.lost_to}")

    def finish(self, change: Callable[[dict, dict], None]) -> None:
        """Record the finished run: ``change(manifest, this run's entry)``, then the lease is
        released. Raises :class:`FencedError` (recorded) when the output was lost meanwhile."""
        def finished(m: dict) -> None:
            change(m, run_entry(m, self.run_id))
            m["lease"]["released"] = now()

        self.lease.update(finished)
        if self.lost_to:
            err = FencedError(f"run {self.run_id} lost {self.output} to run {self.lost_to} "
                              "before it could finish; re-run to complete the output")
            self.record_failure("fenced", str(err))
            raise err

    def record_failure(self, status: str, reason: str) -> None:
        """This run's entry always; the top-level status only while it holds the lease."""
        run_id = self.run_id

        def failed(m: dict) -> None:
            run_entry(m, run_id).update(status=status, finished=now(), reason=reason[:500])
            if m.get("lease", {}).get("run_id") == run_id:
                m["status"] = "failed"
                m["lease"]["released"] = now()
        try:
            self.lease.update(failed, always=True)
        except Exception as exc:  # the original error matters more
            logger.error("could not record the failure of run %s in the manifest: %s", run_id,
                         exc)
