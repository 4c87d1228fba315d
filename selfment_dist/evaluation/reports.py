"""Evaluation reports: metrics.json, a Markdown table, a per-image CSV and curve plots.

Everything is written through fsspec, so ``output`` may be a local folder or any URL (s3://, …).
Layout under ``output``::

    metrics.json               scores, image counts, problems, protocol notes, versions, config
    metrics.md                 datasets × metrics table (and a problems summary)
    per_image.csv              dataset, key, per-image metrics (see metrics.PER_IMAGE_KEYS)
    plots/<dataset>_pr.png     precision–recall curves (both protocols)
    plots/<dataset>_f.png      F-measure vs threshold (both protocols)

No Ray here: :mod:`selfment_dist.pipeline.evaluate` computes, this module writes.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
import textwrap
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from selfment_dist.io.storage import join, url_to_fs
from selfment_dist.evaluation.metrics import PER_IMAGE_KEYS, SCORE_KEYS

logger = logging.getLogger(__name__)

__all__ = [
    "STANDARD_BENCHMARKS",
    "DatasetEvaluation",
    "benchmark_uris",
    "benchmarks_table",
    "scores_table",
    "write_reports",
]

# Standard saliency (SOD) and camouflage (COD) test sets. "images" and "masks" are relative to the
# benchmark's own folder, i.e. where its archive(s) unpack; images and masks share file stems.
STANDARD_BENCHMARKS: dict[str, dict[str, Any]] = {
    "ECSSD": {"task": "SOD", "n": 1000, "images": "images", "masks": "ground_truth_mask",
              "source": "CUHK: images.zip + ground_truth_mask.zip"},
    "DUTS-TE": {"task": "SOD", "n": 5019, "images": "DUTS-TE-Image", "masks": "DUTS-TE-Mask",
                "source": "DUTS-TE.zip (unpacks to DUTS-TE/)"},
    "DUT-OMRON": {"task": "SOD", "n": 5168, "images": "DUT-OMRON-image", "masks": "pixelwiseGT-new-PNG",
                  "source": "DUT-OMRON-image.zip + DUT-OMRON-gt-pixelwise.zip"},
    "HKU-IS": {"task": "SOD", "n": 4447, "images": "imgs", "masks": "gt",
               "source": "HKU-IS.rar (all 4447 images, the usual test set)"},
    "PASCAL-S": {"task": "SOD", "n": 850, "images": "datasets/imgs/pascal", "masks": "datasets/masks/pascal",
                 "source": "salObj release; soft masks, binarised by the metrics (gt > 127 / > 128)"},
    "CAMO": {"task": "COD", "n": 250, "images": "Imgs", "masks": "GT",
             "source": "SINet-V2 TestDataset.zip: TestDataset/CAMO/ (official CAMO-V.1.0: Images/Test, GT)"},
    "CHAMELEON": {"task": "COD", "n": 76, "images": "Imgs", "masks": "GT",
                  "source": "SINet-V2 TestDataset.zip: TestDataset/CHAMELEON/"},
    "COD10K": {"task": "COD", "n": 2026, "images": "Imgs", "masks": "GT",
               "source": "SINet-V2 TestDataset.zip: TestDataset/COD10K/ "
                         "(official COD10K-v3: Test/Image, Test/GT_Object)"},
    "NC4K": {"task": "COD", "n": 4121, "images": "Imgs", "masks": "GT",
             "source": "NC4K release (Lv et al., CVPR 2021): NC4K/"},
}

PROTOCOLS = {
    "iou, accuracy, fmax": (
        "unsupervised-SOD, the official Selfment compute_simple_metrics (eval/metrics.py): "
        "pred/255 vs gt/255>0.5; per-image IoU and accuracy of pred>0.5, averaged over images; "
        "fmax = mean over images of each image's max over t=k/255 (k<255, pred>t) of "
        "F=(1+b2)PR/(b2 P+R+1e-7), b2=0.3^2=0.09, P=TP/(PP+1e-7), R=TP/(GP+1e-7); "
        "empty-union IoU = 1"),
    "fmax_curve": (
        "not the paper's protocol: max over t of the image-averaged b2=0.09 F curve (<= fmax)"),
    "fmax_tokencut": (
        "TokenCut's metric.py (YangtaoWANG95/TokenCut): max over t=k/255 of the image-averaged "
        "F curve with b2=0.3, P=1 on an empty prediction, R=1 on an empty mask, NaN F = 0; "
        "compare with TokenCut's tables, not with the paper's fmax"),
    "max_fm ... mae": (
        "the official compute_biref_metrics = pysodmetrics Fmeasure (b2=0.3), WeightedFmeasure, "
        "Smeasure, Emeasure, MAE on float32 inputs as the official runner passes them; "
        "max/mean over the image-averaged 256-threshold curves; adp = adaptive threshold"),
    "size": ("as the official runner (eval/runner.py), a mask whose size differs from its "
             "prediction's is resized to the prediction (PIL bilinear); with resize=prediction "
             "the prediction is resized to the mask instead (see config)"),
}

_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def benchmark_uris(name: str, root: str) -> tuple[str, str]:
    """``(images_uri, masks_uri)`` of a :data:`STANDARD_BENCHMARKS` entry whose folder is ``root``.

    Raises:
        KeyError: for a name that is not in :data:`STANDARD_BENCHMARKS`.
    """
    try:
        entry = STANDARD_BENCHMARKS[name]
    except KeyError:
        raise KeyError(f"unknown benchmark {name!r}; known: {', '.join(STANDARD_BENCHMARKS)}") from None
    return join(root, entry["images"]), join(root, entry["masks"])


def benchmarks_table() -> str:
    """:data:`STANDARD_BENCHMARKS` as a Markdown table (for the README and ``--help``)."""
    lines = ["| benchmark | task | images/ | masks/ | test images | archive |",
             "|---|---|---|---|---:|---|"]
    for name, e in STANDARD_BENCHMARKS.items():
        lines.append(f"| {name} | {e['task']} | `{e['images']}` | `{e['masks']}` | {e['n']} "
                     f"| {e['source']} |")
    return "\n".join(lines) + "\n"


@dataclass
class DatasetEvaluation:
    """The evaluation of one dataset, as the pipeline hands it to the report writers.

    Attributes:
        name: dataset name (a file-name-safe form is used for plot files).
        scores: ``{metric: float}`` (:data:`SCORE_KEYS`), or ``{metric: None}`` with no images.
        n_images: images that were scored.
        curves: :func:`selfment_dist.evaluation.metrics.merge_curves` output, or None with no images.
        per_image: ``[(key, {PER_IMAGE_KEYS: value})]`` in key order.
        problems: ``{"counts": {kind: n}, "examples": {kind: [key or "key: message", ...]}}``.
        sources: ``{"predictions": uri, "masks": uri}``.
    """

    name: str
    scores: dict[str, float | None]
    n_images: int
    curves: dict | None = None
    per_image: list[tuple[str, dict]] = field(default_factory=list)
    problems: dict = field(default_factory=lambda: {"counts": {}, "examples": {}})
    sources: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"n_images": self.n_images, "scores": _finite(self.scores),
                "problems": self.problems, **self.sources}


def _finite(scores: dict) -> dict:
    return {k: (None if v is None or not math.isfinite(v) else float(v)) for k, v in scores.items()}


def _fmt(value: float | None) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.4f}"


def scores_table(datasets: list[DatasetEvaluation]) -> str:
    """A Markdown table: one row per dataset, one column per metric (4 decimals)."""
    head = "| dataset | images | " + " | ".join(SCORE_KEYS) + " |"
    rule = "|---|---:|" + "---:|" * len(SCORE_KEYS)
    rows = [f"| {d.name} | {d.n_images} | " + " | ".join(_fmt(d.scores.get(k)) for k in SCORE_KEYS)
            + " |" for d in datasets]
    return "\n".join([head, rule, *rows]) + "\n"


def _markdown(datasets: list[DatasetEvaluation]) -> str:
    parts = ["# Evaluation\n\n", scores_table(datasets)]
    problem_lines = []
    for d in datasets:
        counts = {k: n for k, n in d.problems.get("counts", {}).items() if n}
        if counts:
            problem_lines.append(f"- {d.name}: " + ", ".join(f"{k} {n}" for k, n in sorted(counts.items())))
    if problem_lines:
        parts += ["\n## Problems (see metrics.json for examples)\n\n", "\n".join(problem_lines) + "\n"]
    parts.append("\n## Protocols\n\n")
    parts += [f"- **{k}**: {v}\n" for k, v in PROTOCOLS.items()]
    return "".join(parts)


def _csv(datasets: list[DatasetEvaluation]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["dataset", "key", *PER_IMAGE_KEYS])
    for d in datasets:
        for key, row in d.per_image:
            writer.writerow([d.name, key, *(_csv_value(row[k]) for k in PER_IMAGE_KEYS)])
    return buf.getvalue()


def _csv_value(value: Any) -> Any:
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    return repr(float(value))  # full precision, round-trips


def _plots(d: DatasetEvaluation) -> dict[str, bytes]:
    """PNG bytes of the PR and F-vs-threshold figures (matplotlib Agg, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    usod, sod = d.curves["usod"], d.curves["sod"]
    labels = {"sod": "pysodmetrics (β²=0.3, min-max normalised)",
              "usod": "unsupervised-SOD (β²=0.09)"}

    def render(draw) -> bytes:
        # Constrained layout keeps the (wrapped) title, labels and legend inside the figure.
        fig = Figure(figsize=(5, 4), dpi=100, layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        draw(ax)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left", fontsize=8)
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return buf.getvalue()

    def pr(ax):
        ax.plot(sod["recall"], sod["precision"], label=labels["sod"])
        ax.plot(usod["recall"], usod["precision"], label=labels["usod"], linestyle="--")
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        _title(ax, f"{d.name}: precision–recall ({d.n_images} images)")

    def fcurve(ax):
        ax.plot(sod["threshold"], sod["fmeasure"], label=labels["sod"])
        ax.plot(usod["threshold"], usod["fmeasure"], label=labels["usod"], linestyle="--")
        ax.set_xlabel("threshold")
        ax.set_ylabel("F-measure")
        _title(ax, f"{d.name}: F-measure vs threshold")

    return {"pr": render(pr), "f": render(fcurve)}


def _title(ax, text: str) -> None:
    """A title wrapped to the axes' width: a long dataset name must not run off both edges."""
    ax.set_title("\n".join(textwrap.wrap(text, 52)), fontsize=10)


def _write(fs, path: str, data: bytes) -> None:
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(data)


def write_reports(output: str, datasets: list[DatasetEvaluation], *, extra: dict | None = None,
                  storage_options: dict | None = None) -> dict[str, Any]:
    """Write metrics.json, metrics.md, per_image.csv and the plots under ``output``.

    Args:
        output: folder (local path or fsspec URL).
        datasets: one :class:`DatasetEvaluation` per dataset, in report order.
        extra: more top-level entries for metrics.json (config, versions, …).
        storage_options: fsspec options for ``output``.

    Returns:
        The metrics.json document, with ``"files"``: the URIs written.
    """
    fs, root = url_to_fs(output, storage_options)
    root = root.rstrip("/")
    files: dict[str, str] = {}

    def put(rel: str, data: bytes) -> None:
        _write(fs, f"{root}/{rel}", data)
        files[rel] = join(output, rel)

    put("metrics.md", _markdown(datasets).encode())
    put("per_image.csv", _csv(datasets).encode())
    for d in datasets:
        if d.curves is None:
            continue
        safe = _SAFE.sub("_", d.name) or "dataset"
        for kind, png in _plots(d).items():
            put(f"plots/{safe}_{kind}.png", png)
    document = {
        "datasets": {d.name: d.to_json() for d in datasets},
        "protocols": PROTOCOLS,
        **(extra or {}),
        "files": dict(files, **{"metrics.json": join(output, "metrics.json")}),
    }
    put("metrics.json", json.dumps(document, indent=2, sort_keys=False).encode())
    logger.info("Wrote evaluation reports to %s", output)
    return document
