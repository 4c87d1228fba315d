"""Pseudo-labelling speed and driver memory, side by side, on the same images.

Speed (same synthetic JPEGs, same backbone, same image size):

  (a) pipeline   ``run_pseudo_label``: Ray Data read/decode tasks → one fused backbone + NCut +
                 IPO actor stage → parquet. End to end: includes Ray Data start-up, the actor's
                 model load and the writes. (a') the same, steady state: runs on n/4 and n
                 images, differenced, so the fixed start-up cost cancels. (a'') the same run's
                 streaming rate: rows after the first quarter over the time they took, read
                 from the model actors' per-batch reports (start-up falls before the window).
  (b) published  the per-image loop as published: read + decode + resize one image, the same
                 backbone on a batch of 1, dense scipy generalised eigensolver
                 (``scipy.linalg.eigh(D - A, D, subset_by_index=[1, 1])``), IPO in numpy
                 (``selfment_dist.algorithm.reference``).
  (c) forward    the backbone's forward pass alone, batched, on pre-resized images: the limit
                 of the hardware for this model.
  (d) ncut+ipo   batched NCut + IPO alone on (c)'s features (explains the gap (a) → (c)).

With ``--precision bf16`` a last table compares bf16 with fp32 (the official numerics, what
``auto`` runs): the forward speed gain, and how many mask patches agree (NCut + IPO on the
features of each), so the gain can be weighed against the masks it changes.

Wall time and CPU time (this process and its children: the local Ray) are both reported: on a
shared machine other jobs stretch wall time but not CPU seconds per image.

Memory: peak RSS of the driver process (psutil, sampled every 20 ms) for pipeline runs over
1,000 and 5,000 small images, each run in a fresh process.

Usage::

    python benchmarks/pseudo_label.py                       # speed, then memory; markdown out
    python benchmarks/pseudo_label.py --n 64 --skip-memory  # speed only, more images
    python benchmarks/pseudo_label.py --skip-speed --memory-sizes 1000,5000
    # CPUs with native bf16 (AVX512-BF16/AMX); 64 images so that the steady state is measurable:
    python benchmarks/pseudo_label.py --n 64 --n-published 32 --skip-memory --precision bf16
    # On a GPU node (or a cluster: --address auto), with real weights:
    python benchmarks/pseudo_label.py --weights hub --n 512 --batch-size 32 --address auto
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from _common import load_avg, start_ray, sync  # noqa: E402


def _images(root: Path, n: int, size: tuple[int, int]) -> Path:
    from selfment_dist.data.synthetic import write_scenes

    write_scenes(str(root), n, size=size)
    return root / "images"


# --- speed -------------------------------------------------------------------------------------

class Meter:
    """Wall time and CPU time (user + system) of this process and all its descendants (Ray's
    raylet, workers and actors when Ray runs locally), polled so that processes exiting during
    the measurement still count. CPU seconds per image is the load-robust figure on a shared
    machine: other jobs stretch wall time, not the work done."""

    def __init__(self, interval: float = 0.2):
        import psutil

        self._proc = psutil.Process()
        self._interval = interval
        self._seen: dict[int, float] = {}
        self._roles: dict[tuple, str] = {}
        self._stop = threading.Event()

    @staticmethod
    def _role(p, me) -> str:
        """Which part of the pipeline a process is (Ray names its workers ``ray::…``)."""
        import psutil

        if p.pid == me.pid:
            return "driver"
        try:
            cmd = " ".join(p.cmdline())
        except psutil.Error:
            return "other"
        if "Actor)" in cmd or "MapWorker" in cmd:
            return "model actor"
        if cmd.startswith("ray::") and cmd[5:6] not in ("_", "") and "Agent" not in cmd \
                and "Tracker" not in cmd and "RunCounters" not in cmd:
            return "decode/write workers"
        if "default_worker.py" in cmd:
            return "decode/write workers"  # a worker that has not named itself yet
        return "Ray's own processes"

    def _poll(self) -> None:
        import psutil

        try:
            procs = [self._proc] + self._proc.children(recursive=True)
        except psutil.Error:
            procs = [self._proc]
        for p in procs:
            try:
                t = p.cpu_times()
                key = (p.pid, p.create_time())
                self._seen[key] = t.user + t.system
                if self._roles.get(key) != "model actor":  # a worker names itself late
                    self._roles[key] = self._role(p, self._proc)
            except psutil.Error:
                pass

    def __enter__(self) -> "Meter":
        self._poll()
        self._base = dict(self._seen)
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        self._t0 = time.perf_counter()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self._poll()

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self._t0
        self._stop.set()
        self._thread.join()
        self._poll()
        self.cpu = sum(v - self._base.get(k, 0.0) for k, v in self._seen.items())
        self.by_role: dict[str, float] = {}
        for k, v in self._seen.items():
            role = self._roles.get(k, "other")
            self.by_role[role] = self.by_role.get(role, 0.0) + v - self._base.get(k, 0.0)


def bench_forward(backbone, arrays: np.ndarray, batch_size: int) -> Meter:
    backbone(arrays[:1])  # warm-up (allocations, kernels)
    sync(backbone.device)
    with Meter() as m:
        for i in range(0, len(arrays), batch_size):
            backbone(arrays[i:i + batch_size])
        sync(backbone.device)
    return m


def bench_ncut_ipo(backbone, arrays: np.ndarray, batch_size: int) -> Meter:
    from selfment_dist import pseudo_label

    feats = [backbone(arrays[i:i + batch_size]) for i in range(0, len(arrays), batch_size)]
    sync(backbone.device)
    with Meter() as m:
        for f in feats:
            pseudo_label(f)
        sync(backbone.device)
    return m


def bench_published(backbone, files: list[Path], image_size: int) -> Meter:
    from PIL import Image

    from selfment_dist.model.backbone import resize_square
    from selfment_dist.algorithm.reference import reference_pseudo_label

    with Meter() as m:
        for path in files:
            with Image.open(path) as im:
                arr = np.array(resize_square(im.convert("RGB"), image_size))
            feats = backbone(arr[None])[0].cpu().numpy()
            reference_pseudo_label(feats)
    return m


def precision_comparison(args, arrays: np.ndarray, bf16_backbone, bf16_fwd: float) -> str:
    """bf16 vs fp32 on the same images and weights: forward speed and mask patch agreement."""
    from selfment_dist import pseudo_label
    from selfment_dist.model.backbone import build_backbone

    fp32 = build_backbone(args.backbone, weights=args.weights, image_size=args.image_size,
                          precision="fp32")
    fwd = bench_forward(fp32, arrays, args.batch_size)
    agree, same_image = [], []
    for i in range(0, len(arrays), args.batch_size):
        chunk = arrays[i:i + args.batch_size]
        a = pseudo_label(fp32(chunk)).cpu().numpy()
        b = pseudo_label(bf16_backbone(chunk)).cpu().numpy()
        agree.append((a == b).reshape(len(a), -1).mean(1))
        same_image.append((a == b).reshape(len(a), -1).all(1))
    agree, same_image = np.concatenate(agree), np.concatenate(same_image)
    fp32_rate = len(arrays) / fwd.wall
    return "\n".join([
        f"### bf16 vs fp32 (official numerics, `--precision fp32`): {len(arrays)} images",
        "",
        "| forward images/s fp32 | forward images/s bf16 | bf16 speed-up | mask patches agreeing "
        "(mean / min per image) | images with identical masks |",
        "|---:|---:|---:|---:|---:|",
        f"| {fp32_rate:.3f} | {bf16_fwd:.3f} | {bf16_fwd / fp32_rate:.2f}x | "
        f"{agree.mean():.4%} / {agree.min():.4%} | {same_image.mean():.1%} |",
    ])


class RowClock:
    """Rows labelled so far over time, read from the run's counter actor (the model actors
    report each batch there, see ``_internal/counters.py``), polled every ``interval`` s.

    :meth:`rate` is the streaming rate: rows after the first quarter over the time they took,
    from the first report at or past a quarter of ``n`` to the last. Start-up (Ray Data's
    planning, actor starts, model loads) falls before the window, so nothing has to cancel it;
    with several actors the window's start can be off by at most one batch of the others."""

    def __init__(self, interval: float = 0.1):
        self._interval = interval
        self._stop = threading.Event()
        self.samples: list[tuple[float, int]] = []

    def _counter(self):
        import ray

        from selfment_dist.pipeline._internal.counters import COUNTERS_PREFIX

        names = [n for n in ray.util.list_named_actors() if n.startswith(COUNTERS_PREFIX)]
        return ray.get_actor(names[0]) if names else None

    def _loop(self) -> None:
        import ray

        from selfment_dist.pipeline._internal.counters import split_counters

        counter = None
        while not self._stop.wait(self._interval):
            try:
                counter = counter or self._counter()
                if counter is None:
                    continue
                rows = sum(split_counters(ray.get(counter.get.remote(), timeout=5))[0].values())
            except Exception:  # the run ended and took its counter actor with it
                counter = None
                continue
            if not self.samples or rows != self.samples[-1][1]:
                self.samples.append((time.perf_counter(), rows))

    def __enter__(self) -> "RowClock":
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def rate(self, n: int) -> float:
        start = next(((t, r) for t, r in self.samples if r >= n / 4), None)
        if start is None or self.samples[-1][0] <= start[0]:
            return float("nan")
        end = self.samples[-1]
        return (end[1] - start[1]) / (end[0] - start[0])


