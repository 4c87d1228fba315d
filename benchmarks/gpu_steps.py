"""The steps of benchmarks/gpu_check.sh, one subcommand each (each runs in its own process, under
its own ``timeout``, so a crash or a hang loses that step only).

    python benchmarks/gpu_steps.py STEP --out DIR [options]      # STEP: see --help

stdout carries only ``RESULT key value`` lines, printed as each figure is known (values have no
spaces; ``NA`` where a figure does not apply, e.g. pinned copies without a GPU); logs go to
stderr. ``SMOKE=1`` in the environment: the same steps at tiny sizes, on CPU when there is no
GPU (CI checks that every step still runs).

Which RESULT lines replace the planner's assumed rates (``selfment plan --rate NAME=VALUE``,
docs/cluster.md): ``pipeline_images_per_s`` (one GPU actor, end to end) for
``gpu_actor_images_per_s_<precision>`` and 1000 / ``decode_ms_640x480`` for
``decode_images_per_s_per_cpu``.
"""
from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

SMOKE = os.environ.get("SMOKE") == "1"
BACKBONE = "vit_small_patch16_dinov3.lvd1689m"


def result(key: str, value) -> None:
    if isinstance(value, float):
        value = f"{value:.4g}"
    print(f"RESULT {key} {str(value).replace(' ', '_')}", flush=True)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn, repeats: int) -> float:
    """Seconds per call of ``fn`` after one warm-up call (kernels, allocator, autotuning)."""
    fn()
    _sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync()
    return (time.perf_counter() - start) / repeats


# ---------------------------------------------------------------------------------------------
# Steps without Ray

def step_build(args) -> int:
    """torch and its CUDA build; every visible GPU answers a matmul."""
    import torch

    result("torch_version", torch.__version__)
    result("torch_cuda_build", torch.version.cuda or "none")
    result("cuda_available", int(torch.cuda.is_available()))
    result("torch_gpu_count", torch.cuda.device_count())
    for i in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(i)
        x = torch.ones(256, 256, device=f"cuda:{i}")
        ok = float((x @ x)[0, 0]) == 256.0
        result(f"gpu{i}_compute_capability", f"{major}.{minor}")
        result(f"gpu{i}_matmul_ok", int(ok))
        if not ok:
            return 1
    if not torch.cuda.is_available() and not SMOKE:
        log("torch cannot use a GPU here (driver < 580 for the CUDA 13.0 build, or no GPU)")
        return 1
    return 0


