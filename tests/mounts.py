"""Real file-system faults for tests: a read-only bind mount, a small tmpfs that fills up.
Both need root with mount rights; where those are missing the test is skipped (chmod is no
substitute: it does not stop root)."""
from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

import pytest


def _mount(*args: str) -> None:
    try:
        subprocess.run(["mount", *args], check=True, capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot mount here ({exc})")


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=10)


@contextlib.contextmanager
def read_only_bind(src: Path, target: Path):
    """``target``: a read-only view of the folder ``src``."""
    target.mkdir(parents=True, exist_ok=True)
    _mount("--bind", str(src), str(target))
    try:
        _mount("-o", "remount,bind,ro", str(target))
        yield target
    finally:
        _umount(target)


@contextlib.contextmanager
def small_tmpfs(target: Path, size: str = "1m"):
    """A tmpfs of ``size`` at ``target``: a disk that can really be filled."""
    target.mkdir(parents=True, exist_ok=True)
    _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(target))
    try:
        yield target
    finally:
        _umount(target)


def fill(folder: Path) -> Path:
    """Fill the file system of ``folder`` up to its last block; returns the filler file."""
    filler = folder / "filler.bin"
    with open(filler, "wb", buffering=0) as f:  # unbuffered: nothing left to flush at close
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    return filler
