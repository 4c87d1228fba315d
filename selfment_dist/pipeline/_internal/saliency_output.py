"""What ``selfment segment`` writes: 8-bit maps at the original size, as PNG files or parquet.

png: ``<output>/<key>.png`` (and ``_overlays/<key>.jpg``), written by :class:`PngSink` from the
write tasks (maps appear complete: a hidden temporary file renamed on local disk, one PUT on
object stores); failed keys come back to the driver. parquet: rows of :data:`SEGMENT_SCHEMA`
(:func:`render_table`) in the shared parts (:class:`TableSink`), failures as rows with
``error`` set.
"""
from __future__ import annotations

import posixpath
import uuid
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
from ray.data import Datasink

from selfment_dist.io.images import decode_image
from selfment_dist.io.storage import is_local, url_to_fs
from selfment_dist.model.maps import to_png_bytes, to_uint8, upsample
from selfment_dist.pipeline._internal.parts import PartsSink

__all__ = ["SEGMENT_SCHEMA", "OVERLAY_DIR", "render_map", "overlay_jpeg", "PngSink", "TableSink",
           "render_table", "existing_maps", "failed_rows"]

OVERLAY_DIR = "_overlays"
#: Tint of the foreground in overlays (RGB) and its opacity where the saliency is 1.
OVERLAY_COLOUR = (255, 40, 40)
OVERLAY_ALPHA = 0.55

#: Rows of the parquet output: one per input image, failures included.
SEGMENT_SCHEMA = pa.schema(
    [pa.field("key", pa.string(), nullable=False),
     pa.field("source", pa.string(), nullable=False),
     pa.field("width", pa.int32()),       # original size, after EXIF orientation
     pa.field("height", pa.int32()),
     pa.field("png", pa.binary()),        # 8-bit greyscale PNG of the map, width x height
     pa.field("error", pa.string())],     # null when fine
    metadata={b"selfment.contract": b"saliency-maps/1",
              b"selfment.png": b"8-bit L, round(255 * saliency), original size"})


def render_map(saliency: np.ndarray, width: int, height: int, quantize: str = "floor"
               ) -> np.ndarray:
    """Patch saliency float (h, w) → uint8 (height, width) map, ``round(255 * s)``."""
    return to_uint8(upsample(saliency, (height, width)), quantize)


def overlay_jpeg(data: bytes, level: np.ndarray, *, max_pixels: int | None,
                 exif_orientation: bool = True) -> bytes:
    """The original image with the foreground tinted: JPEG bytes at the map's size.

    Args:
        data: the encoded original (decoded again, EXIF orientation applied).
        level: uint8 (H, W) map; opacity ``OVERLAY_ALPHA * level / 255`` of ``OVERLAY_COLOUR``.
    """
    import io

    from PIL import Image

    image = decode_image(data, max_pixels=max_pixels, exif_orientation=exif_orientation)
    if image.size != (level.shape[1], level.shape[0]):
        raise ValueError(f"image is {image.size[0]}x{image.size[1]}, map is "
                         f"{level.shape[1]}x{level.shape[0]}")
    alpha = Image.fromarray(np.rint(level * OVERLAY_ALPHA).astype(np.uint8), mode="L")
    tinted = Image.composite(Image.new("RGB", image.size, OVERLAY_COLOUR), image, alpha)
    buf = io.BytesIO()
    tinted.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _check_key(key: str) -> None:
    """Keys become paths under the output: refuse ones that would leave it."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"key {key!r} cannot be a file name under the output")


def _nonempty(blocks: Iterable) -> Iterator[dict[str, np.ndarray]]:
    """The blocks that hold rows, as numpy batches. When every key of a container is already
    done, an empty block without columns reaches the write stage."""
    from ray.data.block import BlockAccessor
    for block in blocks:
        acc = BlockAccessor.for_block(block)
        if acc.num_rows():
            yield acc.to_batch_format("numpy")


class PngSink(Datasink):
    """Writes ``<output>/<key>.png`` (and overlays) from the write tasks; returns only counts
    and the failed keys."""

    def __init__(self, output: str, *, overlays: bool, max_pixels: int | None,
                 storage_options: dict | None, quantize: str = "floor",
                 exif_orientation: bool = True):
        self.quantize, self.exif_orientation = quantize, exif_orientation
        self.output = output
        self.overlays = overlays
        self.max_pixels = max_pixels
        self.storage_options = storage_options
        self.results: list[dict] = []

    def get_name(self) -> str:
        return "WriteSaliencyMaps"

    def _put(self, fs, path: str, data: bytes) -> None:
        if not is_local(fs):
            fs.pipe_file(path, data)  # one PUT: the object appears complete or not at all
            return
        folder, name = posixpath.split(path)
        fs.makedirs(folder, exist_ok=True)
        tmp = f"{folder}/.{name}.tmp-{uuid.uuid4().hex[:8]}"
        fs.pipe_file(tmp, data)
        fs.mv(tmp, path)

    def write(self, blocks: Iterable, ctx) -> dict:
        fs, root = url_to_fs(self.output, self.storage_options)
        root = root.rstrip("/")
        images = 0
        failed: list[dict] = []
        for batch in _nonempty(blocks):
            for i in range(len(batch["key"])):
                key, source = str(batch["key"][i]), str(batch["source"][i])
                error = str(batch["error"][i])
                if not error:
                    try:
                        _check_key(key)
                        level = render_map(batch["saliency"][i], int(batch["width"][i]),
                                           int(batch["height"][i]), self.quantize)
                        if self.overlays:  # first: the PNG marks the key done
                            self._put(fs, f"{root}/{OVERLAY_DIR}/{key}.jpg",
                                      overlay_jpeg(batch["data"][i], level,
                                                   max_pixels=self.max_pixels,
                                                   exif_orientation=self.exif_orientation))
                        self._put(fs, f"{root}/{key}.png", to_png_bytes(level))
                        images += 1
                        continue
                    except Exception as exc:
                        error = f"cannot write map: {type(exc).__name__}: {exc}"[:500]
                failed.append({"key": key, "source": source, "error": error})
        return {"images": images, "failed": failed}

    def on_write_complete(self, write_result) -> None:
        self.results = [r for r in write_result.write_returns if r]


class TableSink(PartsSink):
    """The shared parquet parts writer (atomic parts, empty blocks skipped),
    under its own name in Ray Data's progress."""

    def get_name(self) -> str:
        return "WriteSaliencyTable"


