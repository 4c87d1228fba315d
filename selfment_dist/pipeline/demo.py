"""``selfment demo``: synthetic scenes through the whole pipeline on a local Ray, in minutes.

    run_demo("selfment_demo")        # the same as: selfment demo --output selfment_demo

It writes a small synthetic dataset (training scenes and a held-out set, half of it camouflaged,
with ground truth), then runs pseudo-label → train (Ray Train, DDP) → segment → evaluate through
the stage chain (:mod:`.chain`) on an in-process Ray with a few CPUs, prints the metrics table and where every output is. The backbone's
hub weights are tried first; when the model hub cannot be reached the demo says so in one line
and goes on with random weights, and marks the scores as not meaningful.

The output folder::

    data/train/images, masks     training scenes (their masks are never read: no labels)
    data/eval/images, masks      held-out scenes with ground truth
    labels/                      pseudo-labels: part-*.parquet + _selfment.json   (pseudo-label)
    model/                       head.safetensors + model.json                   (train)
    predictions/                 <key>.png saliency maps of data/eval/images      (segment)
    report/                      metrics.json, metrics.md, per_image.csv, plots/  (evaluate)
    pipeline_summary.json        the stage chain's record (settings, status, summaries)
    results.md                   the metrics table with its caveat, and where everything is
    demo_summary.json            what :func:`run_demo` returns
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import socket
import time
from typing import Any
from urllib.parse import urlparse

from ..io.storage import is_local, join, url_to_fs
from ..settings import DemoSettings, SyntheticSettings, build_settings
from ..synthetic import write_scenes

logger = logging.getLogger(__name__)

__all__ = ["run_demo", "write_synthetic_sets", "synthetic_layout", "hub_weights_problem"]

#: Written first into a demo's output folder: a folder holding it may be cleared by a new demo.
MARKER = ".selfment_demo"
SUMMARY_NAME = "demo_summary.json"
CHAIN_SUMMARY_NAME = "pipeline_summary.json"  # the stage chain's record, see .chain
RESULTS_NAME = "results.md"
_STAGE_DIRS = ("labels", "model", "predictions", "report")
_HUB_PROBE_TIMEOUT_S = 3.0


# ---------------------------------------------------------------------------------------------
# Synthetic data (also what jobs/pipeline.py's `pipeline.synthetic` writes)

def synthetic_layout(root: str) -> dict[str, str]:
    """Where :func:`write_synthetic_sets` puts the two sets under ``root``."""
    return {f"{split}_{kind}": join(root, split, kind)
            for split in ("train", "eval") for kind in ("images", "masks")}


def write_synthetic_sets(root: str, *, n_train: int = 32, n_eval: int = 12,
                         size: tuple[int, int] | list[int] = (96, 128), seed: int = 0,
                         eval_camouflage_fraction: float = 0.5,
                         storage_options: dict | None = None) -> dict[str, Any]:
    """A training set and a held-out evaluation set of synthetic scenes under ``root``.

    ``train/`` holds ``n_train`` scenes (a quarter camouflaged), ``eval/`` ``n_eval`` other
    scenes (``eval_camouflage_fraction`` of them camouflaged), each as ``images/<key>.jpg`` +
    ``masks/<key>.png`` (see :func:`selfment_dist.synthetic.write_scenes`). A set whose folders
    already hold enough files is left as it is (the scenes are a pure function of the seed).

    Returns:
        :func:`synthetic_layout` plus ``n_train``, ``n_eval`` and ``n_eval_camouflaged``.
    """
    layout = synthetic_layout(root)
    size = (int(size[0]), int(size[1]))
    for split, n, split_seed, fraction in (("train", n_train, seed, 0.25),
                                           ("eval", n_eval, seed + 1, eval_camouflage_fraction)):
        images, masks = layout[f"{split}_images"], layout[f"{split}_masks"]
        if _count_files(images, storage_options) >= n and _count_files(masks, storage_options) >= n:
            logger.info("synthetic %s set already at %s (%d scenes)", split, join(root, split), n)
            continue
        write_scenes(join(root, split), n, seed=split_seed, size=size,
                     camouflage_fraction=fraction, storage_options=storage_options)
    # write_scenes spreads camouflaged scenes so that the first n hold floor(n * f) of them.
    return {**layout, "n_train": n_train, "n_eval": n_eval,
            "n_eval_camouflaged": math.floor(n_eval * eval_camouflage_fraction)}


def _count_files(uri: str, storage_options: dict | None) -> int:
    fs, path = url_to_fs(uri, storage_options)
    try:
        return len(fs.ls(path, detail=False))
    except FileNotFoundError:
        return 0


# ---------------------------------------------------------------------------------------------
# Hub weights or random ones

def hub_weights_problem(backbone: str, image_size: int) -> str | None:
    """None when ``backbone``'s hub weights load here; else why not, in one line.

    Without ``HF_HUB_OFFLINE`` the hub's host is probed first (a few seconds at most), so an
    offline machine does not wait through the hub client's retries; with it, only the local
    cache is tried.
    """
    from huggingface_hub import constants

    from ..backbone import build_backbone

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
    range is declared there) or ``run_demo(output_dir, **options)``. The stages run through the
    stage chain (:func:`selfment_dist.pipeline.chain.run_chain`), as ``selfment run`` does.

    Settings worth knowing: ``output_dir`` is a local folder (created; see the module doc for its
    layout); a folder left by an earlier demo is cleared of that demo's results first, any other
    non-empty folder is refused. ``weights`` None: hub weights when the hub can be reached, else
    random ones (said in one line). The in-process Ray has ``num_cpus`` CPUs (the demo ignores
    ``RAY_ADDRESS``: it runs locally).

    Returns:
        The summary written to ``demo_summary.json``: ``weights``, ``meaningful`` (False with
        random weights), ``note``, ``metrics`` (per dataset: ``n_images`` and ``scores``),
        ``outputs`` (every path), ``stages`` (each stage's own summary), ``wall_s``.
    """
    from ..reports import DatasetEvaluation, scores_table
    from .chain import run_chain

    s = build_settings(DemoSettings, args, options)
    start = time.perf_counter()
    root = _prepare_output(s.output_dir)
    out = {name: os.path.join(root, name) for name in _STAGE_DIRS}

    weights = s.weights
    if weights is None:
        problem = hub_weights_problem(s.backbone, s.image_size)
        weights = "hub" if problem is None else "random"
        if problem is not None:
            logger.warning("Model hub not reachable (%s): continuing with random backbone weights; "
                           "the results are NOT meaningful.", problem)
    meaningful = weights != "random"
    note = ("scores of a pretrained backbone on synthetic scenes" if meaningful else
            "random backbone weights: the pipeline ran end to end, but the scores are NOT "
            "meaningful")

    started = _start_local_ray(s.num_cpus)
    try:
        chain = run_chain(_chain_config(s, root, weights), force=True)
    finally:
        if started:
            import ray

            ray.shutdown()
    stages = {name: record["summary"] for name, record in chain["stages"].items()}
    data, report = chain["synthetic"], stages["evaluate"]

    metrics = {ds: {"n_images": d["n_images"], "scores": d["scores"]}
               for ds, d in report["datasets"].items()}
    table = scores_table([DatasetEvaluation(name=ds, scores=m["scores"], n_images=m["n_images"])
                          for ds, m in metrics.items()])
    title = (f"Selfment demo: {s.backbone}, {weights} weights"
             + ("" if meaningful else " (RANDOM: NOT meaningful)"))
    outputs = {
        "data": os.path.join(root, "data"), **out,
        **{name: path for name, path in report["files"].items() if "/" not in name},
        "plots": sorted(path for name, path in report["files"].items()
                        if name.startswith("plots/")),
        "results": os.path.join(root, RESULTS_NAME),
        "summary": os.path.join(root, SUMMARY_NAME),
    }
    summary = {
        "output_dir": root, "backbone": s.backbone, "weights": weights, "meaningful": meaningful,
        "note": note, "image_size": s.image_size, "metrics": metrics,
        "data": {k: data[k] for k in ("train_images", "eval_images", "eval_masks", "n_train",
                                      "n_eval", "n_eval_camouflaged")},
        "outputs": outputs, "stages": stages, "wall_s": round(time.perf_counter() - start, 1),
    }
    text = _results_text(title, note, table, summary)
    with open(outputs["results"], "w", encoding="utf-8") as f:
        f.write(text)
    with open(outputs["summary"], "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2, default=str)
    print("\n" + text, flush=True)  # the user-facing result of the command
    return summary


def _chain_config(s: DemoSettings, root: str, weights: str) -> dict[str, Any]:
    """The demo as a stage-chain config: synthetic scenes under ``root/data``, small CPU runs."""
    n_camouflaged = math.floor(
        s.n_eval * SyntheticSettings.model_fields["eval_camouflage_fraction"].default)
    return {
        "pipeline": {"output": root, "synthetic": {"root": os.path.join(root, "data"),
                                                   "n_train": s.n_images, "n_eval": s.n_eval}},
        "pseudo_label": {"backbone": s.backbone, "weights": weights, "image_size": s.image_size,
                         "batch_size": s.batch_size, "save_features": True, "progress": False},
        "train": {"workers": s.workers, "epochs": s.epochs, "batch_size": s.batch_size},
        "segment": {"batch_size": s.batch_size, "progress": False},
        "evaluate": {"name": f"synthetic ({s.n_eval} scenes, {n_camouflaged} camouflaged)"},
    }


def _prepare_output(output_dir: str) -> str:
    """The absolute output folder, emptied of an earlier demo's results (never of other files)."""
    fs, _ = url_to_fs(output_dir)
    if not is_local(fs):
        raise ValueError(f"the demo writes to a local folder, got {output_dir!r}")
    root = os.path.abspath(output_dir)
    if os.path.isdir(root) and os.listdir(root):
        if not os.path.exists(os.path.join(root, MARKER)):
            raise ValueError(f"{root} is not empty and was not written by `selfment demo`; "
                             "choose a new or empty folder")
        for name in (*_STAGE_DIRS, RESULTS_NAME, SUMMARY_NAME, CHAIN_SUMMARY_NAME):
            path = os.path.join(root, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    os.makedirs(root, exist_ok=True)
    open(os.path.join(root, MARKER), "w").close()
    return root


def _start_local_ray(num_cpus: int) -> bool:
    """An in-process Ray with ``num_cpus`` CPUs (RAY_ADDRESS ignored); True when started here."""
    from ._ray import ensure_ray

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
        ("model", o["model"], f"head.safetensors + model.json, {s['train']['epochs']} epochs"),
        ("predictions", o["predictions"], f"{s['segment'].get('maps_total', '?')} saliency PNGs"),
        ("report", o["report"], "metrics.json, metrics.md, per_image.csv, plots/"),
        ("results", o["results"], "this page"),
        ("summary", o["summary"], "all of it as JSON"),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"# {title}", "", f"{note}.", "", table.rstrip(), "", "## Outputs", ""]
    lines += [f"- {name.ljust(width)}  {path}  ({what})" for name, path, what in rows]
    lines += ["", f"Finished in {summary['wall_s']:.0f} s.", ""]
    return "\n".join(lines)
