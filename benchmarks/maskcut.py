"""MaskCut: ours (batched over images, block Krylov) vs the official-style per-image loop (dense
scipy ``eigh`` per round, N = 3), and the options beyond MaskCut measured by instance AP.

Speed: the same planted multi-object features (:func:`selfment_dist.data.instances.
make_instance_features`, 2-4 objects, noise levels cycling) at 30×30 (ViT-S/16 at 480 px) and
60×60 (ViT-B/8 at 480 px) grids; ms per image, speed-up, share of images with identical masks.

Quality: class-agnostic instance AP (pycocotools COCOeval, ``iouType="segm"``, ``useCats=0``)
on planted features whose ground truth is the planted object masks upsampled ×16 to image
size (honest about what it is: a controlled feature-level test, not real images). Predictions
are upsampled the same way and scored by MaskCut's round order (plain) or by the per-object
confidence.

    OMP_NUM_THREADS=2 python benchmarks/maskcut.py                 # both parts, this CPU
    python benchmarks/maskcut.py --grids 30 --ref-images 4 --ap-images 60 --output r.json
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import time

import numpy as np
import torch

from benchmarks._common import load_avg
from selfment_dist import multi_object_masks
from selfment_dist.algorithm.maskcut_labels import multi_object_labels
from selfment_dist.algorithm.maskcut_reference import reference_maskcut
from selfment_dist.data.instances import (NOISE_LEVELS, coco_instances, instance_annotations,
                                          make_instance_features)

PATCH = 16


def planted(n: int, grid: int, dim: int, seed: int):
    rng = np.random.default_rng(seed)
    pairs = [make_instance_features(rng, grid, grid, dim, n_objects=2 + i % 3,
                                    noise=NOISE_LEVELS[(i // 3) % len(NOISE_LEVELS)])
             for i in range(n)]
    return np.stack([p[0] for p in pairs]), [p[1] for p in pairs]


def bench_speed(grid: int, *, images: int, ref_images: int, batch: int, dim: int) -> dict:
    feats, _ = planted(images, grid, dim, seed=grid)
    x = torch.from_numpy(feats)
    multi_object_masks(x[:1])  # warm-up
    t0 = time.perf_counter()
    ours = torch.cat([multi_object_masks(x[i:i + batch]) for i in range(0, images, batch)]).numpy()
    ours_s = (time.perf_counter() - t0) / images
    t0 = time.perf_counter()
    ref = [reference_maskcut(f) for f in feats[:ref_images]]
    ref_s = (time.perf_counter() - t0) / ref_images
    same = [bool((r == o).all()) for r, o in zip(ref, ours)]
    return dict(grid=f"{grid}×{grid}", dim=dim, images=images, ref_images=ref_images, batch=batch,
                ours_ms=1e3 * ours_s, ref_ms=1e3 * ref_s, speedup=ref_s / ours_s,
                identical=sum(same))


def _upsample(masks: np.ndarray) -> np.ndarray:
    return masks.repeat(PATCH, -2).repeat(PATCH, -1)


def instance_ap(gts, preds, scores) -> dict:
    """COCOeval segm, class-agnostic, of lists of per-image bool (K, h, w) grid masks."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, gt_anns, dt_anns = [], [], []
    for i, (g, p, s) in enumerate(zip(gts, preds, scores)):
        h, w = g.shape[-2:]
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": w * PATCH, "height": h * PATCH})
        gt_anns += instance_annotations(_upsample(g), i + 1, len(gt_anns) + 1)
        dt_anns += instance_annotations(_upsample(p), i + 1, len(dt_anns) + 1, scores=s)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = coco_instances(images, gt_anns)
        gt.createIndex()
        dt = gt.loadRes(dt_anns) if dt_anns else COCO()
        ev = COCOeval(gt, dt, iouType="segm")
        ev.params.useCats = 0
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    st = ev.stats
    return {"AP": 100 * st[0], "AP50": 100 * st[1], "AP75": 100 * st[2], "AR1": 100 * st[6],
            "AR10": 100 * st[7], "AR100": 100 * st[8], "objects": len(dt_anns)}


VARIANTS = {
    "MaskCut (round order)": dict(),
    "MaskCut, confidence as score": dict(score="confidence"),
    "IPO per object": dict(ipo=True, score="confidence"),
    "adaptive count (min conf 0.5)": dict(min_object_confidence=0.5, score="confidence"),
    "IPO per object + adaptive count": dict(ipo=True, min_object_confidence=0.5, score="confidence"),
}


def bench_quality(*, images: int, grid: int, dim: int, max_objects: int) -> list[dict]:
    feats, gts = planted(images, grid, dim, seed=1000 + grid)
    x = torch.from_numpy(feats)
    rows = []
    for name, opts in VARIANTS.items():
        opts = dict(opts)
        by_conf = opts.pop("score", None) == "confidence"
        lab = multi_object_labels(x, max_objects=max_objects, **opts)
        masks = lab["mask"].numpy()
        if by_conf:
            scores = lab["confidence"].numpy()
        else:
            scores = np.broadcast_to(1.0 - 0.1 * np.arange(max_objects), masks.shape[:2])
        rows.append({"variant": name, **instance_ap(gts, list(masks), list(scores))})
    return rows


def to_markdown(speed: list[dict], quality: list[dict]) -> str:
    out = ["| grid | C | ours ms/img (batch) | official-style ms/img | speed-up | identical masks |",
           "|---|---|---|---|---|---|"]
    for r in speed:
        out.append(f"| {r['grid']} | {r['dim']} | {r['ours_ms']:.0f} ({r['batch']}) | {r['ref_ms']:.0f} | "
                   f"{r['speedup']:.1f}× | {r['identical']}/{r['ref_images']} |")
    out += ["", "| variant | AP | AP50 | AP75 | AR@1 | AR@10 | AR@100 | objects kept |",
            "|---|---|---|---|---|---|---|---|"]
    for r in quality:
        out.append(f"| {r['variant']} | {r['AP']:.1f} | {r['AP50']:.1f} | {r['AP75']:.1f} | "
                   f"{r['AR1']:.1f} | {r['AR10']:.1f} | {r['AR100']:.1f} | {r['objects']} |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grids", type=int, nargs="+", default=[30, 60])
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--ref-images", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--ap-images", type=int, default=90)
    p.add_argument("--ap-grid", type=int, default=30)
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--output")
    a = p.parse_args()
    torch.manual_seed(0)
    speed = [] if a.skip_speed else [
        bench_speed(g, images=a.images, ref_images=min(a.ref_images, a.images), batch=a.batch, dim=a.dim)
        for g in a.grids]
    quality = [] if a.skip_quality else bench_quality(images=a.ap_images, grid=a.ap_grid,
                                                      dim=a.dim, max_objects=3)
    meta = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "load_avg": load_avg()}
    print(to_markdown(speed, quality))
    print(meta)
    if a.output:
        with open(a.output, "w") as f:
            json.dump({"speed": speed, "quality": quality, "meta": meta}, f, indent=1)


if __name__ == "__main__":
    main()
