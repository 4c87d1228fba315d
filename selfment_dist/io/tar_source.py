"""WebDataset tar shards → records; a shard cut short gives its samples plus an error row."""
from __future__ import annotations

import logging
import posixpath
import tarfile
from typing import Container, Iterator

from selfment_dist.io.images import IMAGE_EXTENSIONS
from selfment_dist.io.records import _Dedup, _one_line, _record, error_kind
from selfment_dist.io.skip_rules import skipped_part
from selfment_dist.io.tar_members import member_value
from selfment_dist.io.storage import url_to_fs

logger = logging.getLogger(__name__)

# Preference among several image members of one WebDataset sample.
_WDS_IMAGE_ORDER = ("jpg", "jpeg", "png", "webp")


def _wds_split(name: str) -> tuple[str, str]:
    """WebDataset member name → (sample key, extension): the key ends at the basename's first dot."""
    head, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return (posixpath.join(head, stem) if head else stem), ext.lower()


class _EndAwareTarInfo(tarfile.TarInfo):
    """Notes on the archive how its member list ended: ``tarfile`` in stream mode reads a cut
    (end of data inside or instead of a header) as the end of the archive, silently."""

    @classmethod
    def fromtarfile(cls, tf):
        try:
            return super().fromtarfile(tf)
        except tarfile.EOFHeaderError:  # a block of zeros: the end-of-archive marker
            tf.selfment_end = "marker"
            raise
        except tarfile.EmptyHeaderError:
            tf.selfment_end = "no end-of-archive marker (the data stops between two members)"
            raise
        except tarfile.TruncatedHeaderError:
            tf.selfment_end = "cut inside a member header"
            raise
        except tarfile.HeaderError as exc:
            tf.selfment_end = f"invalid member header ({exc})"
            raise


#: Members skipped by name (``._*``, ``.DS_Store``) in this process since the last
#: :func:`take_skipped_members`: the pipeline's read tasks report them to the run's counters.
_SKIPPED_MEMBERS = 0


def take_skipped_members() -> int:
    """Tar members skipped by name in this process since the last call, reset to 0."""
    global _SKIPPED_MEMBERS
    count, _SKIPPED_MEMBERS = _SKIPPED_MEMBERS, 0
    return count


def _iter_tar(unit: dict, storage_options, skip: Container[str],
              max_bytes: int | None) -> Iterator[dict]:
    global _SKIPPED_MEMBERS
    source, shard_key = unit["uri"], unit["key"]
    dedup = _Dedup()
    n_done = n_skipped = 0
    last_good: str | None = None
    sample_key: str | None = None
    members: dict[str, bytes | str | None] = {}

    def flush() -> Iterator[dict]:
        if sample_key is None:
            return
        key, dup_error = dedup(sample_key)
        if key in skip:
            return
        if dup_error:
            yield _record(key, source, error=dup_error)
            return
        images = [e for e in _WDS_IMAGE_ORDER if e in members] + \
                 [e for e in members if e in IMAGE_EXTENSIONS and e not in _WDS_IMAGE_ORDER]
        if not images:
            found = ", ".join("." + e for e in sorted(members)) or "nothing"
            yield _record(key, source, error=f"WebDataset sample has no image member (found {found})")
        elif isinstance(members[images[0]], str):  # over the byte limit: its message
            yield _record(key, source, error=members[images[0]])
        else:
            yield _record(key, source, data=members[images[0]])

    def where() -> str:
        return f"after {n_done} samples (last complete sample: " \
               f"{last_good if last_good is not None else 'none'})"

    try:
        fs, path = url_to_fs(source, storage_options)
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*",
                                                    tarinfo=_EndAwareTarInfo) as tf:
            for member in tf:
                if member.isdir():
                    continue  # structure, not an image (docs/inputs.md)
                if skipped_part(member.name):  # ._* resource forks, .DS_Store (skip_rules)
                    n_skipped += 1
                    continue
                key, ext = _wds_split(member.name)
                # A name repeated in a row (``tar -r``) starts a new sample: _Dedup then gives it
                # its #dup<n> key and error row, as a repeat anywhere else in the shard.
                if key != sample_key or ext in members:
                    for rec in flush():
                        yield rec
                    if sample_key is not None:
                        n_done += 1
                        last_good = sample_key
                    sample_key, members = key, {}
                members[ext] = member_value(tf, member, ext, max_bytes)
            if n_skipped:
                _SKIPPED_MEMBERS += n_skipped
                logger.warning("%s: skipped %d members by name (docs/inputs.md: ._*, .DS_Store "
                               "…)", source, n_skipped)
            # The pending sample's members were read whole, so it is yielded even when the
            # shard was cut right after them.
            for rec in flush():
                yield rec
            if sample_key is not None:
                n_done += 1
                last_good = sample_key
            end = getattr(tf, "selfment_end", None)
            if end == "marker":
                return
            if shard_key not in skip:
                yield _record(shard_key, source, error=f"truncated WebDataset shard: "
                                                       f"{end or 'no end-of-archive marker'} "
                                                       f"{where()}")
    except Exception as exc:
        if shard_key not in skip:
            yield _record(shard_key, source, error=f"unreadable WebDataset shard {where()}: "
                                                   f"{_one_line(exc)}", kind=error_kind(exc))
