"""Before a run writes anything: the output exists (or may be created), can be written, and
holds no stale manifest temp files; afterwards, a disk fault is told in one line.

- A missing bucket is refused (:class:`MissingBucketError`) unless the stage's
  ``create_bucket`` setting is on: fsspec's ``makedirs`` would otherwise create a bucket from a
  typo and report success into it.
- An output that cannot be written (read-only file system, permission denied, a parent that is
  a file) is refused with one line (:class:`OutputNotWritableError`): on local disk a probe
  file is written and removed, so a read-only mount is found before any manifest is.
- Temp files of manifest writes (``_selfment.json.tmp-*``) older than :data:`STALE_TMP_S` are
  removed: they are left only by a write that died (a full disk, a killed run).
- :func:`check_output` gives the same refusals without creating anything, for the checks a
  stage makes before Ray starts (a run that fails later must leave no trace).
- :func:`disk_fault` turns an exception whose cause is a full disk, a read-only file system or
  a refused write into :class:`OutputNotWritableError` (one line, exit 2).
"""
from __future__ import annotations

import errno
import logging
import os
import time
import uuid

from selfment_dist.errors import SelfmentUserError
from selfment_dist.io.storage import is_local, protocol_of

logger = logging.getLogger(__name__)

__all__ = ["OutputNotWritableError", "MissingBucketError", "prepare_output", "check_output",
           "disk_fault", "remove_stale_temp_files", "STALE_TMP_S"]

#: Age after which a manifest temp file is a leftover (a live write lasts milliseconds).
STALE_TMP_S = 60.0
#: Object stores whose first path component is a bucket (or container).
_BUCKET_PROTOCOLS = {"s3", "s3a", "gs", "gcs", "abfs", "az", "abfss"}
_WRITE_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EROFS: "read-only file system",
                 errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
                 errno.ENOTDIR: "a parent of it is a file, not a folder",
                 errno.EEXIST: "a file of that name is in the way"}
if hasattr(errno, "EDQUOT"):
    _WRITE_ERRNOS[errno.EDQUOT] = "disk quota exceeded"


class OutputNotWritableError(SelfmentUserError, OSError):
    """The output cannot be written: read-only, refused, or its disk is full."""


class MissingBucketError(SelfmentUserError, FileNotFoundError):
    """The output's bucket does not exist and ``create_bucket`` is off."""


def _reason(exc: OSError) -> str:
    return _WRITE_ERRNOS.get(exc.errno) or exc.strerror or str(exc) or type(exc).__name__


def _check_bucket(fs, root: str, output: str, create_bucket: bool) -> None:
    if is_local(fs) or protocol_of(fs) not in _BUCKET_PROTOCOLS:
        return
    bucket = root.strip("/").split("/", 1)[0]
    fs.invalidate_cache(bucket)
    if fs.exists(bucket):
        return
    if not create_bucket:
        raise MissingBucketError(
            f"the bucket {bucket!r} of the output {output} does not exist; check its name, or "
            "pass --create-bucket (create_bucket: true) to create it")
    logger.warning("creating the bucket %r for the output %s (create_bucket)", bucket, output)
    fs.mkdir(bucket)


def prepare_output(fs, root: str, output: str, *, create_bucket: bool = False,
                   manifest: str | None = None) -> None:
    """Make ``root`` (the output ``output`` in ``fs``) ready to write, or raise one line.

    Args:
        create_bucket: create a missing bucket instead of refusing it.
        manifest: the manifest's file name at ``root``: its stale temp files are removed.
    Raises:
        MissingBucketError, OutputNotWritableError (both SelfmentUserError).
    """
    _check_bucket(fs, root, output, create_bucket)
    try:
        fs.makedirs(root, exist_ok=True)
        if is_local(fs):  # a read-only mount or a refused folder shows here, not mid-run
            probe = f"{root.rstrip('/')}/_selfment.probe-{uuid.uuid4().hex[:8]}"
            try:
                with fs.open(probe, "wb") as f:
                    f.write(b"\0")
            finally:
                if os.path.exists(probe):
                    os.remove(probe)
    except OSError as exc:
        if isinstance(exc, SelfmentUserError):
            raise
        raise OutputNotWritableError(f"cannot write to the output {output}: {_reason(exc)}") \
            from exc
    if manifest:
        remove_stale_temp_files(fs, root, manifest)


def check_output(fs, root: str, output: str, *, create_bucket: bool = False) -> None:
    """:func:`prepare_output`'s refusals (a missing bucket; on local disk a file in the way, a
    parent that is a file, a read-only or refused folder), found without writing anything.

    Raises:
        MissingBucketError, OutputNotWritableError (both SelfmentUserError).
    """
    if not is_local(fs):
        if not create_bucket:  # with create_bucket the bucket is made when the run writes
            _check_bucket(fs, root, output, False)
        return
    path = os.path.abspath(root)
    if os.path.exists(path) and not os.path.isdir(path):
        raise OutputNotWritableError(f"cannot write to the output {output}: "
                                     f"{_WRITE_ERRNOS[errno.EEXIST]}")
    nearest = path
    while not os.path.exists(nearest):  # the folder that creating the output would write in
        nearest = os.path.dirname(nearest)
    if not os.path.isdir(nearest):
        raise OutputNotWritableError(f"cannot write to the output {output}: "
                                     f"{_WRITE_ERRNOS[errno.ENOTDIR]}")
    if not os.access(nearest, os.W_OK | os.X_OK):
        read_only = bool(os.statvfs(nearest).f_flag & os.ST_RDONLY)
        reason = _WRITE_ERRNOS[errno.EROFS if read_only else errno.EACCES]
        raise OutputNotWritableError(f"cannot write to the output {output}: {reason}")


def remove_stale_temp_files(fs, root: str, manifest: str) -> list[str]:
    """Remove ``<manifest>.tmp-*`` files at ``root`` older than :data:`STALE_TMP_S` (local disk:
    an object store's manifest write has no temp file). Returns the paths removed."""
    if not is_local(fs):
        return []
    removed = []
    prefix = f"{manifest}.tmp-"
    try:
        names = os.listdir(root)
    except OSError:
        return []
    for name in names:
        if not name.startswith(prefix):
            continue
        path = os.path.join(root, name)
        try:
            if time.time() - os.path.getmtime(path) > STALE_TMP_S:
                os.remove(path)
                removed.append(path)
        except OSError as exc:  # gone meanwhile, or not removable: harmless either way
            logger.debug("stale temp file %s left: %s", path, exc)
    if removed:
        logger.info("removed %d stale manifest temp files at %s", len(removed), root)
    return removed


def disk_fault(exc: BaseException, output: str) -> OutputNotWritableError | None:
    """One-line error for ``exc`` when it (or its cause, however deeply wrapped: Ray task
    errors keep it in ``cause``) is a write refused by the disk; None otherwise."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OutputNotWritableError):
            return e
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EROFS,
                                                  getattr(errno, "EDQUOT", -1)):
            return OutputNotWritableError(f"cannot write to the output {output}: "
                                          f"{_reason(e)} ({e.filename or 'while writing'})")
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]
    return None
