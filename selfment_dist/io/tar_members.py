"""What one WebDataset tar member gives: its bytes, or why it gives none (its error row's text).

Regular members are read (image extensions only, within the byte limit, checked on the header's
size before reading). Links and special files (symbolic and hard links, devices, fifos, unknown
types) are never followed or opened: each is reported, so a shard's rows account for every
member (docs/inputs.md). Folder members and members named by :mod:`.skip_rules` are handled by
the caller, before grouping members into samples.
"""
from __future__ import annotations

import tarfile

from selfment_dist.io.images import IMAGE_EXTENSIONS, too_many_bytes

__all__ = ["member_value"]

# What a tar member that is not a regular file is, for its error row.
_SPECIAL_MEMBERS = ((tarfile.TarInfo.issym, "a symbolic link"), (tarfile.TarInfo.islnk, "a hard link"),
                    (tarfile.TarInfo.ischr, "a character device"),
                    (tarfile.TarInfo.isblk, "a block device"), (tarfile.TarInfo.isfifo, "a fifo"))


def member_value(tf, member: tarfile.TarInfo, ext: str, max_bytes: int | None
                 ) -> bytes | str | None:
    """A member's bytes when it is a plain image within the byte limit (checked on the header's
    size, before reading); else None (not an image: noted by extension) or why it cannot be one
    (a link or special file, never followed; too many bytes), the text of its error row."""
    if not member.isfile():
        what = next((name for test, name in _SPECIAL_MEMBERS if test(member)),
                    f"of tar type {member.type!r}")
        target = f" to {member.linkname!r}" if member.linkname else ""
        return (f"tar member {member.name!r} is {what}{target}, not a file: links and special "
                "files are not followed")
    if ext not in IMAGE_EXTENSIONS:
        return None
    if max_bytes is not None and member.size > max_bytes:
        return too_many_bytes(member.size, max_bytes)
    return tf.extractfile(member).read()
