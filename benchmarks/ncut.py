"""NCut + IPO: ours (batched, block Krylov) side by side with the procedure as published.

The published procedure: one image at a time, dense scipy generalised ``eigh(D − A, D)``, then
the IPO loop in numpy (:mod:`selfment_dist.algorithm.reference`). Both run on the same synthetic DINO-like
patch features; we report time per image and how many patches/images get the same mask.

    python benchmarks/ncut.py                      # grids 28×28, 48×48, 96×96 on the CPU
    python benchmarks/ncut.py --device cuda        # ours on a GPU (the reference stays on CPU)
    python benchmarks/ncut.py --grids 48 --images 16 --output results.json
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch

from selfment_dist import pseudo_label
from selfment_dist.algorithm.reference import reference_pseudo_label
from selfment_dist.data.synthetic import make_patch_feature_batch


def bench_grid(grid: int, *, images: int, ref_images: int, batch: int, dim: int, device: str,
               seed: int = 0) -> dict:
    rng = np.random.default_rng(seed + grid)
    feats = make_patch_feature_batch(rng, images, grid, grid, dim)
    x = torch.from_numpy(feats).to(device)
    pseudo_label(x[:1])  # warm-up (allocations, kernels)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    ours = torch.cat([pseudo_label(x[i:i + batch]) for i in range(0, images, batch)])
    if device == "cuda":
        torch.cuda.synchronize()
    ours_s = (time.perf_counter() - t0) / images
    ours = ours.cpu().numpy()

    t0 = time.perf_counter()
    ref = np.stack([reference_pseudo_label(f) for f in feats[:ref_images]])
    ref_s = (time.perf_counter() - t0) / ref_images
    agree = (ours[:ref_images] == ref).reshape(ref_images, -1).mean(1)
    return dict(grid=f"{grid}×{grid}", patches=grid * grid, images=images, ref_images=ref_images,
                batch=batch, ours_s_per_image=ours_s, reference_s_per_image=ref_s,
                speedup=ref_s / ours_s, patch_agreement=float(agree.mean()),
                identical_images=int((agree == 1).sum()))


def to_markdown(rows: list[dict]) -> str:
    lines = ["| grid | ours s/img (batch) | published s/img | speed-up | patch agreement | identical masks |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['grid']} | {r['ours_s_per_image']:.3f} ({r['batch']}) | "
                     f"{r['reference_s_per_image']:.2f} | {r['speedup']:.1f}× | "
                     f"{100 * r['patch_agreement']:.2f}% | {r['identical_images']}/{r['ref_images']} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grids", type=int, nargs="+", default=[28, 48, 96])
    p.add_argument("--images", type=int, default=None, help="images per grid for ours (default by grid)")
    p.add_argument("--ref-images", type=int, default=None, help="images per grid for the reference")
    p.add_argument("--dim", type=int, default=384, help="feature dim (384 = ViT-S)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--output", help="also write the rows as JSON here")
    args = p.parse_args()
    # Defaults sized for a 2-core machine: the reference takes minutes per image at 96×96.
    plan = {28: (32, 16, 16), 48: (16, 8, 8), 96: (4, 2, 2)}
    rows = []
    for g in args.grids:
        images, ref_images, batch = plan.get(g, (8, 4, 4))
        images = args.images or images
        ref_images = min(args.ref_images or ref_images, images)
        rows.append(bench_grid(g, images=images, ref_images=ref_images, batch=min(batch, images),
                               dim=args.dim, device=args.device))
        print(to_markdown(rows[-1:]).splitlines()[-1], flush=True)
    print(f"\nNCut + IPO, C={args.dim}, device={args.device}, torch threads={torch.get_num_threads()}, "
          f"{platform.processor() or platform.machine()}\n")
    print(to_markdown(rows))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
