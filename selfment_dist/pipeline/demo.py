"""``selfment demo``: synthetic scenes through the whole pipeline on a local Ray, in minutes.

    run_demo("selfment_demo")        # the same as: selfment demo --output selfment_demo

It writes a small synthetic dataset (training scenes and a held-out set, half of it camouflaged,
with ground truth), then runs pseudo-label → train (Ray Train, DDP) → segment → evaluate →
inspect on an in-process Ray with a few CPUs. The console shows one bar per stage and then the
metrics table, the pseudo-masks' IoU and where every output is; Ray's own output goes to
``demo.log`` (``verbose=True`` / ``--verbose`` shows it instead). The backbone's hub weights are
tried first; when the model hub cannot be reached the demo says so in one line and goes on with
random weights, and marks the scores as not meaningful.

The default size (224 px, a 14x14 patch grid) is where, even with random weights, the
pseudo-masks follow the synthetic objects: mean IoU 0.40 with the ground truth of the 32
training scenes (0.50 against 0.33 at 112 px on 16 scenes without camouflage).

The output folder::

    data/train/images, masks     training scenes (their masks are never read: no labels)
    data/eval/images, masks      held-out scenes with ground truth
    labels/                      pseudo-labels: part-*.parquet + _selfment.json   (pseudo-label)
    model/                       head.safetensors + model.json                   (train)
    predictions/                 <key>.png saliency maps of data/eval/images      (segment)
    report/                      metrics.json, metrics.md, per_image.csv, plots/  (evaluate)
    inspect/                     contact sheets + confidence histogram of the pseudo-labels
                                 (index.html), predictions.png: held-out predictions (inspect)
    demo.log                     everything Ray and the stages printed
    pipeline_summary.json        the stage chain's record (settings, status, summaries)
    results.md                   the metrics table with its caveat, and where everything is
    demo_summary.json            what :func:`run_demo` returns
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from typing import Any
from urllib.parse import urlparse

from selfment_dist.data.synthetic_sets import synthetic_layout, write_synthetic_sets
from selfment_dist.io.output_access import OutputNotWritableError, prepare_output
from selfment_dist.io.storage import is_local, url_to_fs
from selfment_dist.pipeline._internal.console import StageBar, quiet_console
from selfment_dist.settings import DemoSettings, build_settings
from selfment_dist.stages import CHAIN, CHAIN_SUMMARY_NAME
from selfment_dist.errors import UserInputNotFoundError, UserValueError

logger = logging.getLogger(__name__)

__all__ = ["run_demo", "write_synthetic_sets", "synthetic_layout", "hub_weights_problem"]

#: Written first into a demo's output folder: a folder holding it may be cleared by a new demo.
MARKER = ".selfment_demo"
SUMMARY_NAME = "demo_summary.json"
RESULTS_NAME = "results.md"
LOG_NAME = "demo.log"
_STAGE_DIRS = (*(s.folder for s in CHAIN.values()), "inspect")
_HUB_PROBE_TIMEOUT_S = 3.0


# ---------------------------------------------------------------------------------------------
# Hub weights or random ones

def hub_weights_problem(backbone: str, image_size: int) -> str | None:
    """None when ``backbone``'s hub weights load here; else why not, in one line.

    Without ``HF_HUB_OFFLINE`` the hub's host is probed first (a few seconds at most), so an
    offline machine does not wait through the hub client's retries; with it, only the local
    cache is tried.
    """
    from huggingface_hub import constants

    from selfment_dist.model.backbone import build_backbone

    proxied = any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY"))
    if not constants.is_offline_mode() and not proxied:
        url = urlparse(constants.ENDPOINT)
        host = url.hostname or "huggingface.co"
        port = url.port or (80 if url.scheme == "http" else 443)
        try:
            socket.create_connection((host, port), timeout=_HUB_PROBE_TIMEOUT_S).close()
        except OSError as exc:
            return f"{host}:{port} unreachable ({exc})"
    try:
        build_backbone(backbone, weights="hub", image_size=image_size, device="cpu")
    except Exception as exc:  # any failure to get the weights means: go on without them
        if constants.is_offline_mode():
            return "HF_HUB_OFFLINE is set and the weights are not in the local cache"
        return (str(exc).splitlines() or [type(exc).__name__])[0][:200]
    return None


# ---------------------------------------------------------------------------------------------
# The demo

def run_demo(*args: DemoSettings | str, **options: Any) -> dict[str, Any]:
    """Synthetic data through pseudo-label → train → segment → evaluate on a local Ray.

    Called as ``run_demo(settings)`` with :class:`DemoSettings` (every option, its default and
    range is declared there) or ``run_demo(output_dir, **options)``. The four stages run through
    the stage chain (:func:`selfment_dist.pipeline.chain.run_chain`), as ``selfment run`` does;
    ``output_dir`` is a local folder (see the module doc for its layout): a folder left by an
    earlier demo is cleared of that demo's results first, any other non-empty folder is refused.
    ``weights`` None: hub weights when the hub can be reached, else random ones (said in one
    line). The demo ignores ``RAY_ADDRESS``: it runs on an in-process Ray of ``num_cpus`` CPUs.

    Returns:
        The summary written to ``demo_summary.json``: ``weights``, ``meaningful`` (False with
        random weights), ``note``, ``metrics`` (per dataset: ``n_images`` and ``scores``),
        ``pseudo_mask_iou`` (mean IoU of the training scenes' pseudo-masks with their ground
        truth), ``outputs`` (every path), ``stages`` (each stage's own summary), ``wall_s``.
    """
    from selfment_dist.evaluation.reports import DatasetEvaluation, scores_table

    settings = build_settings(DemoSettings, args, options)
    output_dir, n_images, n_eval = settings.output_dir, settings.n_images, settings.n_eval
    image_size, epochs, workers = settings.image_size, settings.epochs, settings.workers
    batch_size, weights, backbone = settings.batch_size, settings.weights, settings.backbone
    num_cpus, verbose = settings.num_cpus, settings.verbose
    start = time.perf_counter()
    root = _prepare_output(output_dir)
    out = {name: os.path.join(root, name) for name in _STAGE_DIRS}
    log_path = os.path.join(root, LOG_NAME)

    with quiet_console(log_path, verbose=verbose) as console:
        data = write_synthetic_sets(os.path.join(root, "data"), n_train=n_images, n_eval=n_eval)
        if weights is None:
            problem = hub_weights_problem(backbone, image_size)
            weights = "hub" if problem is None else "random"
            if problem is not None:
                message = (f"Model hub not reachable ({problem}): continuing with random "
                           "backbone weights; the results are NOT meaningful.")
                logger.warning(message)
                if not verbose:  # the log file has it; the person at the terminal needs it too
                    console.write(message + "\n")
        meaningful = weights != "random"
        if not verbose:
            console.write(f"Ray's and each stage's own output: {log_path}\n")
        stages, report, pseudo_iou = _run_stages(
            console, data, out, backbone=backbone, weights=weights, image_size=image_size,
            epochs=epochs, workers=workers, batch_size=batch_size, num_cpus=num_cpus,
            n_eval=n_eval, quiet=not verbose)
    note = ("scores of a pretrained backbone on synthetic scenes" if meaningful else
            "random backbone weights: the pipeline ran end to end, but the scores are NOT "
            "meaningful")

    metrics = {ds: {"n_images": d["n_images"], "scores": d["scores"]}
               for ds, d in report["datasets"].items()}
    table = scores_table([DatasetEvaluation(name=ds, scores=m["scores"], n_images=m["n_images"])
                          for ds, m in metrics.items()])
    title = (f"Selfment demo: {backbone}, {weights} weights"
             + ("" if meaningful else " (RANDOM: NOT meaningful)"))
    outputs = {
        "data": os.path.join(root, "data"), **out,
        **{name: path for name, path in report["files"].items() if "/" not in name},
        "plots": sorted(path for name, path in report["files"].items()
                        if name.startswith("plots/")),
        "label_sheets": stages["inspect"]["files"]["index.html"],
        "prediction_sheet": os.path.join(out["inspect"], PREDICTION_SHEET),
        "log": log_path,
        "results": os.path.join(root, RESULTS_NAME),
        "summary": os.path.join(root, SUMMARY_NAME),
    }
    summary = {
        "output_dir": root, "backbone": backbone, "weights": weights, "meaningful": meaningful,
        "note": note, "image_size": image_size, "metrics": metrics,
        "pseudo_mask_iou": pseudo_iou,
        "data": {k: data[k] for k in ("train_images", "eval_images", "eval_masks", "n_train",
                                      "n_eval", "n_eval_camouflaged")},
        "outputs": outputs, "stages": stages, "wall_s": round(time.perf_counter() - start, 1),
    }
    _write_results(_results_text(title, note, table, summary), summary)
    return summary


def _write_results(text: str, summary: dict[str, Any]) -> None:
    """``results.md`` and ``demo_summary.json``; the results page on stdout too."""
    with open(summary["outputs"]["results"], "w", encoding="utf-8") as f:
        f.write(text)
    with open(summary["outputs"]["summary"], "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2, default=str)
    print("\n" + text, flush=True)  # the user-facing result of the command


PREDICTION_SHEET = "predictions.png"


def _run_stages(console, data: dict, out: dict, *, backbone: str, weights: str, image_size: int,
                epochs: int, workers: int, batch_size: int, num_cpus: int, n_eval: int,
                quiet: bool) -> tuple[dict, dict, float]:
    """pseudo-label → train → segment → evaluate (the stage chain) → inspect, one bar each on
    ``console``."""
    from selfment_dist.pipeline.chain import run_chain
    from selfment_dist.pipeline.inspect import run_inspect

    name = f"synthetic ({n_eval} scenes, {data['n_eval_camouflaged']} camouflaged)"
    config = {
        "pipeline": {"output": os.path.dirname(out["labels"]), "force": True,
                     "synthetic": {"root": os.path.dirname(os.path.dirname(data["train_images"])),
                                   "n_train": data["n_train"], "n_eval": n_eval}},
        "pseudo_label": {"backbone": backbone, "weights": weights, "image_size": image_size,
                         "batch_size": batch_size, "save_features": True, "progress": False},
        "train": {"workers": workers, "epochs": epochs, "batch_size": batch_size},
        # At the training size, not the recipe's 2x: the demo's few-minute promise.
        "segment": {"image_size": image_size, "batch_size": batch_size, "progress": False},
        "evaluate": {"name": name},
    }
    bars = {
        "pseudo_label": lambda: StageBar(console, "[1/5] pseudo-label", data["n_train"]),
        "train": lambda: StageBar(console, "[2/5] train", epochs, unit="epochs",
                                  poll=lambda: _epochs_done(out["model"])),
        "segment": lambda: StageBar(console, "[3/5] segment", n_eval,
                                    poll=lambda: _count(out["predictions"], ".png")),
        "evaluate": lambda: StageBar(console, "[4/5] evaluate", n_eval),
    }
    started = _start_local_ray(num_cpus, quiet=quiet)
    try:
        chain = run_chain(config, stage_context=lambda stage: bars[stage]())
    finally:
        if started:
            import ray

            ray.shutdown()
    stages = {stage: record["summary"] for stage, record in chain["stages"].items()}
    report = stages["evaluate"]
    with StageBar(console, "[5/5] inspect", 2, unit="sheets"):
        stages["inspect"] = run_inspect(out["labels"], out["inspect"], per_sheet=16)
        _prediction_sheet(data, out, report)
    pseudo_iou = _pseudo_mask_iou(out["labels"], data["train_masks"])
    return stages, report, pseudo_iou


def _count(folder: str, suffix: str) -> int:
    try:
        return sum(1 for n in os.listdir(folder) if n.endswith(suffix))
    except FileNotFoundError:
        return 0


def _epochs_done(model: str) -> int | None:
    """Epochs finished so far, from the newest checkpoint's progress.json (None before one)."""
    import glob

    best = None
    for path in glob.glob(os.path.join(model, "_train", "**", "progress.json"), recursive=True):
        try:
            with open(path, encoding="utf-8") as f:
                epoch = int(json.load(f).get("epoch", 0))
        except (OSError, ValueError):
            continue
        best = epoch if best is None else max(best, epoch)
    return best


def _pseudo_mask_iou(labels: str, masks_dir: str) -> float:
    """Mean IoU of the pseudo-masks (upsampled to each scene) with the scenes' ground truth."""
    import numpy as np
    import pyarrow.parquet as pq
    from PIL import Image

    from selfment_dist.io.masks import decode_mask

    table = pq.read_table(labels, columns=["key", "grid_h", "grid_w", "mask", "error"])
    ious = []
    for row in table.to_pylist():
        if row["error"] is not None:
            continue
        with Image.open(os.path.join(masks_dir, f"{row['key']}.png")) as im:
            gt = np.asarray(im.convert("L")) > 127
        pm = decode_mask(row["mask"], row["grid_h"], row["grid_w"]).astype(np.uint8) * 255
        pm = np.asarray(Image.fromarray(pm).resize(gt.shape[::-1], Image.Resampling.NEAREST)) > 127
        union = (pm | gt).sum()
        ious.append((pm & gt).sum() / union if union else 1.0)
    return round(float(np.mean(ious)), 3) if ious else float("nan")


def _prediction_sheet(data: dict, out: dict, report: dict, per_group: int = 4) -> None:
    """``inspect/predictions.png``: held-out images with their predicted saliency, the lowest,
    middle and highest per-image IoU (from the evaluation's per_image.csv)."""
    import csv

    import numpy as np
    from PIL import Image

    from selfment_dist.evaluation.contact_sheet import Tile, contact_sheet

    with open(report["files"]["per_image.csv"], encoding="utf-8") as f:
        rows = sorted(csv.DictReader(f), key=lambda r: float(r["iou"]))
    n = len(rows)
    k = min(per_group, n)
    mid = max(0, (n - k) // 2)
    picked = rows[:k] + rows[mid:mid + k] + rows[n - k:]
    tiles = []
    for r in picked:
        image = np.asarray(Image.open(_image_file(data["eval_images"], r["key"])).convert("RGB"))
        with Image.open(os.path.join(out["predictions"], f"{r['key']}.png")) as im:
            saliency = np.asarray(im.convert("L"), dtype=np.float32) / 255
        # The mask the IoU scores (saliency >= 0.5), not the soft map: a random-weight head's
        # saliency is too flat to see as a tint.
        tiles.append(Tile(image=image, mask=saliency >= 0.5,
                          caption=f"{r['key']}\nIoU {float(r['iou']):.2f}"))
    title = (f"Held-out predictions (red: saliency >= 0.5): the lowest, middle and highest IoU, "
             f"{k} each of {n} images")
    with open(os.path.join(out["inspect"], PREDICTION_SHEET), "wb") as f:
        f.write(contact_sheet(tiles, title=title, size=128, cols=2 * k))


def _image_file(folder: str, key: str) -> str:
    for ext in (".jpg", ".png", ".jpeg"):
        path = os.path.join(folder, key + ext)
        if os.path.exists(path):
            return path
    raise UserInputNotFoundError(f"no image for {key} in {folder}")


def _prepare_output(output_dir: str) -> str:
    """The absolute output folder, emptied of an earlier demo's results (never of other files)."""
    fs, _ = url_to_fs(output_dir)
    if not is_local(fs):
        raise UserValueError(f"the demo writes to a local folder, got {output_dir!r}")
    root = os.path.abspath(output_dir)
    try:
        names = os.listdir(root) if os.path.isdir(root) else []
    except OSError as exc:  # a folder this process may not list
        raise OutputNotWritableError(f"cannot write to the output {output_dir}: "
                                     f"{exc.strerror or exc}") from None
    ours = os.path.exists(os.path.join(root, MARKER))
    if names and not ours:
        raise UserValueError(f"{root} is not empty and was not written by `selfment demo`; "
                             "choose a new or empty folder")
    # A file in the way, a parent that is a file or a read-only folder: one line
    # (OutputNotWritableError), before anything is cleared or written.
    prepare_output(fs, root, output_dir)
    if ours:
        for name in (*_STAGE_DIRS, RESULTS_NAME, SUMMARY_NAME, LOG_NAME, CHAIN_SUMMARY_NAME):
            path = os.path.join(root, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    open(os.path.join(root, MARKER), "w").close()
    return root


def _start_local_ray(num_cpus: int, *, quiet: bool = False) -> bool:
    """An in-process Ray with ``num_cpus`` CPUs (RAY_ADDRESS ignored); True when started here.
    ``quiet``: no Ray Data progress bars (the demo draws its own)."""
    from selfment_dist.pipeline._internal.ray_runtime import ensure_ray

    if quiet:
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False

    saved = os.environ.pop("RAY_ADDRESS", None)
    if saved:
        logger.info("the demo runs on a local Ray: ignoring RAY_ADDRESS=%s", saved)
    try:
        return ensure_ray(None, num_cpus=num_cpus)
    finally:
        if saved is not None:
            os.environ["RAY_ADDRESS"] = saved


def _results_text(title: str, note: str, table: str, summary: dict) -> str:
    o, s = summary["outputs"], summary["stages"]
    rows = [
        ("data", o["data"], f"{summary['data']['n_train']} training + "
                            f"{summary['data']['n_eval']} held-out synthetic scenes"),
        ("labels", o["labels"], f"pseudo-labels, {s['pseudo_label']['rows_total']} rows"),
        ("model", o["model"], f"head.safetensors + model.json, {s['train']['epochs']} epochs "
                              f"on {s['train']['train_rows']} of {s['train']['rows']} rows "
                              f"({s['train'].get('no_object_rows', 0)} flagged no_object, "
                              f"{s['train']['low_confidence_rows']} left out)"),
        ("predictions", o["predictions"], f"{s['segment'].get('maps_total', '?')} saliency PNGs"),
        ("report", o["report"], "metrics.json, metrics.md, per_image.csv, plots/"),
        ("label sheets", o["label_sheets"], "pseudo-masks, lowest/middle/highest confidence"),
        ("prediction sheet", o["prediction_sheet"], "held-out predictions by IoU"),
        ("log", o["log"], "Ray's and the stages' own output"),
        ("results", o["results"], "this page"),
        ("summary", o["summary"], "all of it as JSON"),
    ]
    width = max(len(r[0]) for r in rows)
    pseudo = (f"Pseudo-masks of the {summary['data']['n_train']} training scenes: mean IoU "
              f"{summary['pseudo_mask_iou']:.3f} with their ground truth (image size "
              f"{summary['image_size']} px).")
    lines = [f"# {title}", "", f"{note}.", "", table.rstrip(), "", pseudo, "", "## Outputs", ""]
    lines += [f"- {name.ljust(width)}  {path}  ({what})" for name, path, what in rows]
    lines += ["", f"Finished in {summary['wall_s']:.0f} s.", ""]
    return "\n".join(lines)
