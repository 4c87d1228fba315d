"""``selfment inspect``: look at pseudo-labels — contact sheets, a confidence histogram, a page.

    run_inspect("s3://bucket/labels", "inspect/")

Writes to ``output`` (local or fsspec URL)::

    lowest.png, middle.png, highest.png   contact sheets: image + mask overlay of the lowest-,
                                          middle- and highest-confidence images
    confidence.png                        histogram of confidence, with the no-object threshold
    index.html                            all of it on one page, with the counts
    inspect.json                          what :func:`run_inspect` returns

Originals are re-read through each row's ``source`` (any fsspec URL; images inside parquet or
tar containers are found by key). Labels with an ``objects`` column (``--max-objects``) show
each object in its own colour instead of the single mask. Error rows are counted, never shown. Runs in the driver: it
reads the small columns of every row and the images of the few rows it shows.
"""
from __future__ import annotations

import html
import json
import logging

import numpy as np
import pyarrow as pa

from selfment_dist.evaluation.contact_sheet import Tile, confidence_histogram, contact_sheet
from selfment_dist.io.schema import open_part
from selfment_dist.io.images import DEFAULT_MAX_PIXELS, decode_image
from selfment_dist.io.masks import decode_mask
from selfment_dist.io.objects import decode_objects
from selfment_dist.io.sources import IMAGE, enumerate_units, iter_records
from selfment_dist.io.output_access import prepare_output
from selfment_dist.io.storage import join, url_to_fs
from selfment_dist.pipeline._internal.parts import MANIFEST_NAME, read_manifest
from selfment_dist.errors import UserInputNotFoundError, UserValueError

logger = logging.getLogger(__name__)

__all__ = ["run_inspect", "SHEETS"]

SHEETS = ("lowest", "middle", "highest")
_COLUMNS = ["key", "source", "grid_h", "grid_w", "mask", "fg_fraction", "confidence",
            "no_object", "error"]
_OBJECTS = ["objects"]  # optional (--max-objects): drawn one colour per object when present


def run_inspect(labels: str, output: str, *, per_sheet: int = 24, thumb_size: int = 128,
                storage_options: dict | None = None,
                max_pixels: int | None = DEFAULT_MAX_PIXELS, address: str | None = None,
                create_bucket: bool = False) -> dict:
    """Contact sheets, histogram and HTML page of the pseudo-labels at ``labels``.

    Args:
        labels: folder (local or fsspec URL) written by ``selfment pseudo-label``.
        output: folder (local or fsspec URL) for the pictures and ``index.html``.
        per_sheet: images per contact sheet.
        thumb_size: pixels per tile side.
        storage_options: fsspec options for every URL (labels, originals, output).
        max_pixels: decompression-bomb limit when re-reading originals.
        address: accepted for the CLI's common options and ignored: inspect needs no Ray.
        create_bucket: create the output's bucket when it does not exist (else refuse it).
    Returns:
        ``rows``, ``errors``, ``no_object``, ``confidence`` (min/median/max), ``files`` (name →
        URI), ``unreadable`` (shown images whose original could not be read).
    Raises:
        FileNotFoundError / ValueError: no pseudo-labels at ``labels``, or labels without the
            ``confidence`` column (made before it existed).
    """
    if per_sheet < 1 or thumb_size < 16:
        raise UserValueError("per_sheet must be >= 1 and thumb_size >= 16")
    table, manifest = _read_labels(labels, storage_options)
    out_fs, out_root = url_to_fs(output, storage_options)
    prepare_output(out_fs, out_root, output, create_bucket=create_bucket)  # before the reading
    ok = table.filter(table.column("error").is_null())
    errors = table.num_rows - ok.num_rows
    conf = ok.column("confidence").to_numpy(zero_copy_only=False).astype(np.float32)
    order = np.argsort(conf, kind="stable")
    threshold = (manifest.get("config") or {}).get("no_object_threshold")
    picks = _picks(len(order), per_sheet)
    chosen = {name: order[idx] for name, idx in picks.items()}
    wanted = {ok.column("key")[int(i)].as_py(): ok.column("source")[int(i)].as_py()
              for idx in chosen.values() for i in idx}
    originals = _read_originals(wanted, storage_options, max_pixels)

    files: dict[str, str] = {}

    def put(name: str, data: bytes) -> None:
        with out_fs.open(f"{out_root.rstrip('/')}/{name}", "wb") as f:
            f.write(data)
        files[name] = join(output, name)

    rows = ok.select(["key", "grid_h", "grid_w", "mask", "confidence", "no_object",
                      "fg_fraction"] + [c for c in _OBJECTS if c in ok.column_names]).to_pylist()
    for name, idx in chosen.items():
        tiles = [_tile(rows[int(i)], originals) for i in idx]
        lo, hi = (conf[idx].min(), conf[idx].max()) if len(idx) else (np.nan, np.nan)
        title = (f"{name} confidence: {len(idx)} of {len(conf)} images, "
                 f"confidence {lo:.2f}-{hi:.2f}  (red caption: flagged no_object)")
        put(f"{name}.png", contact_sheet(tiles, title=title, size=thumb_size))
    put("confidence.png", confidence_histogram(
        conf, threshold=threshold, title=f"confidence of {len(conf)} pseudo-masks"))
    n_no_object = int(np.asarray(ok.column("no_object").to_numpy(zero_copy_only=False),
                                 dtype=bool).sum())
    summary = {
        "labels": labels, "output": output, "rows": table.num_rows, "errors": errors,
        "no_object": n_no_object, "no_object_threshold": threshold,
        "confidence": ({"min": float(conf.min()), "median": float(np.median(conf)),
                        "max": float(conf.max())} if len(conf) else None),
        "unreadable": sorted(k for k in wanted if originals.get(k) is None),
    }
    put("index.html", _page(summary, files).encode("utf-8"))
    files["inspect.json"] = join(output, "inspect.json")
    summary["files"] = dict(files)
    put("inspect.json", json.dumps(summary, indent=2).encode("utf-8"))
    logger.info("inspect: %d rows (%d errors, %d no_object) of %s -> %s", summary["rows"],
                errors, n_no_object, labels, files["index.html"])
    return summary