def render_table(batch: dict[str, np.ndarray], quantize: str = "floor") -> pa.Table:
    """Parquet output: the actor's batch → rows of :data:`SEGMENT_SCHEMA` (Ray Data UDF)."""
    cols: dict[str, list] = {name: [] for name in SEGMENT_SCHEMA.names}
    for i in range(len(batch["key"])):
        width, height = int(batch["width"][i]), int(batch["height"][i])
        error = str(batch["error"][i]) or None
        png = None
        if error is None:
            try:
                png = to_png_bytes(render_map(batch["saliency"][i], width, height, quantize))
            except Exception as exc:
                error = f"cannot render map: {type(exc).__name__}: {exc}"[:500]
        cols["key"].append(str(batch["key"][i]))
        cols["source"].append(str(batch["source"][i]))
        cols["width"].append(width if width >= 0 else None)
        cols["height"].append(height if height >= 0 else None)
        cols["png"].append(png)
        cols["error"].append(error)
    return pa.Table.from_pydict(cols, schema=SEGMENT_SCHEMA)


def existing_maps(fs, root: str) -> set[str]:
    """Keys of the maps already at ``root`` (``<key>.png``, overlays and hidden files aside);
    removes temporary files a killed run left behind."""
    root = root.rstrip("/")
    fs.invalidate_cache(root)  # s3fs caches listings
    try:
        paths = fs.find(root)
    except FileNotFoundError:
        return set()
    done: set[str] = set()
    for path in paths:
        if not path.startswith(root + "/"):
            continue
        rel = path[len(root) + 1:]
        base = posixpath.basename(rel)
        if base.startswith(".") and ".tmp-" in base:
            fs.rm(path)
            continue
        if rel.startswith(f"{OVERLAY_DIR}/") or not rel.endswith(".png") or base.startswith("."):
            continue
        done.add(rel[:-len(".png")])
    return done


def failed_rows(fs, root: str, run_id: str) -> list[dict]:
    """The error rows of this run's parquet parts (``key``/``source``/``error`` columns only)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    failed: list[dict] = []
    for path in sorted(fs.glob(f"{root}/part-{run_id}-*.parquet")):
        with fs.open(path, "rb") as f:
            table = pq.read_table(f, columns=["key", "source", "error"])
        failed.extend(table.filter(pc.is_valid(table.column("error"))).to_pylist())
    return failed
