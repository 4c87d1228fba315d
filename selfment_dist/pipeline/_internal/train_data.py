"""The labelled dataset of ``selfment train``: pseudo-label parts → Ray Data training rows.

The driver reads only the labels' manifest, parquet footers and a few small columns
(:func:`inspect_labels` → :class:`LabelSet`); :func:`build_dataset` gives Ray Train the rows the
workers iterate: error rows dropped, and either the stored ``features`` column or each row's
image, read, decoded and resized by CPU tasks (:func:`load_images`) for the backbone; rows
left out by a confidence filter (``skip_no_object``, ``min_confidence``, ``keep_fraction``:
beyond the paper, all off by default, as the official code trains on every image) are dropped as
they are read.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field

import numpy as np
import pyarrow.parquet as pq

from selfment_dist.errors import UserInputNotFoundError, UserValueError
from selfment_dist.io.schema import open_part
from selfment_dist.io.storage import is_local, url_to_fs
from selfment_dist.pipeline._internal.manifest import MANIFEST_NAME, read_manifest

logger = logging.getLogger(__name__)

__all__ = ["LabelSet", "inspect_labels", "load_images", "build_dataset", "arrow_fs",
           "shuffled_bytes_per_epoch", "label_row_bytes",
           "MANIFEST_NAME"]

_CONTAINER_SUFFIXES = (".parquet", ".tar", ".tar.gz", ".tgz")
# Label sets smaller than this (as the workers will see them) are materialised in the object
# store once instead of being read again every epoch.
_MATERIALIZE_MAX_BYTES = 512 * 2**20


# ---------------------------------------------------------------------------------------------
# The labels (driver side)

@dataclass
class LabelSet:
    """What the driver knows about a pseudo-label dataset (from its manifest and footers).

    Attributes:
        uri: the dataset folder.
        files: URIs of its parquet parts.
        rows, errors: row counts (error rows have ``error`` set and are skipped).
        low_confidence: rows without error that the confidence filter leaves out.
        row_filter: the confidence filter: ``{"rule": "none" | "no_object" | "min_confidence",
            "threshold": float | None}`` (``keep_fraction`` becomes a ``min_confidence``).
        grid: (grid_h, grid_w) shared by every usable row.
        feature_source: ``"stored"`` (train on the ``features`` column) or ``"backbone"``
            (recompute features from the image files with the manifest's backbone).
        feature_dim: channels C of the stored features (None when using the backbone).
        backbone, weights, image_size: the pseudo-label run's backbone (from the manifest).
    """

    uri: str
    files: list[str]
    rows: int
    errors: int
    grid: tuple[int, int]
    feature_source: str
    feature_dim: int | None
    backbone: str
    weights: str
    image_size: int
    manifest: dict = field(repr=False, default_factory=dict)
    low_confidence: int = 0
    no_object_rows: int = 0  # usable rows flagged no_object (trained on unless skip_no_object)
    row_filter: dict = field(default_factory=lambda: {"rule": "none", "threshold": None})

    @property
    def usable(self) -> int:
        """Rows training reads: neither errors nor left out by the confidence filter."""
        return self.rows - self.errors - self.low_confidence


def _confidence_filter(conf: np.ndarray, no_object: np.ndarray | None, *,
                       min_confidence: float | None, keep_fraction: float | None,
                       labels: str, skip_no_object: bool = False) -> tuple[dict, int]:
    """The rule choosing training rows by confidence, and how many usable rows it leaves out.

    Args:
        conf: float32 confidences of the usable rows (empty when the labels have none);
            no_object: their bool flags (None when the labels have none).
    """
    if min_confidence is not None and keep_fraction is not None:
        raise ValueError("give min_confidence or keep_fraction, not both")
    if min_confidence is not None and not 0.0 <= min_confidence <= 1.0:
        raise ValueError(f"min_confidence must be in [0, 1], got {min_confidence}")
    if keep_fraction is not None and not 0.0 < keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    if no_object is None:
        if min_confidence or skip_no_object or (keep_fraction is not None
                                                and keep_fraction < 1.0):
            raise UserValueError(f"the pseudo-labels at {labels} have no confidence column, or rows "
                             "without one (made before it existed): pseudo-label them again to "
                             "filter by it")
        return {"rule": "none", "threshold": None}, 0
    if keep_fraction is not None:
        # The confidence of the last row kept; ties with it are kept too.
        k = max(1, math.ceil(keep_fraction * len(conf)))
        min_confidence = float(np.sort(conf)[::-1][k - 1])
    if min_confidence is not None:
        return ({"rule": "min_confidence", "threshold": float(min_confidence)},
                int((conf < np.float32(min_confidence)).sum()))
    if skip_no_object:
        return {"rule": "no_object", "threshold": None}, int(no_object.sum())
    return {"rule": "none", "threshold": None}, 0  # the official code: every row


def _keep_mask(table, row_filter: dict):
    """Boolean mask of the rows of ``table`` that training reads: no error, and kept by
    ``row_filter`` (a null mask entry drops its row, as ``Table.filter`` does)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    keep = pc.is_null(table.column("error"))
    if row_filter["rule"] == "no_object":
        keep = pc.and_(keep, pc.invert(table.column("no_object")))
    elif row_filter["rule"] == "min_confidence":
        # In float32, as the column is stored: a threshold equal to a stored value keeps it.
        threshold = pa.scalar(np.float32(row_filter["threshold"]), type=pa.float32())
        keep = pc.and_(keep, pc.greater_equal(table.column("confidence"), threshold))
    return keep


def inspect_labels(labels: str, *, storage_options: dict | None = None,
                   features: str = "auto", min_confidence: float | None = None,
                   keep_fraction: float | None = None, skip_no_object: bool = False) -> LabelSet:
    """Read the manifest, the parquet footers and the small grid/source/confidence columns of
    ``labels``.

    Args:
        labels: folder (local or fsspec URL) written by ``selfment pseudo-label``.
        features: ``"auto"``, ``"stored"`` or ``"backbone"``; see :func:`run_train`. Decides
            ``LabelSet.feature_source``.
        min_confidence, keep_fraction: the confidence filter; see :func:`run_train`.

    Raises:
        FileNotFoundError: nothing at ``labels``.
        ValueError: no manifest, no parquet parts, no usable row, mixed grids, missing columns,
            ``"stored"`` without a features column, or training through the backbone on rows
            whose image sits inside a parquet/tar container (only files can be re-read).
    """
    if features not in ("auto", "stored", "backbone"):
        raise ValueError(f"features must be 'auto', 'stored' or 'backbone', got {features!r}")
    fs, root = url_to_fs(labels, storage_options)
    root = root.rstrip("/")
    if not fs.exists(root):
        raise UserInputNotFoundError(f"no pseudo-labels at {labels}: run `selfment pseudo-label` first")
    manifest, (backbone, weights, image_size) = _label_manifest(fs, root, labels)
    paths = _parquet_parts(fs, root)
    if not paths:
        raise UserValueError(f"no pseudo-label parquet files in {labels}")
    scan = _scan_parts(fs, paths, manifest.get("feature_dim"))
    rows, errors, grids = scan.rows, scan.errors, scan.grids
    if rows == 0:
        raise UserValueError(f"the pseudo-labels at {labels} are empty (0 rows)")
    if rows == errors:
        raise UserValueError(f"all {rows} pseudo-label rows at {labels} are errors: nothing to train on")
    if len(grids) != 1:
        raise UserValueError(f"pseudo-labels at {labels} mix patch grids {sorted(grids)}; one "
                         "pseudo-label run (one image size) per training set")
    if features == "stored" and not scan.has_features:
        raise UserValueError(f"features='stored' but the pseudo-labels at {labels} have no "
                         "features column (pseudo-label with --save-features)")
    stored = scan.has_features and features != "backbone"
    if not stored and scan.containers:
        raise UserValueError(
            f"training through the backbone re-reads each image from its file, but some images "
            f"of {labels} sit inside parquet/tar containers (e.g. {scan.containers[0]}); "
            "pseudo-label those inputs with --save-features and train on the stored features")
    feature_dim = scan.feature_dim
    if stored and feature_dim is None:
        feature_dim = _feature_dim_from_rows(fs, paths)
    has_quality = scan.has_quality
    row_filter, low_confidence = _confidence_filter(
        np.concatenate(scan.confidences).astype(np.float32) if has_quality
        else np.zeros(0, np.float32),
        np.concatenate(scan.no_objects).astype(bool) if has_quality else None,
        min_confidence=min_confidence, keep_fraction=keep_fraction, labels=labels,
        skip_no_object=skip_no_object)
    if rows - errors - low_confidence == 0:
        raise UserValueError(f"the confidence filter ({row_filter['rule']}, threshold "
                         f"{row_filter['threshold']}) leaves none of the {rows - errors} usable "
                         f"rows of {labels}; lower --min-confidence or raise --keep-fraction")
    return LabelSet(uri=labels, files=[_uri(fs, p) for p in paths], rows=rows, errors=errors,
                    grid=next(iter(grids)), feature_source="stored" if stored else "backbone",
                    feature_dim=int(feature_dim) if stored else None,
                    backbone=backbone, weights=weights, image_size=image_size, manifest=manifest,
                    low_confidence=low_confidence, row_filter=row_filter,
                    no_object_rows=int(sum(int(n.sum()) for n in scan.no_objects)) if has_quality else 0)


def _label_manifest(fs, root: str, labels: str) -> tuple[dict, tuple[str, str, int]]:
    """The labels' manifest and the backbone it names: (backbone, weights, image_size)."""
    manifest = read_manifest(fs, root, MANIFEST_NAME)
    if manifest is None:
        raise UserValueError(f"{labels} has no {MANIFEST_NAME} manifest: it is not the output of "
                         "`selfment pseudo-label` (the manifest names the backbone to train for)")
    config = manifest.get("config", manifest)
    try:
        backbone, weights = str(config["backbone"]), str(config["weights"])
        image_size = int(config["image_size"])
    except (KeyError, TypeError, ValueError) as exc:
        raise UserValueError(f"{labels}/{MANIFEST_NAME} lacks backbone/weights/image_size") from exc
    if manifest.get("status", "complete") != "complete":
        logger.warning("labels at %s come from an unfinished pseudo-label run (status %r); "
                       "training on the rows present", labels, manifest.get("status"))
    return manifest, (backbone, weights, image_size)


@dataclass
class _Scan:
    """What the parts' footers and small columns say (see :func:`_scan_parts`)."""

    rows: int = 0
    errors: int = 0
    grids: set = field(default_factory=set)
    has_features: bool = True
    feature_dim: int | None = None
    containers: list = field(default_factory=list)  # a few usable rows inside a container
    has_quality: bool = True
    confidences: list = field(default_factory=list)
    no_objects: list = field(default_factory=list)


def _scan_parts(fs, paths: list[str], feature_dim: int | None) -> _Scan:
    """Rows, error rows, grids, feature and quality columns of the parts at ``paths``."""
    scan = _Scan(feature_dim=feature_dim)
    required = {"key", "source", "grid_h", "grid_w", "mask", "error"}
    for path in paths:
        with fs.open(path, "rb") as f:
            pf = open_part(f, path)
            names = set(pf.schema_arrow.names)
            if required - names:
                raise UserValueError(f"{path}: not a pseudo-label part, missing columns "
                                 f"{sorted(required - names)}")
            scan.has_features &= "features" in names
            kv = pf.metadata.metadata or {}
            if scan.feature_dim is None and b"selfment.feature_dim" in kv:
                scan.feature_dim = int(kv[b"selfment.feature_dim"])
            scan.has_quality &= {"confidence", "no_object"} <= names
            quality = ["confidence", "no_object"] if scan.has_quality else []
            table = pf.read(columns=["grid_h", "grid_w", "error", "source", *quality])
        ok = table.filter(table.column("error").is_null())
        # Rows written without scores (null confidence) make the set unfilterable, as a whole:
        # the driver's counts and the workers' filter must agree row for row.
        if scan.has_quality and ok.column("confidence").null_count:
            scan.has_quality = False
        if scan.has_quality:
            scan.confidences.append(ok.column("confidence").to_numpy(zero_copy_only=False))
            scan.no_objects.append(ok.column("no_object").to_numpy(zero_copy_only=False))
        scan.rows += table.num_rows
        scan.errors += table.num_rows - ok.num_rows
        scan.grids.update(zip(ok.column("grid_h").to_pylist(), ok.column("grid_w").to_pylist()))
        if len(scan.containers) < 3:
            scan.containers += [s for s in ok.column("source").to_pylist()
                                if str(s).lower().endswith(_CONTAINER_SUFFIXES)][:3]
    return scan



def _parquet_parts(fs, root: str) -> list[str]:
    """Parquet files under ``root``, skipping names (and folders) starting with ``_`` or ``.``."""
    found = []
    for path in fs.find(root):
        rel = path[len(root):].lstrip("/")
        if path.endswith(".parquet") and not any(p.startswith(("_", ".")) for p in rel.split("/")):
            found.append(path)
    return sorted(found)


def _feature_dim_from_rows(fs, paths: list[str]) -> int:
    for path in paths:
        with fs.open(path, "rb") as f:
            table = pq.read_table(f, columns=["features", "grid_h", "grid_w", "error"])
        table = table.filter(table.column("error").is_null())
        if table.num_rows:
            row = table.slice(0, 1).to_pylist()[0]
            return len(row["features"]) // (2 * int(row["grid_h"]) * int(row["grid_w"]))
    raise ValueError("no usable row with features")


def _uri(fs, path: str) -> str:
    return path if is_local(fs) else fs.unstrip_protocol(path)


# ---------------------------------------------------------------------------------------------
# Ray Data: the training rows

def load_images(batch: dict[str, np.ndarray], *, image_size: int, storage_options: dict | None,
                max_pixels: int | None) -> dict[str, np.ndarray]:
    """Ray Data UDF: add ``image`` float32 (n, S, S, 3) in [0, 1] read from each row's
    ``source`` file and resized in the official order (:func:`~selfment_dist.model.backbone.resize_square`).

    Rows whose image can no longer be read are dropped with a warning (they were readable when
    they were pseudo-labelled); the other columns pass through.
    """
    from selfment_dist.model.resize import resize_square
    from selfment_dist.io.images import decode_image

    keep, images = [], []
    for i, (key, source) in enumerate(zip(batch["key"], batch["source"])):
        try:
            fs, path = url_to_fs(str(source), storage_options)
            pil = decode_image(fs.cat_file(path), max_pixels=max_pixels)
            images.append(resize_square(pil, image_size))
            keep.append(i)
        except Exception as exc:  # one unreadable image must not stop the epoch
            logger.warning("skipping %s: cannot read its image %s (%s: %s)", key, source,
                           type(exc).__name__, exc)
    out = {k: v[keep] for k, v in batch.items() if k != "source"}
    out["image"] = (np.stack(images) if images
                    else np.zeros((0, image_size, image_size, 3), dtype=np.float32))
    return out


def arrow_fs(uri: str, storage_options: dict | None):
    """(pyarrow filesystem or None for local disk, path) for Ray Data and Ray Train storage."""
    import pyarrow.fs as pafs

    fs, path = url_to_fs(uri, storage_options)
    if is_local(fs):
        return None, os.path.abspath(path)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path.rstrip("/")


def read_label_parts(batch: dict[str, np.ndarray], *, columns: list[str], row_filter: dict,
                     storage_options: dict | None):
    """Ray Data UDF: the training rows (``columns``) of the label parts whose URIs are in
    ``batch["uri"]``, as one ``pyarrow.Table``: error rows and rows the confidence filter
    leaves out are dropped here, as each part is read."""
    import pyarrow as pa

    quality = [] if row_filter["rule"] == "none" else ["confidence", "no_object"]
    tables = []
    for uri in batch["uri"]:
        fs, path = url_to_fs(str(uri), storage_options)
        with fs.open(path, "rb") as f:
            table = pq.read_table(f, columns=[*columns, "error", *quality])
        tables.append(table.filter(_keep_mask(table, row_filter)).select(columns))
    return pa.concat_tables(tables)


def label_row_bytes(ls: LabelSet, stored: bool) -> int:
    """Approximate bytes of one training row as it leaves :func:`read_label_parts`: the packed
    mask, the key and the source URI or the float16 features."""
    h, w = ls.grid
    mask = (h * w + 7) // 8
    return mask + (h * w * 2 * ls.feature_dim if stored else 0) + 2 * 128  # key + source


def shuffled_bytes_per_epoch(ls: LabelSet, *, stored: bool, shuffle: str = "full") -> int:
    """Bytes the ``full`` shuffle moves across the cluster each epoch (0 for ``local``): the
    label rows only, never images (with ``features: backbone`` they are shuffled before any
    image is read)."""
    return ls.usable * label_row_bytes(ls, stored) if shuffle == "full" else 0


def build_dataset(ls: LabelSet, *, stored: bool, storage_options: dict | None,
                  max_pixels: int | None, shuffle: str = "full", seed: int = 0):
    """The training rows: label rows read from the parts, shuffled (``full``), then, with
    ``features: backbone``, their images read, decoded and resized.

    The shuffle runs on the small label rows *before* images are loaded: shuffling loaded rows
    would move every float32 image across the cluster each epoch (10k labels at 768 px: ~71 GB),
    shuffling label rows moves ~300 bytes a row. Images are then decoded every epoch by CPU
    tasks; the label rows (small) are cached in the object store once.
    """
    import ray

    # One read task per part. Not ray.data.read_parquet: its footer indexing starts a pool of
    # 32 actors (RAY_DATA_PARQUET_FOOTER_NUM_ACTORS) at every run, a Python process each, to
    # learn what inspect_labels has already read from the same footers in the driver.
    columns = ["key", "grid_h", "grid_w", "mask", "features" if stored else "source"]
    ds = ray.data.from_items([{"uri": uri} for uri in ls.files],
                             override_num_blocks=len(ls.files))
    ds = ds.map_batches(read_label_parts, batch_size=None, batch_format="numpy",
                        fn_kwargs={"columns": columns, "row_filter": ls.row_filter,
                                   "storage_options": storage_options})
    row_bytes = label_row_bytes(ls, stored)
    if ls.usable * row_bytes <= _MATERIALIZE_MAX_BYTES:
        logger.info("caching the %d training label rows (~%.1f MiB) in the object store",
                    ls.usable, ls.usable * row_bytes / 2**20)
        ds = ds.materialize()
    if shuffle == "full":
        # Official schedule: every epoch sees the whole training set in a new order. Ray Data
        # runs the shuffle again at each epoch's execution; reseeding keeps runs reproducible
        # while the order changes from epoch to epoch.
        from ray.data import RandomSeedConfig

        ds = ds.random_shuffle(seed=RandomSeedConfig(seed=seed, reseed_after_execution=True))
    if not stored:
        ds = ds.map_batches(load_images, batch_size=16, batch_format="numpy",
                            fn_kwargs={"image_size": ls.image_size,
                                       "storage_options": storage_options,
                                       "max_pixels": max_pixels})
    return ds