def _read_labels(labels: str, storage_options: dict | None) -> tuple[pa.Table, dict]:
    fs, root = url_to_fs(labels, storage_options)
    root = root.rstrip("/")
    if not fs.exists(root):
        raise UserInputNotFoundError(f"no pseudo-labels at {labels}")
    parts = sorted(p for p in fs.find(root) if p.endswith(".parquet") and not any(
        s.startswith(("_", ".")) for s in p[len(root):].strip("/").split("/")))
    if not parts:
        raise UserValueError(f"no pseudo-label parquet files in {labels}")
    tables = []
    for path in parts:
        with fs.open(path, "rb") as f:
            pf = open_part(f, path)
            missing = set(_COLUMNS) - set(pf.schema_arrow.names)
            if missing:
                raise UserValueError(f"{path} lacks the columns {sorted(missing)}: inspect needs "
                                 "pseudo-labels with confidence (pseudo-label them again)")
            tables.append(pf.read(columns=_COLUMNS + [
                c for c in _OBJECTS if c in pf.schema_arrow.names]))
    # Parts with and without objects (runs with other settings): the missing cells are null.
    return (pa.concat_tables(tables, promote_options="default"),
            read_manifest(fs, root, MANIFEST_NAME) or {})


def _picks(n: int, k: int) -> dict[str, np.ndarray]:
    """Positions (in ascending confidence order) of the lowest, middle and highest ``k``."""
    k = min(k, n)
    mid = max(0, min(n - k, (n - k) // 2))
    return {"lowest": np.arange(k), "middle": np.arange(mid, mid + k),
            "highest": np.arange(n - k, n)[::-1]}


class _AllBut:
    """A ``skip`` set holding every key but ``wanted`` (containers: read only what is shown)."""

    def __init__(self, wanted):
        self.wanted = set(wanted)

    def __contains__(self, key) -> bool:
        return key not in self.wanted


def _read_originals(wanted: dict[str, str], storage_options: dict | None,
                    max_pixels: int | None) -> dict[str, np.ndarray | None]:
    """key → uint8 (H, W, 3) original (None when it cannot be read any more)."""
    images: dict[str, np.ndarray | None] = dict.fromkeys(wanted)
    by_source: dict[str, list[str]] = {}
    for key, source in wanted.items():
        by_source.setdefault(source, []).append(key)
    for source, keys in by_source.items():
        try:
            units = enumerate_units([source], storage_options, quiet=True)  # one per image
        except Exception as exc:  # gone since it was labelled: shown as unreadable
            logger.warning("cannot list %s: %s", source, exc)
            continue
        for unit in units:
            if unit["kind"] == IMAGE:
                unit = {**unit, "key": keys[0]}  # a file holds one image: its row's key
            for rec in iter_records(unit, storage_options=storage_options,
                                    skip=_AllBut(keys)):
                if rec["error"] is None:
                    try:
                        images[rec["key"]] = np.asarray(
                            decode_image(rec["data"], max_pixels=max_pixels).convert("RGB"))
                    except Exception as exc:
                        logger.warning("cannot decode %s: %s", rec["key"], exc)
    return images


def _tile(row: dict, originals: dict) -> Tile:
    mask = decode_mask(row["mask"], row["grid_h"], row["grid_w"])
    image = originals.get(row["key"])
    caption = f"{row['key']}\nconf {row['confidence']:.2f}  fg {row['fg_fraction']:.2f}"
    objects = None
    if row.get("objects") is not None:  # the objects' masks instead of the single mask
        objects = decode_objects(row["objects"], row["grid_h"], row["grid_w"])[0]
        caption += f"  obj {len(objects)}"
    return Tile(image=image, mask=mask if image is not None else None, caption=caption,
                flag=bool(row["no_object"]), objects=objects)


def _page(summary: dict, files: dict) -> str:
    esc = html.escape
    conf = summary["confidence"] or {}
    stats = (f"{summary['rows']} rows: {summary['errors']} errors (not shown), "
             f"{summary['no_object']} flagged no_object (confidence below "
             f"{summary['no_object_threshold']}); confidence min {conf.get('min', 0):.3f}, "
             f"median {conf.get('median', 0):.3f}, max {conf.get('max', 0):.3f}")
    parts = ["<!doctype html><meta charset='utf-8'><title>selfment inspect</title>",
             "<style>body{font-family:sans-serif;margin:1.5em}img{max-width:100%}</style>",
             f"<h1>Pseudo-labels of {esc(summary['labels'])}</h1>", f"<p>{esc(stats)}</p>",
             "<h2>Confidence</h2><img src='confidence.png' alt='confidence histogram'>"]
    for name in SHEETS:
        parts.append(f"<h2>{name.capitalize()} confidence</h2>"
                     f"<img src='{name}.png' alt='{name}-confidence contact sheet'>")
    if summary["unreadable"]:
        parts.append("<p>Originals not readable any more: "
                     + esc(", ".join(summary["unreadable"])) + "</p>")
    return "\n".join(parts) + "\n"
