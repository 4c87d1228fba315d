"""Read + decode + resize: the stateless CPU stage in front of every model stage.

Work units (a file, or a container: parquet, tar) expand into records (:mod:`selfment_dist.io.sources`),
each decoded with EXIF orientation and resized to the model's square input in the official order
(:func:`selfment_dist.model.resize.resize_square`). One image's failure stays with that image.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from selfment_dist.io.images import DEFAULT_MAX_BYTES, ImageDecodeError, decode_image
from selfment_dist.io.pixels import decoded_pixels, ragged_column
from selfment_dist.io.schema import PERMANENT
from selfment_dist.io.prefetch import iter_unit_records
from selfment_dist.io.tar_source import take_skipped_members
from selfment_dist.pipeline._internal.done_keys import skip_set as _skip_set

__all__ = ["read_and_decode", "record_inputs_skipped", "TAR_MEMBERS_SKIPPED"]

#: The run counter of tar members skipped by name (``inputs_skipped["tar_members"]``).
TAR_MEMBERS_SKIPPED = "tar_members_skipped"


def record_inputs_skipped(summary: dict, listed: dict) -> None:
    """A model stage's ``summary["inputs_skipped"]`` (docs/inputs.md): the files skipped on
    purpose while listing (``listed``, ``Units.skipped``) and the tar members skipped by name
    while decoding (the run counter :data:`TAR_MEMBERS_SKIPPED`, moved out of ``summary``)."""
    summary["inputs_skipped"] = {**listed, "tar_members": summary.pop(TAR_MEMBERS_SKIPPED, 0)}


def _decode_batch(rows: list[dict], image_size: int, keep_data: bool,
                  device_resize: bool = False) -> dict[str, np.ndarray]:
    if device_resize:  # uint8 at the decoded size, one array a row (light_transport)
        images = ragged_column([row["pixels"] for row in rows])
    else:  # float32 in [0, 1], resized in the official order (see resize.resize_square)
        images = np.zeros((len(rows), image_size, image_size, 3), dtype=np.float32)
        for i, row in enumerate(rows):
            if row["pixels"] is not None:
                images[i] = row["pixels"]
    batch = {
        "key": np.array([r["key"] for r in rows], dtype=object),
        "source": np.array([r["source"] for r in rows], dtype=object),
        "width": np.array([r["width"] for r in rows], dtype=np.int32),
        "height": np.array([r["height"] for r in rows], dtype=np.int32),
        "error": np.array([r["error"] or "" for r in rows], dtype=object),
        "error_kind": np.array([r["error_kind"] or "" for r in rows], dtype=object),
        "image": images,
    }
    if keep_data:  # the encoded original, for overlays
        batch["data"] = np.array([r["data"] or b"" for r in rows], dtype=object)
    return batch


def read_and_decode(units: dict[str, np.ndarray], *, image_size: int, max_pixels: int | None,
                    storage_options: dict | None, skip_ref: list | None, rows_per_batch: int,
                    keep_data: bool = False, max_bytes: int | None = DEFAULT_MAX_BYTES,
                    exif_orientation: bool = True, device_resize: bool = False,
                    counters=None) -> Iterator[dict[str, np.ndarray]]:
    """Expand a batch of work units into decoded, resized images (Ray Data UDF).

    ``exif_orientation=False`` decodes images as stored (benchmark evaluation: the official
    inference's frame); web images keep their EXIF orientation.

    ``keep_data`` also carries the encoded file (segment's overlays need it). ``counters``: the
    run's counters actor, told how many tar members were skipped by name (``._*``).
    ``device_resize``: ship uint8 (H, W, 3) at the decoded size instead (an object column; the
    model actor resizes on its device, see ``_internal/light_transport.py``).

    Yields:
        batches of at most ``rows_per_batch`` rows: ``key``, ``source``, ``width``/``height``
        (int32 original size after EXIF orientation; -1 when unknown), ``error`` and
        ``error_kind`` (``""`` when fine), ``image`` float32 (n, S, S, 3) in [0, 1] (zeros on
        error rows) and, with ``keep_data``,
        ``data`` (the encoded file, ``b""`` on error rows).
    """
    if not device_resize:  # torch: 1.6 s of CPU per worker process, only for this resize
        from selfment_dist.model.resize import resize_square

    skip = _skip_set(skip_ref)
    take_skipped_members()  # this task's count only
    pending: list[dict] = []
    # Loose files of this task are fetched concurrently (io.prefetch), in order.
    task_units = ({"kind": str(kind), "uri": str(uri), "key": str(key)}
                  for kind, uri, key in zip(units["kind"], units["uri"], units["key"]))
    for rec in iter_unit_records(task_units, storage_options=storage_options, skip=skip,
                                 max_bytes=max_bytes):
        row = {"key": rec["key"], "source": rec["source"], "width": -1, "height": -1,
               "error": rec["error"], "error_kind": rec["error_kind"], "pixels": None,
               "data": None}
        if rec["error"] is None:
            try:
                pil = decode_image(rec["data"], max_pixels=max_pixels, max_bytes=max_bytes,
                                   exif_orientation=exif_orientation)
                row["width"], row["height"] = pil.size
                row["pixels"] = (decoded_pixels(pil) if device_resize
                                 else resize_square(pil, image_size))
                row["data"] = rec["data"] if keep_data else None
            except ImageDecodeError as exc:
                row["error"], row["error_kind"] = str(exc), PERMANENT
            except Exception as exc:  # anything else about one image stays with that image
                row["error"] = f"cannot decode image: {type(exc).__name__}: {exc}"
                row["error_kind"] = PERMANENT
            if row["error"] is not None:
                rec["data"] = None
        pending.append(row)
        if len(pending) >= rows_per_batch:
            yield _decode_batch(pending, image_size, keep_data, device_resize)
            pending = []
    if pending:
        yield _decode_batch(pending, image_size, keep_data, device_resize)
    skipped = take_skipped_members()
    if skipped and counters is not None:
        counters.add.remote(TAR_MEMBERS_SKIPPED, skipped)
