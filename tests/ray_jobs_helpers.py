"""Shared by the Jobs API tests (a one-node head, the multi-node cluster's head)."""
from __future__ import annotations

import time


def submit_when_agent_is_up(client, *, wait_s: float = 300.0, **job) -> str:
    """``client.submit_job(**job)``, retried while the head answers 'No available agent': its
    dashboard agent registers seconds after start-up on a loaded machine (or after the nodes
    were replaced)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(2)