def bench_pipeline(folder: Path, output: Path, args) -> tuple[Meter, dict, float]:
    """One pipeline run: its meter, its summary and its streaming rate (:class:`RowClock`)."""
    import ray

    from selfment_dist.pipeline.pseudo_label import run_pseudo_label

    start_ray(args.address, args.num_cpus)
    try:
        with Meter() as m, RowClock() as clock:
            summary = run_pseudo_label(str(folder), str(output), backbone=args.backbone,
                                       weights=args.weights, image_size=args.image_size,
                                       precision=args.precision, batch_size=args.batch_size,
                                       progress=False)
    finally:
        ray.shutdown()
    return m, summary, clock.rate(summary["images"])


def speed(args, work: Path) -> str:
    import torch
    from PIL import Image

    from selfment_dist.model.backbone import build_backbone, resize_square

    folder = _images(work / "speed", args.n, args.source_size)
    files = sorted(folder.glob("*.jpg"))
    n_pub = min(args.n_published or args.n, args.n)
    arrays = np.stack([resize_square(Image.open(p).convert("RGB"), args.image_size)
                       for p in files])
    load_before = load_avg()
    backbone = build_backbone(args.backbone, weights=args.weights, image_size=args.image_size,
                              precision=args.precision)
    threads = torch.get_num_threads()

    # (c) right before and right after (a): on a shared machine the load drifts. Ray runs only
    # during (a), so the other measurements count this process alone.
    fwd1 = bench_forward(backbone, arrays, args.batch_size)
    ncut = bench_ncut_ipo(backbone, arrays, args.batch_size)
    # (a) twice, on n/4 then n images: the difference cancels the fixed start-up cost
    # (Ray Data planning, actor start, model load), leaving the streaming throughput.
    n_small = max(1, args.n // 4)
    small = work / "speed-small"
    small.mkdir()
    for f in files[:n_small]:
        shutil.copy(f, small / f.name)
    on_gpu = backbone.device.type == "cuda"
    if on_gpu:  # the pipeline's actors get the GPU to themselves
        backbone = None
        torch.cuda.empty_cache()
    pipe_small, _, _ = bench_pipeline(small, work / "speed-small-out", args)
    pipe, summary, streaming = bench_pipeline(folder, work / "speed-out", args)
    if on_gpu:
        backbone = build_backbone(args.backbone, weights=args.weights,
                                  image_size=args.image_size, precision=args.precision)
    fwd2 = bench_forward(backbone, arrays, args.batch_size)
    pub = bench_published(backbone, files[:n_pub], args.image_size)
    load_after = load_avg()

    n = args.n
    rate = {"a": n / pipe.wall, "b": n_pub / pub.wall, "c": 2 * n / (fwd1.wall + fwd2.wall),
            "d": n / ncut.wall,
            "s": float("nan"), "r": streaming}
    cpu = {"a": pipe.cpu / n, "b": pub.cpu / n_pub, "c": (fwd1.cpu + fwd2.cpu) / (2 * n),
           "d": ncut.cpu / n, "s": float("nan"), "r": float("nan")}
    # The difference is only meaningful when the extra images outweigh run-to-run noise.
    if pipe.wall > pipe_small.wall and pipe.cpu > pipe_small.cpu and n - n_small >= 8:
        rate["s"] = (n - n_small) / (pipe.wall - pipe_small.wall)
        cpu["s"] = (pipe.cpu - pipe_small.cpu) / (n - n_small)
    names = {"a": "(a) pipeline (Ray Data, end to end)",
             "s": f"(a') pipeline, steady state ({n} minus {n_small} images, start-up cancelled)",
             "r": "(a'') pipeline, streaming rate (rows after the first quarter, from the actors' "
                  "reports)",
             "b": "(b) published per-image loop (scipy eigh)",
             "c": "(c) backbone forward alone, batched",
             "d": "(d) batched NCut + IPO alone (on (c)'s features)"}
    lines = [
        f"### Speed: {n} images ({args.source_size[1]}x{args.source_size[0]} JPEG) at "
        f"{args.image_size} px, `{args.backbone}` (weights={args.weights}, "
        f"{backbone.precision}), batch {args.batch_size}",
        "",
        "| method | images/s (wall) | (a) vs this, wall | (a') vs this, wall | (a'') vs this, "
        "wall | CPU s / image | (a') vs this, CPU |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for k in "asrbcd":
        vs_a = f"{rate['a'] / rate[k]:.2f}x" if k in "bc" else ""
        vs_s = f"{rate['s'] / rate[k]:.2f}x" if k in "bc" else ""
        vs_r = f"{rate['r'] / rate[k]:.2f}x" if k in "bc" else ""
        vs_cpu = f"{cpu[k] / cpu['s']:.2f}x" if k in "bc" else ""
        lines.append(f"| {names[k]} | {rate[k]:.3f} | {vs_a} | {vs_s} | {vs_r} | {cpu[k]:.2f} | "
                     f"{vs_cpu} |")
    bound = 1 / (1 / rate["c"] + 1 / rate["d"])
    lines += [
        "",
        f"\"vs this\": the pipeline's throughput over the row's (wall), and the row's CPU seconds "
        f"per image over the pipeline's (CPU): above 1.00x the pipeline is faster / does less "
        f"work. The start-up cost cancelled in (a'): {pipe_small.wall:.1f} s wall for the "
        f"{n_small}-image run. (c) is the "
        f"mean of runs right before and after the pipeline ({n / fwd1.wall:.3f} and {n / fwd2.wall:.3f} "
        f"images/s). Pipeline: {summary['images']} rows, {summary['errors']} errors, wall "
        f"{pipe.wall:.1f} s including Ray Data start-up, the actor's model load and the writes; "
        f"its CPU counts every Ray process of the local cluster (raylet, GCS, workers). "
        f"Upper bound for (a) from (c) + (d) alone: {bound:.3f} images/s ({bound / rate['c']:.0%} "
        f"of (c)).",
        f"(b) timed on {n_pub} images. torch threads here: {threads}; {os.cpu_count()} CPUs "
        f"({platform.machine()}); load average (1/5/15 min) before: {load_before}, after: "
        f"{load_after}.",
    ]
    if rate["s"] == rate["s"]:  # not NaN: where the steady state's CPU went
        steady = {r: (pipe.by_role.get(r, 0.0) - pipe_small.by_role.get(r, 0.0)) / (n - n_small)
                  for r in sorted(set(pipe.by_role) | set(pipe_small.by_role))}
        actor = steady.get("model actor", float("nan"))
        lines += ["", "(a') CPU s per image by process: "
                  + ", ".join(f"{r} {v:.2f}" for r, v in steady.items())
                  + f"; the model actor spends {actor / cpu['c']:.2f}x (c)'s CPU per image."]
    if backbone.precision == "bf16":
        lines += ["", precision_comparison(args, arrays, backbone, rate["c"])]
    return "\n".join(lines)


# --- memory ------------------------------------------------------------------------------------

def memory_child(n: int, args) -> dict:
    """One pipeline run over ``n`` small images; this process's RSS sampled throughout."""
    import psutil

    proc = psutil.Process()
    work = Path(tempfile.mkdtemp(prefix=f"selfment-mem-{n}-"))
    folder = _images(work, n, (64, 80))
    start_ray(args.address, args.num_cpus)
    from selfment_dist.pipeline.pseudo_label import run_pseudo_label

    baseline = proc.memory_info().rss
    peak = [baseline]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    summary = run_pseudo_label(str(folder), str(work / "out"), backbone=args.backbone,
                               weights=args.weights, image_size=args.memory_image_size,
                               batch_size=args.memory_batch_size, progress=False)
    stop.set()
    sampler.join()
    return {"n": n, "baseline_mb": baseline / 2**20, "peak_mb": peak[0] / 2**20,
            "images": summary["images"], "wall_s": summary["wall_s"],
            "images_per_s": summary["images_per_s"]}


def memory(args) -> str:
    rows = []
    for n in args.memory_sizes:
        cmd = [sys.executable, __file__, "--_memory-child", str(n), "--backbone", args.backbone,
               "--weights", args.weights, "--memory-image-size", str(args.memory_image_size),
               "--memory-batch-size", str(args.memory_batch_size)]
        if args.address:
            cmd += ["--address", args.address]
        if args.num_cpus:
            cmd += ["--num-cpus", str(args.num_cpus)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    first = rows[0]["peak_mb"]
    lines = [f"### Driver memory: small images (64x80 JPEG) at {args.memory_image_size} px, "
             f"batch {args.memory_batch_size}", "",
             "| images | driver RSS after start-up (MB) | peak driver RSS (MB) | vs first | "
             "images/s |", "|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['n']:,} | {r['baseline_mb']:.0f} | {r['peak_mb']:.0f} | "
                     f"{r['peak_mb'] / first - 1:+.1%} | {r['images_per_s']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    from selfment_dist.model.backbone import DEFAULT_BACKBONE, PRECISIONS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=24, help="images for the speed comparison")
    p.add_argument("--n-published", type=int, default=None,
                   help="images timed for (b) (default: all --n)")
    p.add_argument("--image-size", type=int, default=768)
    p.add_argument("--source-size", type=lambda s: tuple(int(v) for v in s.split("x")),
                   default=(480, 640), help="HxW of the synthetic JPEGs")
    p.add_argument("--backbone", default=DEFAULT_BACKBONE)
    p.add_argument("--weights", default="random")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="backbone numerics for every method (auto = fp32); bf16 adds a bf16-vs-fp32 "
                        "speed and mask-agreement table")
    p.add_argument("--address", default=None, help="Ray cluster (default: local Ray)")
    p.add_argument("--num-cpus", type=int, default=None, help="local Ray CPUs (default: all)")
    p.add_argument("--memory-sizes", type=lambda s: [int(v) for v in s.split(",")],
                   default=[1000, 5000])
    p.add_argument("--memory-image-size", type=int, default=32)
    p.add_argument("--memory-batch-size", type=int, default=64)
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--output", default=None, help="also write the markdown to this file")
    p.add_argument("--_memory-child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args._memory_child is not None:
        print(json.dumps(memory_child(args._memory_child, args)))
        return
    parts = ["## Pseudo-labelling benchmark", ""]
    with tempfile.TemporaryDirectory(prefix="selfment-bench-") as tmp:
        if not args.skip_speed:
            parts += [speed(args, Path(tmp)), ""]
        if not args.skip_memory:
            parts += [memory(args), ""]
    text = "\n".join(parts)
    print(text)
    if args.output:
        Path(args.output).write_text(text)


if __name__ == "__main__":
    main()
