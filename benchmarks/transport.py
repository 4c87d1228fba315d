"""Light transport (issue 27, item 4): what moving the resize from the decode CPUs to the model's
device saves, and what it costs the model actor.

Same synthetic 640x480 JPEGs, two transports:

  old  decode task: decode + ToTensor + antialiased resize to S (``resize_square``) → float32
       (S, S, 3) per image through the object store; actor: backbone + NCut + IPO.
  new  decode task: decode → uint8 (H, W, 3) at the decoded size (``decoded_pixels``);
       actor: ToTensor + resize on its device (``DeviceResizer``) + backbone + NCut + IPO.

Reported:
  1. bytes per image through the object store: the decode batch's ``image`` column as Ray Data
     stores it (Arrow tensor / variable-shaped tensor column), old vs new (target: >= 4x fewer);
  2. decode CPU ms per image (process CPU time, torch at 1 thread like a 0.25-CPU decode task),
     old vs new (target: >= 3x less);
  3. model actor images/s on this CPU: backbone forward only (pre-resized input), today's actor
     (old), the new actor (resize inside), fp32 (target: new >= 90% of old; also shown against
     the forward alone), and whether the masks of old and new are identical.

CPU time is the figure to trust on a shared machine: other jobs stretch wall time, not the CPU
seconds this process spends.

Usage::

    python benchmarks/transport.py [--n 8] [--image-size 768] [--actor-size 768] [--weights random]
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _common import load_avg  # noqa: E402


def _jpegs(n: int) -> list[bytes]:
    from PIL import Image

    from selfment_dist.data.synthetic import make_scene

    out = []
    for i in range(n):
        image, _ = make_scene((27, i), size=(480, 640))
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _column_bytes(column) -> int:
    """Bytes of a numpy batch column once Ray Data has made it an Arrow column."""
    from ray.data._internal.tensor_extensions.arrow import convert_to_pyarrow_array

    return convert_to_pyarrow_array(column, "image").nbytes


def _decode(jpegs: list[bytes], size: int, old: bool) -> tuple[list[np.ndarray], float]:
    """(images, CPU seconds per image) of one decode task's work."""
    from selfment_dist.io.images import decode_image
    from selfment_dist.io.pixels import decoded_pixels
    from selfment_dist.model.resize import resize_square

    start = time.process_time()
    images = [resize_square(decode_image(b), size) if old else decoded_pixels(decode_image(b))
              for b in jpegs]
    return images, (time.process_time() - start) / len(jpegs)


def _timed(fn, repeat: int) -> tuple[object, float]:
    """(result, best CPU seconds of ``repeat`` runs)."""
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.process_time()
        out = fn()
        best = min(best, time.process_time() - start)
    return out, best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=8, help="images")
    p.add_argument("--image-size", type=int, default=768, help="S of the transport figures")
    p.add_argument("--actor-size", type=int, default=None,
                   help="S of the actor figures (default: --image-size)")
    p.add_argument("--backbone", default="vit_small_patch16_dinov3.lvd1689m")
    p.add_argument("--weights", default="random")
    p.add_argument("--threads", type=int, default=None, help="torch threads of the actor")
    p.add_argument("--repeat", type=int, default=2)
    args = p.parse_args()
    import torch

    from selfment_dist.algorithm.labeler import PseudoLabeler
    from selfment_dist.model.backbone import build_backbone
    from selfment_dist.io.pixels import ragged_column
    from selfment_dist.model.preprocess import DeviceResizer

    jpegs = _jpegs(args.n)
    s, actor_s = args.image_size, args.actor_size or args.image_size
    torch.set_num_threads(1)  # a decode task
    old_images, old_cpu = _decode(jpegs, s, old=True)
    new_images, new_cpu = _decode(jpegs, s, old=False)
    old_bytes = _column_bytes(np.stack(old_images)) / args.n
    new_bytes = _column_bytes(ragged_column(new_images)) / args.n

    torch.set_num_threads(args.threads or os.cpu_count() or 1)  # a model actor
    backbone = build_backbone(args.backbone, weights=args.weights, image_size=actor_s,
                              device="cpu", precision="fp32")
    labeler = PseudoLabeler(backbone)
    resizer = DeviceResizer(actor_s, "cpu")
    from selfment_dist.model.resize import resize_square

    floats = np.stack([resize_square(im, actor_s) for im in new_images])  # old actor's input
    _, fwd = _timed(lambda: backbone(floats), args.repeat)
    old_out, old_actor = _timed(lambda: labeler(floats), args.repeat)
    new_out, new_actor = _timed(lambda: labeler(resizer(new_images)), args.repeat)
    identical = bool(np.array_equal(np.asarray(old_out["mask"]), np.asarray(new_out["mask"])))

    n = args.n
    print(f"# Transport: {n} synthetic 640x480 JPEGs; load average {load_avg()} "
          f"(CPU seconds, not wall time)\n")
    print(f"| figure | old (float32 at {s}) | new (uint8 at decoded size) | ratio |")
    print("|---|---:|---:|---:|")
    print(f"| object-store bytes per image | {old_bytes:,.0f} | {new_bytes:,.0f} | "
          f"{old_bytes / new_bytes:.1f}x fewer |")
    print(f"| decode CPU ms per image (1 thread) | {1000 * old_cpu:.1f} | {1000 * new_cpu:.1f} | "
          f"{old_cpu / new_cpu:.1f}x less |")
    print(f"\n| model actor at {actor_s} px, fp32, {torch.get_num_threads()} threads | "
          "CPU s per image | images per CPU-s | vs forward only |")
    print("|---|---:|---:|---:|")
    for name, sec in (("backbone forward only", fwd), ("today's actor (pre-resized)", old_actor),
                      ("new actor (resize inside)", new_actor)):
        print(f"| {name} | {sec / n:.3f} | {n / sec:.2f} | {fwd / sec:.0%} |")
    print(f"\nnew actor / today's actor: {old_actor / new_actor:.1%}; "
          f"masks identical: {identical}")


if __name__ == "__main__":
    main()
