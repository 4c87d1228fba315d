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


# Ray waits a fixed 30 s for a new node's raylet to register (ray/_private/node.py); once, with
# the two test lanes loading both cores, a CLI run's own Ray took longer and the run ended there.
RAY_START_TIMED_OUT = "The current node timed out during startup"
RAY_STARTED = "Started a local Ray instance"


def start_cli(args: list[str], log: Path, env: dict | None = None, *,
              attempts: int = 3) -> subprocess.Popen:
    """``selfment <args>`` in its own session (no ``RAY_ADDRESS``), stdout+stderr to ``log``;
    returns once its own Ray is up (or the run has ended). Should that Ray not come up in
    Ray's fixed wait, nothing of the run has happened: it is started again, up to ``attempts``
    times in all."""
    full = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    full.update(HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0", **(env or {}))
    for attempt in range(1, attempts + 1):
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "selfment_dist.cli", *args], env=full,
                                    stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 300
        while proc.poll() is None and RAY_STARTED not in log.read_text(errors="replace"):
            if time.monotonic() > deadline:
                return proc  # the caller's own deadline reports it
            time.sleep(POLL_S)
        if attempt == attempts or not ray_start_timed_out(proc.poll(),
                                                          log.read_text(errors="replace")):
            return proc
        print(f"the run's own Ray did not start in time (attempt {attempt}); again")
        kill_session(proc)


def ray_start_timed_out(returncode: int | None, output: str) -> bool:
    """A run that ended because its own Ray missed Ray's fixed raylet wait (nothing else ran)."""
    return returncode not in (None, 0) and RAY_START_TIMED_OUT in output


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
