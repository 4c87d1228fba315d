"""Repeated small pseudo-label runs in one driver: model replicas as actors (the default) or as
tasks on warm workers (``model_workers="tasks"``).

One local Ray (``--cpus``, default 2) and one driver; ``--runs`` runs (default 4) of
``--images`` synthetic 64x80 JPEGs (default 16) at 64 px with random ViT-S/16 DINO weights,
each into a fresh output. Reports the wall time of every run and the model replicas it started
(the summary's ``replicas_started``): with actors every run starts its replicas afresh (process,
torch/timm/Ray Data imports, the ViT build); with tasks only the first does.

Usage::

    python benchmarks/warm_workers.py                 # both modes, Markdown table
    python benchmarks/warm_workers.py --images 64 --runs 6
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _one_mode(mode: str, images: int, runs: int, cpus: int) -> None:
    """In a driver of its own: print one line per run, ``mode run wall_s replicas``."""
    import time

    import ray

    from selfment_dist.pipeline.pseudo_label import run_pseudo_label
    from selfment_dist.data.synthetic import write_scenes

    root = tempfile.mkdtemp(prefix="warm-")
    write_scenes(f"{root}/data", images, size=(64, 80))
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    for i in range(runs):
        start = time.perf_counter()
        summary = run_pseudo_label(f"{root}/data/images", f"{root}/out{i}",
                                   backbone="vit_small_patch16_224.dino", weights="random",
                                   image_size=64, batch_size=4, progress=False,
                                   model_workers=mode)
        print(f"RESULT {mode} {i + 1} {time.perf_counter() - start:.1f} "
              f"{summary['replicas_started']}", flush=True)
    ray.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--runs", type=int, default=4)
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--mode", choices=["actors", "tasks"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.mode:
        _one_mode(a.mode, a.images, a.runs, a.cpus)
        return
    rows = {}
    for mode in ("actors", "tasks"):  # each in a fresh driver and Ray
        out = subprocess.run([sys.executable, __file__, "--mode", mode, "--images",
                              str(a.images), "--runs", str(a.runs), "--cpus", str(a.cpus)],
                             capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("RESULT "):
                _, m, run, wall, replicas = line.split()
                rows.setdefault(int(run), {})[m] = (float(wall), int(replicas))
    print(f"{a.images} images a run, {a.cpus} CPUs, one driver\n")
    print("| run | actors: wall s | replicas started | tasks: wall s | replicas started |")
    print("|---:|---:|---:|---:|---:|")
    for run, r in sorted(rows.items()):
        print(f"| {run} | {r['actors'][0]:.1f} | {r['actors'][1]} | {r['tasks'][0]:.1f} | "
              f"{r['tasks'][1]} |")


if __name__ == "__main__":
    main()
