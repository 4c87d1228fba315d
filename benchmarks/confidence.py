"""Pseudo-mask confidence: calibrate it, and measure what it is worth.

    python benchmarks/confidence.py                # the benchmark (the README's table)
    python benchmarks/confidence.py --calibrate    # refit the constants of selfment_dist/algorithm/quality.py

Two sources of pseudo-labels, each with 30 % of its scenes holding no object:

  scenes    synthetic JPEG scenes (``selfment_dist.data.synthetic``; no-object kinds: texture,
            gradient, clutter, an object filling the frame) through the real pipeline:
            ``run_pseudo_label(weights="random")``, the quality columns read back from parquet;
  features  DINO-like patch features (``make_patch_features``; no object: background only)
            through ``pseudo_label(..., return_quality=True)`` in this process.

Calibration (``--calibrate``) fits one logistic model on both sources pooled, with seeds (1000+)
the benchmark never uses (0+). Its target: the scene holds an object and the pseudo-mask's IoU
with it is at least 0.5, i.e. "this row is a usable pseudo-label". Features are standardised; L2
penalty 1e-2; Newton's method (IRLS). It prints the constants to paste into ``quality.py``.

The benchmark reports, per source: AUROC of ``confidence`` for object against no-object scenes;
Spearman correlation of ``confidence`` with the pseudo-mask's IoU (no-object scenes count with
their IoU against an empty mask, i.e. 0); and held-out IoU / F_max (on object scenes never
pseudo-labelled) of a head trained on all rows against one trained on the rows ``train`` keeps
by default (``no_object`` false). Scenes: ``run_train`` (1 worker) → ``run_segment`` →
``run_evaluate``; features: the same head and loss trained in this process.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from scipy import stats  # noqa: E402

from selfment_dist.algorithm.quality import FEATURES, NO_OBJECT_THRESHOLD, feature_matrix  # noqa: E402

NO_OBJECT_FRACTION = 0.3
GOOD_IOU = 0.5


# ---------------------------------------------------------------------------------------------
# Data: one record per image (signals, confidence, has_object, iou)

def _iou(pred: np.ndarray, gt: np.ndarray) -> float:
    union = (pred | gt).sum()
    return float((pred & gt).sum() / union) if union else 1.0


def _upsample(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    img = Image.fromarray(mask.astype(np.uint8) * 255).resize(shape[::-1], Image.NEAREST)
    return np.asarray(img) > 127


def scene_records(root: str, *, n: int, seed: int, image_size: int, size=(96, 128)) -> dict:
    """Synthetic scenes → run_pseudo_label → per-image signals, confidence and IoU."""
    import pyarrow.parquet as pq

    from selfment_dist.io.masks import decode_mask
    from selfment_dist.pipeline.pseudo_label import run_pseudo_label
    from selfment_dist.data.synthetic import make_scene, scene_kinds, scene_keys, write_scenes

    write_scenes(f"{root}/scenes", n, seed=seed, size=size, camouflage_fraction=0.0,
                 no_object_fraction=NO_OBJECT_FRACTION)
    run_pseudo_label(f"{root}/scenes/images", f"{root}/labels", weights="random",
                     image_size=image_size, save_features=True, progress=False)
    table = pq.read_table(f"{root}/labels").to_pydict()
    row = {k: i for i, k in enumerate(table["key"])}
    kinds = scene_kinds(n, no_object_fraction=NO_OBJECT_FRACTION)
    recs = {k: [] for k in ("signals", "confidence", "has_object", "iou", "kind")}
    for i, key in enumerate(scene_keys(n)):
        j = row[key]
        _, gt = make_scene((seed, i), size=size, kind=kinds[i])
        mask = decode_mask(table["mask"][j], table["grid_h"][j], table["grid_w"][j])
        recs["signals"].append({s: float(table[s][j]) for s in
                                ("fiedler_value", "spectral_gap", "ncut_value", "fg_fraction",
                                 "border_fraction", "ipo_change", "ipo_converged")})
        recs["confidence"].append(float(table["confidence"][j]))
        recs["has_object"].append(kinds[i] == "object")
        recs["iou"].append(_iou(_upsample(mask, size), gt) if kinds[i] == "object" else 0.0)
        recs["kind"].append(kinds[i])
    return recs


def feature_data(*, n: int, seed: int, grid: int = 16, dim: int = 64):
    """DINO-like features: (feats (n, g, g, C), gts (n, g, g) bool, has_object (n,) bool)."""
    from selfment_dist.data.synthetic import make_patch_features, scene_kinds

    rng = np.random.default_rng(seed)
    has = np.array([k == "object" for k in scene_kinds(n, no_object_fraction=NO_OBJECT_FRACTION)])
    pairs = [make_patch_features(rng, grid, grid, dim, with_object=bool(h), return_mask=True)
             for h in has]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]), has


def feature_records(feats: np.ndarray, gts: np.ndarray, has: np.ndarray) -> dict:
    from selfment_dist.algorithm.labeler import pseudo_label

    masks, quality = pseudo_label(torch.from_numpy(feats), return_quality=True)
    masks = masks.numpy()
    return {"signals": [{k: float(v[i]) for k, v in quality.items() if k != "confidence"}
                        for i in range(len(feats))],
            "confidence": quality["confidence"].tolist(), "has_object": has.tolist(),
            "iou": [_iou(m, g) if h else 0.0 for m, g, h in zip(masks, gts, has)],
            "masks": masks}


# ---------------------------------------------------------------------------------------------
# Calibration: L2-penalised logistic regression by Newton's method

def fit_logistic(x: np.ndarray, y: np.ndarray, *, l2: float = 1e-2, iters: int = 50):
    """(mean, scale, weights, bias) of a logistic model of ``y`` on standardised ``x``."""
    mean, scale = x.mean(0), x.std(0)
    scale[scale < 1e-6] = 1.0
    z = np.hstack([(x - mean) / scale, np.ones((len(x), 1))])
    w = np.zeros(z.shape[1])
    penalty = np.full(z.shape[1], l2 * len(x))
    penalty[-1] = 0.0  # the bias is not penalised
    for _ in range(iters):
        p = 1 / (1 + np.exp(-z @ w))
        grad = z.T @ (p - y) + penalty * w
        hess = (z * (p * (1 - p))[:, None]).T @ z + np.diag(penalty + 1e-9)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return mean, scale, w[:-1], float(w[-1])


def calibrate(args) -> None:
    sources = []
    with tempfile.TemporaryDirectory() as tmp:
        _start_ray(args)
        sources.append(scene_records(tmp, n=args.n_calibrate, seed=1000,
                                     image_size=args.image_size))
    feats, gts, has = feature_data(n=args.n_calibrate * 2, seed=1001)
    sources.append(feature_records(feats, gts, has))
    x = np.concatenate([feature_matrix({k: np.array([s[k] for s in src["signals"]])
                                        for k in src["signals"][0]}).numpy()
                        for src in sources])
    y = np.concatenate([(np.array(src["has_object"]) & (np.array(src["iou"]) >= GOOD_IOU))
                        for src in sources]).astype(float)
    mean, scale, weights, bias = fit_logistic(x, y)
    fmt = lambda v: "(" + ", ".join(f"{float(a):.4g}" for a in v) + ")"  # noqa: E731
    print(f"# {len(y)} rows ({int(y.sum())} positive); features {FEATURES}")
    print(f"_MEAN = {fmt(mean)}\n_SCALE = {fmt(scale)}\n_WEIGHTS = {fmt(weights)}\n"
          f"_BIAS = {bias:.4g}")


# ---------------------------------------------------------------------------------------------
# The benchmark

def auroc(score: np.ndarray, positive: np.ndarray) -> float:
    """Mann-Whitney AUROC (ties count one half)."""
    ranks = stats.rankdata(score)
    n_pos, n_neg = positive.sum(), (~positive).sum()
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def signal_figures(recs: dict) -> dict:
    conf = np.array(recs["confidence"])
    has = np.array(recs["has_object"])
    kept = conf >= NO_OBJECT_THRESHOLD
    return {"auroc": auroc(conf, has),
            "spearman": float(stats.spearmanr(conf, recs["iou"]).statistic),
            "kept": int(kept.sum()), "rows": len(conf),
            "no_object_kept": int((kept & ~has).sum()), "no_object": int((~has).sum())}


def scene_heads(root: str, args) -> dict:
    """Head on all rows vs on default-filtered rows, evaluated on held-out object scenes."""
    from selfment_dist.pipeline.evaluate import run_evaluate
    from selfment_dist.pipeline.segment import run_segment
    from selfment_dist.pipeline.train import run_train
    from selfment_dist.data.synthetic import write_scenes

    write_scenes(f"{root}/heldout", args.n_heldout, seed=2, camouflage_fraction=0.0)
    out = {}
    for name, cut in (("all rows", {"min_confidence": 0.0}), ("filtered", {})):
        model = f"{root}/model-{name.split()[0]}"
        summary = run_train(f"{root}/labels", model, workers=1, epochs=args.epochs,
                            batch_size=8, **cut)
        run_segment(model, [f"{root}/heldout/images"], f"{model}-pred", progress=False)
        report = run_evaluate(predictions=f"{model}-pred", masks=f"{root}/heldout/masks",
                              output=f"{model}-report", name="heldout")
        scores = next(iter(report["datasets"].values()))["scores"]
        out[name] = {"rows": summary["train_rows"], "iou": scores["iou"], "fmax": scores["fmax"]}
    return out


def feature_heads(train: tuple, heldout: tuple, masks: np.ndarray, conf: np.ndarray,
                  args) -> dict:
    """The head and loss of ``train`` on the features, in this process (no images to read)."""
    from selfment_dist.model.head import PatchHead
    from selfment_dist.model.losses import selfment_loss
    from selfment_dist.evaluation.metrics import sod_scores

    feats = torch.from_numpy(train[0])
    test_feats, test_gts, _ = heldout
    out = {}
    for name, keep in (("all rows", np.ones(len(conf), bool)),
                       ("filtered", conf >= NO_OBJECT_THRESHOLD)):
        torch.manual_seed(0)
        idx = np.flatnonzero(keep)
        head = PatchHead(feats.shape[-1], 128)
        opt = torch.optim.Adam(head.parameters(), lr=1e-3, weight_decay=1e-5)
        rng = np.random.default_rng(0)
        for _ in range(args.epochs * 4):
            for batch in np.array_split(rng.permutation(idx), max(1, len(idx) // 8)):
                f = feats[batch].flatten(1, 2)
                logits, emb = head(f)
                loss = selfment_loss(logits, emb, torch.from_numpy(masks[batch]).flatten(1))
                opt.zero_grad()
                loss["total"].backward()
                opt.step()
        sal = head.saliency(torch.from_numpy(test_feats)).numpy()
        preds = [(s * 255).round().astype(np.uint8) for s in sal]
        scores = sod_scores(preds, [g.astype(np.uint8) * 255 for g in test_gts])
        out[name] = {"rows": int(keep.sum()), "iou": scores["iou"], "fmax": scores["fmax"]}
    return out


def benchmark(args) -> None:
    start = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        _start_ray(args)
        recs = scene_records(tmp, n=args.n, seed=0, image_size=args.image_size)
        results["scenes (random-weight ViT)"] = {**signal_figures(recs),
                                                 "heads": scene_heads(tmp, args)}
    train = feature_data(n=args.n * 2, seed=0)
    heldout = feature_data(n=args.n_heldout * 2, seed=2)
    keep = heldout[2]
    heldout = (heldout[0][keep], heldout[1][keep], heldout[2][keep])
    recs = feature_records(*train)
    results["DINO-like features"] = {**signal_figures(recs), "heads": feature_heads(
        train, heldout, recs["masks"], np.array(recs["confidence"]), args)}
    print(_table(results, args, time.perf_counter() - start))


def _table(results: dict, args, wall: float) -> str:
    lines = ["| source | images (no object) | AUROC | Spearman | kept by default (no-object kept)"
             " | head on all rows: IoU / F_max | head on filtered rows: IoU / F_max |",
             "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        a, f = r["heads"]["all rows"], r["heads"]["filtered"]
        lines.append(f"| {name} | {r['rows']} ({r['no_object']}) | {r['auroc']:.3f} | "
                     f"{r['spearman']:.3f} | {r['kept']} ({r['no_object_kept']}) | "
                     f"{a['iou']:.3f} / {a['fmax']:.3f} ({a['rows']} rows) | "
                     f"{f['iou']:.3f} / {f['fmax']:.3f} ({f['rows']} rows) |")
    lines.append(f"\nscenes at {args.image_size} px, {args.epochs} epochs; {wall:.0f} s wall")
    return "\n".join(lines)


def _start_ray(args) -> None:
    import ray

    if not ray.is_initialized():
        # "local": a new Ray even when another cluster runs on this machine.
        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibrate", action="store_true", help="refit quality.py's constants")
    parser.add_argument("--n", type=int, default=60, help="benchmark scenes")
    parser.add_argument("--n-calibrate", type=int, default=60, help="calibration scenes")
    parser.add_argument("--n-heldout", type=int, default=16, help="held-out object scenes")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--num-cpus", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    calibrate(args) if args.calibrate else benchmark(args)


if __name__ == "__main__":
    main()
