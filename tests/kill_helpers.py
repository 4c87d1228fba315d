"""Shared by the kill tests: a ``selfment`` CLI run in a session of its own, waited on and killed.

The run is ``python -m selfment_dist.cli <stage> ...`` in a new session with its own local Ray
(``ensure_ray`` starts Ray with ``address="local"``). SIGKILL of its process group ends the
driver, GCS and raylet; Ray's workers each run in a process group of their own and can outlive
that for tens of seconds, so they are found by session id and killed too.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import psutil
import pytest

POLL_S = 0.05


def start_cli(args: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    """``selfment <args>`` in its own session (no ``RAY_ADDRESS``), stdout+stderr to ``log``."""
    full = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    full.update(HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0", **(env or {}))
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "selfment_dist.cli", *args], env=full,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def wait_until(ready: Callable[[], bool], proc: subprocess.Popen, log: Path,
               deadline_s: float) -> bool:
    """Poll ``ready`` until it holds (True) or ``proc`` exits first (False); fails the test
    after ``deadline_s`` (a hang, not a slow machine: choose it generously)."""
    deadline = time.monotonic() + deadline_s
    while not ready():
        if proc.poll() is not None:
            return ready()
        if time.monotonic() > deadline:
            pytest.fail(f"nothing after {deadline_s:.0f} s:\n" + tail(log))
        time.sleep(POLL_S)
    return True


def session_members(sid: int) -> list[psutil.Process]:
    """Live (non-zombie) processes of session ``sid``."""
    members = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid and p.status() != psutil.STATUS_ZOMBIE:
                members.append(p)
        except (OSError, psutil.Error):  # gone meanwhile, or not ours to look at
            continue
    return members


def kill_session(proc: subprocess.Popen, timeout: float = 30.0) -> list[str]:
    """SIGKILL the process group of ``proc``, then every process left in its session.

    Returns the names of the processes that survived the ``killpg`` (Ray workers live in process
    groups of their own). Raises if anything of the session is still alive after ``timeout``.
    """
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=timeout)
    survivors: list[str] = []
    deadline = time.monotonic() + timeout
    while True:
        left = session_members(proc.pid)
        if not left:
            return survivors
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes of the killed run still alive: {left}")
        for p in left:
            try:
                survivors.append(p.name())
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(left, timeout=2)


def name(p: psutil.Process) -> str:
    try:
        return p.name()
    except psutil.Error:
        return "?"


def tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "<no log>"