def step_forward(args) -> int:
    """Backbone forward images/s per size and precision (inputs already on the device)."""
    import torch

    from selfment_dist.model.backbone import build_backbone

    device = _device()
    for size in args.sizes:
        batch = args.batch if size <= 768 else max(1, args.batch // 4)
        bb = build_backbone(BACKBONE, weights="random", image_size=size, device=device)
        x = torch.rand(batch, size, size, 3, device=device)
        for precision in args.precisions:
            bb.precision = precision  # the backbone sets (and restores) TF32 around its forward
            seconds = _timed(lambda: bb(x), args.repeats)
            result(f"forward_{precision}_{size}_images_per_s", batch / seconds)
    return 0


def step_ncut(args) -> int:
    """NCut + IPO ms per image for one batch of synthetic DINO-like features."""
    import numpy as np
    import torch

    from selfment_dist.algorithm import ncut
    from selfment_dist.algorithm.labeler import pseudo_label
    from selfment_dist.data.synthetic import make_patch_feature_batch

    rng = np.random.default_rng(0)
    feats = make_patch_feature_batch(rng, args.batch, args.grid, args.grid, args.dim)
    x = torch.from_numpy(feats).to(_device())
    ncut.take_dense_fallbacks()
    seconds = _timed(lambda: pseudo_label(x), args.repeats)
    tag = f"b{args.batch}_g{args.grid}"
    result(f"ncut_ipo_ms_per_image_{tag}", 1000 * seconds / args.batch)
    result(f"ncut_dense_fallbacks_{tag}", ncut.take_dense_fallbacks())
    # Lanczos steps: reported once the algorithm counts them (issue 27, item 6).
    steps = getattr(ncut, "take_lanczos_steps", None)
    result(f"ncut_lanczos_steps_{tag}", steps() if steps else "NA")
    return 0


def step_eigh(args) -> int:
    """Batched float64 eigh: GPU vs CPU ms per batch (torch's batched GPU path may loop over
    the matrices above k = 32)."""
    import torch

    for k in args.ks:
        a = torch.randn(args.batch, k, k, dtype=torch.float64)
        a = a + a.transpose(1, 2)
        result(f"eigh_f64_k{k}_cpu_ms", 1000 * _timed(lambda: torch.linalg.eigh(a), args.repeats))
        if torch.cuda.is_available():
            g = a.cuda()
            result(f"eigh_f64_k{k}_gpu_ms",
                   1000 * _timed(lambda: torch.linalg.eigh(g), args.repeats))
        else:
            result(f"eigh_f64_k{k}_gpu_ms", "NA")
    return 0


def step_h2d(args) -> int:
    """Host-to-device GB/s from pageable and from pinned memory."""
    import torch

    if not torch.cuda.is_available():
        result("h2d_pageable_gb_per_s", "NA")
        result("h2d_pinned_gb_per_s", "NA")
        return 0
    n = args.mb * 2 ** 20
    host = torch.empty(n, dtype=torch.uint8)
    pinned = host.pin_memory()
    dst = torch.empty(n, dtype=torch.uint8, device="cuda")
    for name, src in (("pageable", host), ("pinned", pinned)):
        seconds = _timed(lambda: dst.copy_(src, non_blocking=True), args.repeats)
        result(f"h2d_{name}_gb_per_s", n / seconds / 1e9)
    return 0


def step_decode(args) -> int:
    """Decode to uint8 (what decode tasks do: the model actor resizes on its device), and
    decode + antialiased resize to the model size on the CPU (the float32 path), ms per image
    on one core."""
    import torch
    from PIL import Image

    from selfment_dist.data.synthetic import make_scene
    from selfment_dist.io.images import decode_image
    from selfment_dist.io.pixels import decoded_pixels
    from selfment_dist.model.resize import resize_square

    torch.set_num_threads(1)
    for width, height in ((640, 480), (1440, 1080)):
        pixels, _ = make_scene(7, size=(height, width))
        buf = io.BytesIO()
        Image.fromarray((pixels * 255).astype("uint8") if pixels.dtype != "uint8" else pixels
                        ).save(buf, format="JPEG", quality=90)
        data = buf.getvalue()
        seconds = _timed(lambda: decoded_pixels(decode_image(data)), args.repeats)
        result(f"decode_ms_{width}x{height}", 1000 * seconds)
        seconds = _timed(lambda: resize_square(decode_image(data), args.image_size), args.repeats)
        result(f"decode_resize_ms_{width}x{height}", 1000 * seconds)
    return 0


# ---------------------------------------------------------------------------------------------
# Steps through the pipeline (a local Ray per step)

class GpuSampler:
    """nvidia-smi every ``period`` s in a thread: utilisation (%) and memory used (MiB)."""

    def __init__(self, period: float = 0.5):
        self.period, self.samples = period, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        query = ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
                 "--format=csv,noheader,nounits"]
        while not self._stop.is_set():
            try:
                out = subprocess.run(query, capture_output=True, text=True, timeout=5).stdout
                for line in out.strip().splitlines():
                    util, mem = (float(v) for v in line.split(","))
                    self.samples.append((util, mem))
            except (OSError, ValueError, subprocess.SubprocessError):
                return  # no nvidia-smi (CPU, SMOKE): nothing to sample
            self._stop.wait(self.period)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=10)

    def report(self, prefix: str) -> None:
        if not self.samples:
            for key in ("util_mean", "busy_share", "peak_mem_mib"):
                result(f"{prefix}_gpu_{key}", "NA")
            return
        utils = [u for u, _ in self.samples]
        result(f"{prefix}_gpu_util_mean", sum(utils) / len(utils))
        result(f"{prefix}_gpu_busy_share", sum(u > 0 for u in utils) / len(utils))
        result(f"{prefix}_gpu_peak_mem_mib", max(m for _, m in self.samples))


def _start_ray() -> None:
    import ray

    # address="local": a Ray of its own, never another one running on this machine.
    ray.init(address="local", include_dashboard=False, log_to_driver=False,
             configure_logging=False)


def _images(out: Path, n: int) -> str:
    from selfment_dist.data.synthetic import write_scenes

    root = out / "data"
    if not (root / "images").is_dir() or len(list((root / "images").iterdir())) < n:
        write_scenes(str(root), n, size=(480, 640))
    return str(root / "images")


