"""The keys a resume skips: one flat array shared by every task, and the pre-pass that leaves
out the containers whose keys are all done.

Without the pre-pass, a resume over a finished output of img2dataset shards still sent every
shard to a read task and started the model actors, only to skip every row; the driver cannot
tell which shards are finished, since it never reads them. The pre-pass reads only the ``key``
column of each parquet shard (in driver threads, compared as arrays: no Python object per key
on the fast path), so a resume over a finished output builds no dataset at all.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from selfment_dist.io.sources import IMAGE, container_key_array

logger = logging.getLogger(__name__)

__all__ = ["SortedKeys", "skip_set", "containers_with_work", "units_left"]

_SKIP_CACHE: dict[str, "SortedKeys"] = {}
# Threads reading key columns in the resume pre-pass (I/O bound: object-store latency).
_READ_THREADS = 16


class SortedKeys:
    """Membership in a sorted numpy array of UTF-8 keys (``dtype S``).

    The done keys of a resume reach every read task through the object store; a numpy array of
    fixed-width bytes is mapped from shared memory without a copy, where a Python set would be
    rebuilt in every worker process (about 100 bytes per key each)."""

    def __init__(self, keys: np.ndarray):
        self.keys = keys

    @classmethod
    def build(cls, keys: "Iterable[str] | SortedKeys") -> "SortedKeys":
        if isinstance(keys, SortedKeys):
            return keys
        return cls(np.array(sorted(k.encode() for k in keys), dtype=bytes))

    @classmethod
    def from_arrow(cls, columns: Iterable[pa.Array | pa.ChunkedArray]) -> tuple["SortedKeys", int]:
        """The distinct keys of arrow string columns (sorted in C, no Python loop over keys),
        and how many keys were repeats."""
        chunks = [c for col in columns
                  for c in (col.chunks if isinstance(col, pa.ChunkedArray) else [col])]
        chunks = [pc.cast(c, pa.binary()) for c in chunks if len(c)]
        if not chunks:
            return cls(np.array([], dtype=bytes)), 0
        flat = pa.concat_arrays(chunks).drop_null()
        keys = np.array(flat.to_numpy(zero_copy_only=False), dtype=bytes)
        unique = np.unique(keys)
        return cls(unique), len(keys) - len(unique)

    def __iter__(self):
        return (k.decode() for k in self.keys)

    def contains_arrow(self, keys: pa.Array) -> bool:
        """Whether every key of an arrow string array is here (vectorised)."""
        if not len(keys):
            return True
        if not len(self.keys) or keys.null_count:
            return False
        query = np.array(pc.cast(keys, pa.binary()).to_numpy(zero_copy_only=False), dtype=bytes)
        at = np.minimum(np.searchsorted(self.keys, query), len(self.keys) - 1)
        return bool(np.all(self.keys[at] == query))

    def contains_each(self, keys: list[str]) -> np.ndarray:
        """Per key of ``keys``: whether it is here (bool array; one vectorised search)."""
        if not keys or not len(self.keys):
            return np.zeros(len(keys), dtype=bool)
        query = np.array([k.encode() for k in keys], dtype=bytes)
        at = np.minimum(np.searchsorted(self.keys, query), len(self.keys) - 1)
        return self.keys[at] == query

    def __contains__(self, key: object) -> bool:
        b = str(key).encode()
        i = int(np.searchsorted(self.keys, b))
        return i < len(self.keys) and self.keys[i] == b

    def __len__(self) -> int:
        return len(self.keys)

    def contains_all(self, keys: list[str]) -> bool:
        """Whether every one of ``keys`` is here (one vectorised search)."""
        return bool(np.all(self.contains_each(keys)))


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


def containers_with_work(containers: list[dict], done: "SortedKeys | Iterable[str]",
                         storage_options: dict | None) -> list[dict]:
    """The containers with a key not in ``done`` (order kept); those whose keys cannot be told
    from a key column (tar shards, unreadable files) are always kept.

    The key columns are read here, in threads (I/O; pyarrow releases the GIL), a few bytes per
    row and one container at a time per thread: a Ray task would first have to start a worker
    process, which costs more than the reads (seconds; tens of seconds on a busy machine)."""
    if not containers or not done:
        return containers
    done = SortedKeys.build(done)
    start = time.perf_counter()

    def has_work(unit: dict) -> bool:
        keys = container_key_array(unit, storage_options=storage_options)
        return keys is None or not done.contains_arrow(keys)

    with ThreadPoolExecutor(max_workers=_READ_THREADS) as pool:
        flags = list(pool.map(has_work, containers))
    kept = [u for u, f in zip(containers, flags) if f]
    logger.info("resume: %d of %d containers still have keys to do (key columns read in "
                "%.1f s)", len(kept), len(containers), time.perf_counter() - start)
    return kept


def units_left(units: list[dict], done: "SortedKeys | Iterable[str]",
               storage_options: dict | None) -> tuple[list[dict], list[dict], SortedKeys]:
    """What a resume still has to read: the work units without the image files already done
    (one vectorised search) and without the containers whose keys are all done
    (:func:`containers_with_work`).

    Returns:
        (units left, the containers among them, ``done`` as :class:`SortedKeys`).
    """
    done = SortedKeys.build(done)
    image_done = iter(done.contains_each([u["key"] for u in units if u["kind"] == IMAGE])
                      .tolist())
    units = [u for u in units if not (u["kind"] == IMAGE and next(image_done))]
    containers = [u for u in units if u["kind"] != IMAGE]
    if done and containers:  # finished containers are left out: nothing to read, no actor
        kept = containers_with_work(containers, done, storage_options)
        if len(kept) < len(containers):
            units, containers = [u for u in units if u["kind"] == IMAGE] + kept, kept
    return units, containers, done
