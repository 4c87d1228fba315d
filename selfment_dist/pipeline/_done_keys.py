"""The keys a resume skips: one flat array shared by every task, and the pre-pass that leaves
out the containers whose keys are all done.

Without the pre-pass, a resume over a finished output of img2dataset shards still sent every
shard to a read task and started the model actors, only to skip every row; the driver cannot
tell which shards are finished, since it never reads them. The pre-pass reads only the ``key``
column of each parquet shard, in parallel light tasks, so a resume over a finished output builds
no dataset at all.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Iterable

import numpy as np

from ..io.sources import container_keys
from ._ray import LIGHT_TASK_CPUS, MAX_RETRIES

logger = logging.getLogger(__name__)

__all__ = ["SortedKeys", "skip_set", "containers_with_work"]

_SKIP_CACHE: dict[str, "SortedKeys"] = {}
# Containers per pre-pass task: enough that a task's start-up is a small part of its work.
_CONTAINERS_PER_TASK = 16


class SortedKeys:
    """Membership in a sorted numpy array of UTF-8 keys (``dtype S``).

    The done keys of a resume reach every read task through the object store; a numpy array of
    fixed-width bytes is mapped from shared memory without a copy, where a Python set would be
    rebuilt in every worker process (about 100 bytes per key each)."""

    def __init__(self, keys: np.ndarray):
        self.keys = keys

    @classmethod
    def build(cls, keys: Iterable[str]) -> "SortedKeys":
        return cls(np.array(sorted(k.encode() for k in keys), dtype=bytes))

    def __contains__(self, key: object) -> bool:
        b = str(key).encode()
        i = int(np.searchsorted(self.keys, b))
        return i < len(self.keys) and self.keys[i] == b

    def __len__(self) -> int:
        return len(self.keys)

    def contains_all(self, keys: list[str]) -> bool:
        """Whether every one of ``keys`` is here (one vectorised search)."""
        if not keys:
            return True
        if not len(self.keys):
            return False
        query = np.array([k.encode() for k in keys], dtype=bytes)
        at = np.minimum(np.searchsorted(self.keys, query), len(self.keys) - 1)
        return bool(np.all(self.keys[at] == query))


def skip_set(skip_ref: list | None) -> SortedKeys | frozenset:
    """The done keys (mapped from the object store once per worker process)."""
    if not skip_ref:
        return frozenset()
    ref = skip_ref[0]
    cache_key = ref.hex()
    if cache_key not in _SKIP_CACHE:
        import ray
        _SKIP_CACHE.clear()
        _SKIP_CACHE[cache_key] = SortedKeys(ray.get(ref))
    return _SKIP_CACHE[cache_key]


def _has_work(units: list[dict], skip_ref: list, storage_options: dict | None) -> list[bool]:
    """Per container: whether a read task would give it any row (unknown keys count as work)."""
    done = skip_set(skip_ref)
    flags = []
    for unit in units:
        keys = container_keys(unit, storage_options=storage_options)
        flags.append(keys is None or not done.contains_all(keys))
    return flags


def containers_with_work(containers: list[dict], skip_ref: list | None,
                         storage_options: dict | None) -> list[dict]:
    """The containers with a key not in the done keys at ``skip_ref`` (order kept); those whose
    keys cannot be told from a key column (tar shards, unreadable files) are always kept."""
    if not containers or not skip_ref:
        return containers
    import ray

    start = time.perf_counter()
    task = ray.remote(num_cpus=LIGHT_TASK_CPUS, max_retries=MAX_RETRIES)(_has_work)
    n_tasks = math.ceil(len(containers) / _CONTAINERS_PER_TASK)
    chunks = [containers[i::n_tasks] for i in range(n_tasks)]
    flags = ray.get([task.remote(chunk, skip_ref, storage_options) for chunk in chunks])
    pending = {id(u) for chunk, fl in zip(chunks, flags) for u, f in zip(chunk, fl) if f}
    kept = [u for u in containers if id(u) in pending]
    logger.info("resume: %d of %d containers still have keys to do (key columns read in "
                "%.1f s)", len(kept), len(containers), time.perf_counter() - start)
    return kept
