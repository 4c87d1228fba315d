"""Which file and folder names are not inputs, and a count of every one passed over.

Nothing a user may mean as an image is skipped by its name: camera files such as
``_DSC1234.JPG`` and folders such as ``_selects/`` are inputs. Skipped on purpose, each one
counted (``docs/inputs.md``), are only:

- ``hidden``: a name starting with ``.`` (``.git/``, ``.Trash-1000/``, ``.DS_Store``, the
  ``._*`` AppleDouble resource forks macOS writes beside files on foreign disks and in archives);
- ``system``: names operating systems and archivers leave behind (``__MACOSX/``, ``Thumbs.db``,
  ``desktop.ini``, ``$RECYCLE.BIN/``, ``System Volume Information/``);
- ``marker``: job markers of data tools (``_SUCCESS``, ``_FAILED``, parquet's ``_metadata`` and
  ``_common_metadata``);
- ``selfment output``: what selfment writes into its outputs (``_selfment.json``,
  ``_segment.json``, ``_train_config.json``, and the folders ``_tmp/``, ``_overlays/``,
  ``_train/``), so an output folder given as an input is not read back as images.

Files whose extension is not an input's (``.xmp`` sidecars, raw ``.ARW``/``.NEF`` files,
``notes.txt``) are counted too, as ``not an image``.

No import of Ray or torch (``io/`` rule).
"""
from __future__ import annotations

from collections import Counter

__all__ = ["HIDDEN", "SYSTEM", "MARKER", "OWN_OUTPUT", "NOT_AN_IMAGE", "skip_reason",
           "skipped_part", "SkipCounter"]

HIDDEN, SYSTEM, MARKER, OWN_OUTPUT, NOT_AN_IMAGE = (
    "hidden", "system", "marker", "selfment output", "not an image")

# Exact names, compared case-insensitively (Windows and macOS names vary in case).
_SYSTEM_NAMES = frozenset({"__macosx", "thumbs.db", "ehthumbs.db", "desktop.ini",
                           "$recycle.bin", "system volume information"})
_MARKER_NAMES = frozenset({"_success", "_failed", "_metadata", "_common_metadata"})
# pipeline/_internal/parts.py (MANIFEST_NAME, TMP_DIR), pipeline/segment.py (MANIFEST_NAME,
# OVERLAY_DIR), pipeline/_internal/train_checkpoints.py (RUN_NAME, CONFIG_NAME).
_OWN_OUTPUT_NAMES = frozenset({"_selfment.json", "_segment.json", "_train_config.json", "_tmp",
                               "_overlays", "_train"})
#: How many skipped paths a report names.
EXAMPLES = 10


def skip_reason(name: str) -> str | None:
    """Why one path component ``name`` (a file or folder name) is not an input, or None."""
    if name.startswith("."):
        return HIDDEN
    low = name.lower()
    if low in _SYSTEM_NAMES:
        return SYSTEM
    if low in _MARKER_NAMES:
        return MARKER
    if low in _OWN_OUTPUT_NAMES:
        return OWN_OUTPUT
    return None


def skipped_part(rel: str) -> tuple[str, str] | None:
    """``(path up to the first skipped component, reason)`` for a relative path, or None when
    no component is skipped (``a/.git/x.jpg`` → ``("a/.git", "hidden")``)."""
    parts = [p for p in rel.split("/") if p not in ("", ".")]  # tar names may start with ./
    for i, part in enumerate(parts):
        reason = skip_reason(part)
        if reason:
            return "/".join(parts[: i + 1]), reason
    return None


class SkipCounter:
    """Counts skipped inputs by reason, with a few examples: what the manifest records."""

    def __init__(self):
        self.by_reason: Counter = Counter()
        self.examples: list[str] = []

    def add(self, reason: str, where: str) -> None:
        self.by_reason[reason] += 1
        if len(self.examples) < EXAMPLES and where not in self.examples:
            self.examples.append(where)

    def report(self) -> dict:
        """``{"total", "by_reason": {reason: n}, "examples": [paths]}`` (JSON-safe)."""
        return {"total": sum(self.by_reason.values()), "by_reason": dict(self.by_reason),
                "examples": list(self.examples)}
