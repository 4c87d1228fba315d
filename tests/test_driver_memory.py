"""The driver's memory stays flat: pseudo-labelling 8x more images costs the driver next to nothing.

The driver only ever holds file names and counts; rows stream from read tasks through the model
actors to the write tasks. This test runs ``run_pseudo_label`` in-process over 64 and then 512
tiny images (32 px, with stored features so that a row weighs ~3 KiB) and compares what each run
adds to the driver at its peak, above where it started:

- Python allocations (``tracemalloc``'s peak): a per-row leak of any realistic size (the driver
  keeping each row, its features or its mask) adds MiBs over 448 more rows; the file names and
  keys the driver legitimately holds add well under 1 KiB a row.
- RSS (sampled in a thread with psutil): also catches native memory (Arrow buffers, blocks
  fetched from the object store), under a looser bound since the allocator's noise is MiBs.

A warm-up run first takes the one-time costs (imports, Ray Data's first dataset). No timings.
"""
from __future__ import annotations

import gc
import threading
import tracemalloc

import psutil
import pytest

from selfment_dist.pipeline.pseudo_label import run_pseudo_label
from selfment_dist.data.synthetic import write_scenes

pytestmark = pytest.mark.slow  # 40 to 400 images through the pipeline

SMALL, LARGE = 64, 512
RUN = dict(backbone="vit_small_patch16_224.dino", weights="random", image_size=32,
           batch_size=16, save_features=True, progress=False, model_workers="tasks")
# Per extra row; measured here: ~0.8 KiB (Python) and ~8 KiB (RSS, mostly allocator noise).
# Keeping every row in the driver adds ~5 KiB (Python) a row at this size.
PYTHON_BOUND = 2.0 * 2**10 * (LARGE - SMALL)   # 0.9 MiB
RSS_BOUND = 24 * 2**20


def _peaks(run) -> tuple[int, int]:
    """(peak traced Python bytes, peak RSS) that ``run()`` adds above the start."""
    proc = psutil.Process()
    gc.collect()
    base_rss = proc.memory_info().rss
    peak_rss = [base_rss]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.01):
            peak_rss[0] = max(peak_rss[0], proc.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    tracemalloc.reset_peak()
    base_traced = tracemalloc.get_traced_memory()[0]
    sampler.start()
    try:
        run()
    finally:
        stop.set()
        sampler.join()
    peak_rss[0] = max(peak_rss[0], proc.memory_info().rss)
    return tracemalloc.get_traced_memory()[1] - base_traced, peak_rss[0] - base_rss


@pytest.fixture
def traced():
    tracemalloc.start()
    yield
    tracemalloc.stop()


def test_driver_memory_does_not_grow_with_the_number_of_images(ray_local, tmp_path, traced):
    data = {n: tmp_path / f"images-{n}" for n in (8, SMALL, LARGE)}
    for n, root in data.items():
        write_scenes(str(root), n, size=(32, 32))

    def run(n: int):
        def go():
            summary = run_pseudo_label(str(data[n] / "images"), str(tmp_path / f"out-{n}"), **RUN)
            assert summary["rows_total"] == n
        return go

    _peaks(run(8))  # warm-up: imports, Ray Data's first dataset
    small_py, small_rss = _peaks(run(SMALL))
    large_py, large_rss = _peaks(run(LARGE))
    mib = 2**20
    print(f"driver peak above start: {SMALL} images {small_py / mib:.2f} MiB Python, "
          f"{small_rss / mib:.2f} MiB RSS; {LARGE} images {large_py / mib:.2f} MiB Python, "
          f"{large_rss / mib:.2f} MiB RSS")
    assert large_py - small_py < PYTHON_BOUND, (small_py, large_py)
    assert large_rss - small_rss < RSS_BOUND, (small_rss, large_rss)
