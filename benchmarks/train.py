"""Training speed of the head, side by side, on the same pseudo-labels.

The data: synthetic JPEGs pseudo-labelled by ``run_pseudo_label`` at ``--image-size`` (768 px by
default) with ``save_features=True``, so every method below trains on the same rows.

  (a) ours, stored features   ``run_train(features="stored")``: Ray Train DDP workers read the
                              parquet's ``features`` column through Ray Data; batches of
                              ``--batch-size`` images per worker and step.
  (b) published               the loop as published: cached features, the pseudo-mask recomputed
                              at every step by dense NCut (``scipy.linalg.eigh(D - A, D,
                              subset_by_index=[1, 1])``) and numpy IPO (``selfment_dist.algorithm.reference``),
                              one image per step (head forward + backward + Adam), one process.
  (c) ours, backbone features ``run_train(features="backbone")``: Ray Data tasks read, decode and
                              resize the images; the frozen backbone runs inside each worker.
  (f) forward                 the backbone's forward pass alone, batched: (f1) in this process
                              with all its torch threads, (f2) split over ``--workers`` parallel
                              Ray tasks with the training workers' CPUs/GPU and threads. The
                              larger of the two is the hardware's limit for (c).

(a) and (c) are timed over the training loop (rank 0: from the first batch request to the last
report; Ray start-up, worker start and model builds excluded); their end-to-end wall times,
start-up included, are shown too. Targets: (a) >= 5x (b); (c) >= 80 % of (f).

Usage::

    python benchmarks/train.py                          # 16 images at 768 px, random weights
    python benchmarks/train.py --n 32 --epochs 4 --n-published 8
    # On a GPU cluster, real weights:
    python benchmarks/train.py --weights hub --n 512 --batch-size 32 --use-gpu --address auto
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from _common import load_avg, start_ray, sync  # noqa: E402


def make_labels(work: Path, args) -> tuple[str, Path]:
    """Synthetic JPEGs → pseudo-labels with stored features (our pipeline)."""
    from selfment_dist.pipeline.pseudo_label import run_pseudo_label
    from selfment_dist.data.synthetic import write_scenes

    write_scenes(str(work / "scenes"), args.n, size=args.source_size)
    labels = str(work / "labels")
    run_pseudo_label(str(work / "scenes" / "images"), labels, backbone=args.backbone,
                     weights=args.weights, image_size=args.image_size, save_features=True,
                     batch_size=args.batch_size, progress=False)
    return labels, work / "scenes" / "images"


def _rows(labels: str) -> list[dict]:
    import pyarrow.parquet as pq

    from selfment_dist.io.schema import decode_features

    table = pq.read_table(labels, columns=["key", "grid_h", "grid_w", "features", "error"])
    return [{"key": r["key"], "features": decode_features(r["features"], r["grid_h"],
                                                          r["grid_w"]).astype(np.float32)}
            for r in table.to_pylist() if r["error"] is None]


# --- the methods -------------------------------------------------------------------------------

def bench_ours(labels: str, output: str, features: str, epochs: int, args) -> dict:
    from selfment_dist.pipeline.train import run_train

    s = run_train(labels, output, workers=args.workers, use_gpu=args.use_gpu, epochs=epochs,
                  batch_size=args.batch_size, features=features, checkpoint_every=10**6)
    loop = s["train_seconds"] + s["wait_seconds"]
    return {"images": s["images_seen"], "loop_s": loop, "images_per_s": s["images_seen"] / loop,
            "compute_share": s["train_seconds"] / loop, "wall_s": s["wall_s"],
            "end_to_end": s["images_seen"] / s["wall_s"],
            "loss": (s["first_loss"]["total"], s["final_loss"]["total"])}


def bench_published(rows: list[dict], n: int) -> float:
    """Per image: NCut + IPO on its cached features (scipy/numpy), then one optimiser step."""
    import torch

    from selfment_dist.model.head import PatchHead
    from selfment_dist.model.losses import selfment_loss
    from selfment_dist.algorithm.reference import reference_pseudo_label

    torch.manual_seed(0)
    head = PatchHead(rows[0]["features"].shape[-1])
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-3, weight_decay=1e-5)
    start = time.perf_counter()
    for row in rows[:n]:
        feats = row["features"]
        mask = reference_pseudo_label(feats)  # recomputed at every step, as published
        x = torch.from_numpy(feats).reshape(1, -1, feats.shape[-1])
        y = torch.from_numpy(mask.reshape(1, -1))
        logits, emb = head(x)
        loss = selfment_loss(logits, emb, y)["total"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return min(n, len(rows)) / (time.perf_counter() - start)


def bench_forward(backbone, arrays: np.ndarray, batch_size: int) -> float:
    backbone(arrays[:1])  # warm-up (allocations)
    sync(backbone.device)
    start = time.perf_counter()
    for i in range(0, len(arrays), batch_size):
        backbone(arrays[i:i + batch_size])
    sync(backbone.device)
    return len(arrays) / (time.perf_counter() - start)


class _ForwardWorker:
    """A Ray actor holding the backbone, shaped like a training worker (CPUs/GPU, threads)."""

    def __init__(self, args, threads: int | None):
        import torch

        from selfment_dist.model.backbone import build_backbone

        if threads:
            torch.set_num_threads(threads)
        self.backbone = build_backbone(args.backbone, weights=args.weights,
                                       image_size=args.image_size)
        self.batch_size = args.batch_size

    def forward(self, arrays: np.ndarray) -> int:
        for i in range(0, len(arrays), self.batch_size):
            self.backbone(arrays[i:i + self.batch_size])
        if self.backbone.device.type == "cuda":  # (not _common.sync: workers cannot import it)
            import torch
            torch.cuda.synchronize(self.backbone.device)
        return len(arrays)


def bench_forward_workers(arrays: np.ndarray, args) -> float:
    """Forward alone in ``workers`` Ray actors with the training workers' resources and threads:
    all models built and warmed up first, then every actor runs its share at the same time;
    images / wall time of the slowest."""
    import ray

    from selfment_dist.pipeline.train import _plan_workers

    resources, threads = _plan_workers(args.workers, args.use_gpu, None)
    options = {"num_gpus": 1} if args.use_gpu else {"num_cpus": resources["CPU"]}
    actors = [ray.remote(_ForwardWorker).options(**options).remote(args, threads)
              for _ in range(args.workers)]
    ray.get([a.forward.remote(arrays[:1]) for a in actors])  # built and warmed up
    shards = [ray.put(s) for s in np.array_split(arrays, args.workers)]
    start = time.perf_counter()
    n = sum(ray.get([a.forward.remote(s) for a, s in zip(actors, shards)]))
    rate = n / (time.perf_counter() - start)
    for a in actors:
        ray.kill(a)
    return rate


# --- the report --------------------------------------------------------------------------------

def _shuffled_bytes(labels: str, args) -> dict:
    """Bytes the full shuffle moves per epoch for each feature source (train_data's estimate
    of the rows it shuffles), beside the float32 images that a shuffle after loading moved."""
    from selfment_dist.pipeline._internal.train_data import (inspect_labels,
                                                             shuffled_bytes_per_epoch)

    ls = inspect_labels(labels, features="stored")
    return {"stored": shuffled_bytes_per_epoch(ls, stored=True),
            "backbone": shuffled_bytes_per_epoch(ls, stored=False),
            "images": ls.usable * args.image_size ** 2 * 3 * 4}


def run(args, work: Path) -> str:
    import ray
    import torch
    from PIL import Image

    from selfment_dist.model.backbone import build_backbone, resize_square

    start_ray(args.address, args.num_cpus)
    labels, images = make_labels(work, args)
    rows = _rows(labels)
    arrays = np.stack([resize_square(Image.open(p).convert("RGB"), args.image_size)
                       for p in sorted(images.glob("*.jpg"))[: args.n_forward]])
    backbone = build_backbone(args.backbone, weights=args.weights, image_size=args.image_size)
    load_before = load_avg()

    # (f) right before and right after (c): on a shared machine the load drifts. In this
    # process with all threads (f1), and split like the training workers (f2); the larger is
    # the reference.
    fwd_before = bench_forward(backbone, arrays, args.batch_size)
    fwd_workers_before = bench_forward_workers(arrays, args)
    ours_c = bench_ours(labels, str(work / "model-c"), "backbone", args.epochs_backbone, args)
    fwd_workers_after = bench_forward_workers(arrays, args)
    fwd_after = bench_forward(backbone, arrays, args.batch_size)
    fwd_one = (fwd_before + fwd_after) / 2
    fwd_split = (fwd_workers_before + fwd_workers_after) / 2
    fwd = max(fwd_one, fwd_split)
    ours_a = bench_ours(labels, str(work / "model-a"), "stored", args.epochs, args)
    published = bench_published(rows, args.n_published)
    load_after = load_avg()
    ray.shutdown()
    shuffled = _shuffled_bytes(labels, args)

    a, c = ours_a["images_per_s"], ours_c["images_per_s"]
    h, w = rows[0]["features"].shape[:2]
    target_a = "met" if a >= 5 * published else "MISSED"
    target_c = "met" if c >= 0.8 * fwd else "MISSED"
    lines = [
        f"### Training speed: {len(rows)} pseudo-labelled images at {args.image_size} px "
        f"(grid {h}x{w}, C={rows[0]['features'].shape[-1]}), `{args.backbone}` "
        f"(weights={args.weights}); {args.workers} workers x {args.batch_size} images per step",
        "",
        "| method | images/s | vs (b) published | vs (f) forward |",
        "|---|---:|---:|---:|",
        f"| (a) ours, stored features (training loop) | {a:.3f} | {a / published:.1f}x | |",
        f"| (a) end to end, Ray Train start-up included ({ours_a['wall_s']:.0f} s) | "
        f"{ours_a['end_to_end']:.3f} | {ours_a['end_to_end'] / published:.1f}x | |",
        f"| (b) published: cached features, dense NCut+IPO every step, 1 image/step | "
        f"{published:.3f} | 1.0x | |",
        f"| (c) ours, features from the frozen backbone (training loop) | {c:.3f} | | "
        f"{c / fwd:.0%} |",
        f"| (c) end to end, start-up included ({ours_c['wall_s']:.0f} s) | "
        f"{ours_c['end_to_end']:.3f} | | {ours_c['end_to_end'] / fwd:.0%} |",
        f"| (f1) backbone forward alone, batched, this process (before / after (c): "
        f"{fwd_before:.3f} / {fwd_after:.3f}) | {fwd_one:.3f} | | {fwd_one / fwd:.0%} |",
        f"| (f2) backbone forward alone, batched, in {args.workers} parallel tasks shaped like "
        f"the training workers (before / after (c): {fwd_workers_before:.3f} / "
        f"{fwd_workers_after:.3f}) | {fwd_split:.3f} | | {fwd_split / fwd:.0%} |",
        "",
        f"Targets: (a) >= 5x (b): {target_a} ({a / published:.1f}x); (c) >= 80% of (f): "
        f"{target_c} ({c / fwd:.0%}; (f) = the larger of (f1), (f2)).",
        f"(a): {args.epochs} epochs, {ours_a['images']} images, {ours_a['compute_share']:.0%} of the "
        f"loop in forward/backward/step, loss {ours_a['loss'][0]:.3f} -> {ours_a['loss'][1]:.3f}. "
        f"(c): {args.epochs_backbone} epochs, {ours_c['images']} images, "
        f"{ours_c['compute_share']:.0%} of the loop computing. (b): {min(args.n_published, len(rows))} "
        f"images. (f): {len(arrays)} images; (f1) {torch.get_num_threads()} torch threads.",
        f"Bytes shuffled per epoch (`shuffle: full`, label rows only, never images): "
        f"stored features {shuffled['stored']:,}; backbone features {shuffled['backbone']:,} "
        f"(the images the backbone reads: {shuffled['images']:,} as float32, not shuffled).",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; load "
        f"average before / after: {load_before} | {load_after}.",
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    from selfment_dist.model.backbone import DEFAULT_BACKBONE

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=16, help="images pseudo-labelled and trained on")
    p.add_argument("--image-size", type=int, default=768)
    p.add_argument("--source-size", type=lambda s: tuple(int(v) for v in s.split("x")),
                   default=(480, 640), help="HxW of the synthetic JPEGs")
    p.add_argument("--backbone", default=DEFAULT_BACKBONE)
    p.add_argument("--weights", default="random")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--use-gpu", action="store_true")
    p.add_argument("--batch-size", type=int, default=4, help="images per step and worker")
    p.add_argument("--epochs", type=int, default=4, help="epochs for (a)")
    p.add_argument("--epochs-backbone", type=int, default=2, help="epochs for (c)")
    p.add_argument("--n-published", type=int, default=4, help="images timed for (b)")
    p.add_argument("--n-forward", type=int, default=8, help="images timed for (f)")
    p.add_argument("--address", default=None, help="Ray cluster (default: local Ray)")
    p.add_argument("--num-cpus", type=int, default=None, help="local Ray CPUs (default: all)")
    p.add_argument("--output", default=None, help="also write the markdown to this file")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="selfment-bench-train-") as tmp:
        text = "## Training benchmark\n\n" + run(args, Path(tmp)) + "\n"
    print(text)
    if args.output:
        Path(args.output).write_text(text)


if __name__ == "__main__":
    main()
