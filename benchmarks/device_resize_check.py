"""GPU check of the device-side resize (model/preprocess.py): agreement with the CPU's
``resize_square`` and the cost of copy + resize per image.

On CUDA the result must agree with the CPU reference within 1e-5 (max abs over every value);
on a CPU it must be bit-identical. Prints ``RESULT key value`` lines (like gpu_check.sh) and
exits 1 when the tolerance is exceeded.

Usage::

    python benchmarks/device_resize_check.py [--size 768] [--device cuda] [--repeat 5]
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from selfment_dist.model.preprocess import DeviceResizer
from selfment_dist.model.resize import resize_square

# Typical web photos, phone photos, upscaling, odd sides, strips.
SHAPES = [(480, 640), (1080, 1440), (300, 200), (333, 517), (1, 800), (800, 1), (768, 768),
          (97, 61)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=768)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--batch", type=int, default=32, help="640x480 images per timed batch")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (*s, 3), dtype=np.uint8) for s in SHAPES]
    resizer = DeviceResizer(args.size, args.device)
    got = resizer(images).cpu()
    worst = 0.0
    for im, out in zip(images, got):
        ref = torch.from_numpy(resize_square(im, args.size))
        worst = max(worst, float((out - ref).abs().max()))
    exact = resizer.device.type == "cpu"
    ok = worst == 0.0 if exact else worst <= 1e-5
    print(f"RESULT device_resize_max_abs_diff {worst:.3g}")
    print(f"RESULT device_resize_ok {int(ok)}")

    batch = [rng.integers(0, 256, (480, 640, 3), dtype=np.uint8) for _ in range(args.batch)]
    resizer(batch)  # warm-up: kernels, pinned pool
    times = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        resizer(batch)
        if resizer.device.type == "cuda":
            torch.cuda.synchronize(resizer.device)
        times.append(time.perf_counter() - start)
    ms = 1000 * float(np.median(times)) / args.batch
    print(f"RESULT device_resize_ms_per_image_640x480_to_{args.size} {ms:.3f}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
