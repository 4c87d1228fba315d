"""The run manifest of an output (``_selfment.json``, ``_segment.json``): read, write, runs.

The manifest records a run's config, settings, versions and counts, and its ``runs`` list (one
entry per run, with its status). It is also what fences writes and holds the lease (see
:mod:`.lease`). Every write replaces it whole (atomic rename on local disk; one PUT on object
stores).
"""
from __future__ import annotations

import errno
import json
import logging
import os
import uuid
from datetime import datetime, timezone

from selfment_dist.errors import UserValueError
from selfment_dist.io.storage import is_local, read_json
from selfment_dist.stages import MANIFEST_NAME  # noqa: F401 (also imported from here)
from selfment_dist.versions import versions  # noqa: F401 (imported from here by the stages)

logger = logging.getLogger(__name__)


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


def run_entry(manifest: dict, run_id: str) -> dict:
    """This run's entry in ``manifest["runs"]`` (added back if another run's write dropped it)."""
    runs = manifest.setdefault("runs", [])
    for entry in runs:
        if entry.get("run_id") == run_id:
            return entry
    entry = {"run_id": run_id}
    runs.append(entry)
    return entry
