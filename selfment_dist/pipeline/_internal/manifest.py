"""The run manifest of an output (``_selfment.json``, ``_segment.json``): read, write, runs.

The manifest records a run's config, settings, versions and counts, and its ``runs`` list (one
entry per run, with its status). It is also what fences writes and holds the lease (see
:mod:`.lease`). Every write replaces it whole (atomic rename on local disk; one PUT on object
stores).
"""
from __future__ import annotations

import json
import platform
import uuid
from datetime import datetime, timezone
from importlib import metadata

from selfment_dist.io.storage import is_local

MANIFEST_NAME = "_selfment.json"


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


def run_entry(manifest: dict, run_id: str) -> dict:
    """This run's entry in ``manifest["runs"]`` (added back if another run's write dropped it)."""
    runs = manifest.setdefault("runs", [])
    for entry in runs:
        if entry.get("run_id") == run_id:
            return entry
    entry = {"run_id": run_id}
    runs.append(entry)
    return entry
