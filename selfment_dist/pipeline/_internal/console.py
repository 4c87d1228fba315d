"""What a person at a terminal sees while a long command runs: one bar per stage, the rest in a
log file.

:func:`quiet_console` sends file descriptors 1 and 2 (this process's prints and logging, and
everything the Ray processes it starts inherit: Ray Data and Ray Train progress, reports,
warnings) to a log file, and hands back a stream to the real terminal; :class:`StageBar` draws
one tqdm bar per stage on it, moved by a poll of the stage's output while the stage runs.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
from typing import Callable, Iterator, TextIO

from tqdm import tqdm

__all__ = ["quiet_console", "StageBar"]


@contextlib.contextmanager
def quiet_console(log_path: str, *, verbose: bool = False) -> Iterator[TextIO]:
    """Inside: stdout and stderr (fds 1 and 2) go to ``log_path`` (appended); yields a stream
    to the terminal's stderr. ``verbose``: nothing is redirected, yields ``sys.stderr``."""
    if verbose:
        yield sys.stderr
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    console = os.fdopen(os.dup(saved_err), "w", buffering=1, encoding="utf-8",
                        errors="replace")
    log = open(log_path, "a", encoding="utf-8")
    try:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        yield console
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        for fd in (saved_out, saved_err):
            os.close(fd)
        log.close()
        console.close()


class StageBar:
    """A context manager drawing one stage's bar on ``console``.

    Args:
        console: where to draw; label: the stage's name (``"[2/5] train"``); total: the units
            the stage works through; unit: their name.
        poll: called about once a second from a thread while the stage runs, returns the units
            done so far (None when it cannot tell); the bar is completed when the stage ends.
    """

    def __init__(self, console: TextIO, label: str, total: int, *, unit: str = "images",
                 poll: Callable[[], int | None] | None = None):
        self.bar = tqdm(total=total, desc=label.ljust(18), unit=f" {unit}", file=console,
                        dynamic_ncols=True, leave=True, mininterval=0.5,
                        bar_format="{desc} {bar} {n_fmt}/{total_fmt}{unit} [{elapsed}]")
        self.poll = poll
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self) -> "StageBar":
        if self.poll is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            try:
                done = self.poll()
            except Exception:  # a poll that fails (files moving under it) just skips a beat
                done = None
            self._set(done)

    def _set(self, done: int | None) -> None:
        if done is not None and done > self.bar.n:
            self.bar.update(min(done, self.bar.total) - self.bar.n)

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if exc_type is None:
            self._set(self.bar.total)
        self.bar.close()
