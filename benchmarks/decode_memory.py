"""Peak memory of one decode + resize (what a decode task pays per image), before and after
the banded resize, and whether both give the same numbers.

Each measurement runs in its own process: read the JPEG's bytes, reset the process's peak RSS
(Linux ``/proc/self/clear_refs``; else ``getrusage`` peaks are compared), decode with
:func:`~selfment_dist.io.images.decode_image`, resize with ``before`` (the whole image as
float32, the code before issue 30) or ``after`` (:func:`~selfment_dist.model.resize.resize_square`),
and report the peak RSS above the RSS just before decoding.

    python benchmarks/decode_memory.py                  # 12, 50, 100 MP at 224 px
    python benchmarks/decode_memory.py --megapixels 12 --size 448 --output results.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile

import numpy as np

CHILD = r"""
import json, resource, sys
import numpy as np, torch, torch.nn.functional as F
from selfment_dist.io.images import decode_image
from selfment_dist.model.resize import resize_square

def before(pil, size):  # the code before issue 30: the whole image as float32, then resize
    x = torch.as_tensor(np.array(pil, dtype=np.uint8)).permute(2, 0, 1).float().div_(255)
    x = F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False,
                      antialias=True)[0]
    return x.permute(1, 2, 0).contiguous().numpy()

def rss(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

path, size, which, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
data = open(path, "rb").read()
torch.set_num_threads(1)
from PIL import Image
warm = Image.new("RGB", (300, 200))
before(warm, size), resize_square(warm, size)  # load the kernels before measuring
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (the peak) to the current RSS
    reset = True
except OSError:
    reset = False
base = rss("VmRSS")
peak0 = rss("VmHWM")
pil = decode_image(data, max_pixels=None)
if which == "decode":
    result = np.zeros((size, size, 3), np.float32)
else:
    result = (before if which == "before" else resize_square)(pil, size)
peak = rss("VmHWM")
np.save(out, result)
print(json.dumps({"peak_above_baseline": peak - (base if reset else peak0), "peak_reset": reset,
                  "pixels": pil.size[0] * pil.size[1]}))
"""


def make_jpeg(path: str, megapixels: float) -> tuple[int, int]:
    """A smooth 3:2 JPEG of about ``megapixels`` (smooth: small file, quick to write)."""
    from PIL import Image

    w = int((megapixels * 1e6 * 1.5) ** 0.5)
    h = int(megapixels * 1e6 / w)
    x = np.linspace(0, 255, w, dtype=np.float32)
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None]
    img = np.empty((h, w, 3), np.uint8)
    img[..., 0] = x
    img[..., 1] = y
    img[..., 2] = ((x + y) / 2) % 256
    Image.fromarray(img).save(path, "JPEG", quality=90)
    return w, h


def measure(path: str, size: int, which: str, out: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", CHILD, path, str(size), which, out],
                          capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--megapixels", type=float, nargs="+", default=[12, 50, 100])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--output")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mp in args.megapixels:
            path = os.path.join(tmp, f"{mp}.jpg")
            w, h = make_jpeg(path, mp)
            got = {which: measure(path, args.size, which, os.path.join(tmp, f"{which}.npy"))
                   for which in ("decode", "before", "after")}
            same = np.array_equal(np.load(os.path.join(tmp, "before.npy")),
                                  np.load(os.path.join(tmp, "after.npy")))
            row = {"megapixels": round(w * h / 1e6, 1), "width": w, "height": h,
                   "size": args.size,
                   "decode_only_mb": round(got["decode"]["peak_above_baseline"] / 2**20),
                   "before_mb": round(got["before"]["peak_above_baseline"] / 2**20),
                   "after_mb": round(got["after"]["peak_above_baseline"] / 2**20),
                   "bit_identical": bool(same)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    report = {"rows": rows, "python": platform.python_version(), "machine": platform.machine(),
              "peak_reset": True}
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