def _labels(out: Path, n: int, size: int) -> str:
    """The pipeline step's labels, or (when that step failed or timed out) a small run's."""
    from selfment_dist.pipeline.pseudo_label import run_pseudo_label

    labels = out / "pipeline" / "labels"
    if not (labels / "_selfment.json").exists():
        log(f"no labels from the pipeline step: labelling {n} images first")
        run_pseudo_label([_images(out, n)], str(labels), backbone=BACKBONE, weights="random",
                         image_size=size, progress=False)
    return str(labels)


def step_pipeline(args) -> int:
    """Pseudo-label images/s end to end with the default plan, GPU use sampled during it."""
    from selfment_dist.pipeline.pseudo_label import run_pseudo_label

    images = _images(args.out, args.n)
    _start_ray()
    with GpuSampler() as sampler:
        summary = run_pseudo_label([images], str(args.out / "pipeline" / "labels"),
                                   backbone=BACKBONE, weights="random",
                                   image_size=args.image_size, progress=False)
    result("pipeline_images", summary["images"])
    result("pipeline_wall_s", summary["wall_s"])
    result("pipeline_images_per_s", summary["images_per_s"])
    sampler.report("pipeline")
    plan = summary.get("plan") or {}
    result("pipeline_plan_device", plan.get("device") or "NA")
    decode_max = (plan.get("decode_concurrency") or {}).get("max")
    result("pipeline_plan_decode_max", "elastic" if decode_max is None else decode_max)
    result("pipeline_plan_bound_by", plan.get("bound_by", "NA"))
    return 0


def step_train(args) -> int:
    """Training images/s (features recomputed by the backbone) with ``--workers`` ranks."""
    import torch

    from selfment_dist.pipeline.train import run_train

    _start_ray()
    labels = _labels(args.out, args.n, args.image_size)
    use_gpu = torch.cuda.is_available()
    with GpuSampler() as sampler:
        summary = run_train(labels, str(args.out / "train" / f"model_w{args.workers}"),
                            workers=args.workers, use_gpu=use_gpu, epochs=1,
                            batch_size=args.batch, features="backbone", min_confidence=0.0)
    result(f"train_w{args.workers}_images_per_s", summary.get("train_images_per_s", "NA"))
    result(f"train_w{args.workers}_wall_s", summary.get("wall_s", "NA"))
    sampler.report(f"train_w{args.workers}")
    return 0


def step_segment(args) -> int:
    """Segmentation images/s at the training size (the model of the train step)."""
    from selfment_dist.pipeline.segment import run_segment

    model = args.out / "train" / "model_w1"
    if not (model / "model.json").exists():
        log("no model from the train step: training one first")
        args.workers = 1
        step_train(args)
        import ray

        ray.shutdown()
    _start_ray()
    with GpuSampler() as sampler:
        summary = run_segment(str(model), [_images(args.out, args.n)],
                              str(args.out / "segment" / "maps"), image_size=args.image_size,
                              batch_size=args.batch, progress=False)
    result("segment_images_per_s", summary["images_per_s"])
    result("segment_image_size", args.image_size)
    sampler.report("segment")
    return 0


# ---------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="step", required=True)

    def add(name, fn, **options):
        p = sub.add_parser(name, help=fn.__doc__.splitlines()[0])
        p.add_argument("--out", type=Path, required=True)
        p.add_argument("--repeats", type=int, default=1 if SMOKE else 3)
        for flag, (kind, default) in options.items():
            nargs = "+" if isinstance(default, list) else None
            p.add_argument(f"--{flag.replace('_', '-')}", type=kind, default=default, nargs=nargs)
        p.set_defaults(fn=fn)

    add("build", step_build)
    add("forward", step_forward, sizes=(int, [64, 128] if SMOKE else [768, 1536]),
        precisions=(str, ["fp32", "tf32", "bf16"]), batch=(int, 2 if SMOKE else 32))
    add("ncut", step_ncut, batch=(int, 4 if SMOKE else 32), grid=(int, 8 if SMOKE else 48),
        dim=(int, 32 if SMOKE else 384))
    add("eigh", step_eigh, ks=(int, [24, 48] if SMOKE else [24, 48, 96, 192]),
        batch=(int, 4 if SMOKE else 64))
    add("h2d", step_h2d, mb=(int, 8 if SMOKE else 512))
    add("decode", step_decode, image_size=(int, 768))
    for name, fn in (("pipeline", step_pipeline), ("train", step_train),
                     ("segment", step_segment)):
        add(name, fn, n=(int, 8 if SMOKE else 1024), image_size=(int, 96 if SMOKE else 768),
            workers=(int, 1), batch=(int, 4 if SMOKE else 16))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
