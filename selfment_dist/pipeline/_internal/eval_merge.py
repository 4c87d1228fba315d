"""Merging evaluation records as they arrive, so the driver never holds them all.

A record (:func:`selfment_dist.evaluation.metrics.image_record`) is ~12 KB, mostly curves; holding every one
until the end made ``evaluate`` grow by that much per image in the driver (12 GB for a million
images). :class:`RecordStream` keeps, per image, only what the dataset scores average with a
one-dimensional mean (8 float64) and the per-image CSV row (14 values and the key), about
200 bytes; the curves are summed as they come.

The scores stay bit for bit those of :func:`~selfment_dist.evaluation.metrics.merge_records` and
:func:`~selfment_dist.evaluation.metrics.merge_curves` over the same records in the same order, provided the
records are added in that order: ``numpy.mean(x, axis=0)`` of a stacked (images, thresholds)
array adds the rows one after another and divides once, which is what the running sums do; the
1-D means (``numpy.mean`` sums those pairwise) are taken over the kept per-image values.
"""
from __future__ import annotations

from array import array
from typing import Iterator

import numpy as np

from selfment_dist.evaluation.metrics import (PER_IMAGE_KEYS, SCORE_KEYS, record_summary,
                                              tokencut_fcurve, usod_fcurves)

__all__ = ["RecordStream"]

# Per-image values averaged with a 1-D mean (merge_records), in this order.
_SCALARS = ("iou", "accuracy", "fm_adp", "wfm", "sm", "em_adp", "mae", "fmax")
# Curves averaged over images: summed here, divided once at the end.
_CURVES = ("fm_curve", "em_curve", "fm_p", "fm_r", "usod_p", "usod_r", "usod_f", "tokencut_f")
_CSV_FLOATS = tuple(k for k in PER_IMAGE_KEYS if k != "resized")


class RecordStream:
    """Running merge of per-image records, added in key order."""

    def __init__(self) -> None:
        self.n = 0
        self._scalars = {k: array("d") for k in _SCALARS}
        self._sums: dict[str, np.ndarray] = {}
        self._keys: list[str] = []
        self._rows = array("d")      # the per-image CSV floats, row after row
        self._resized = bytearray()

    def add(self, key: str, record: dict) -> None:
        p, r, f = usod_fcurves(record["usod_tp"], record["usod_pp"], record["usod_gp"])
        values = {"fm_curve": record["fm_curve"], "em_curve": record["em_curve"],
                  "fm_p": record["fm_p"], "fm_r": record["fm_r"],
                  "usod_p": p, "usod_r": r, "usod_f": f,
                  "tokencut_f": tokencut_fcurve(record["usod_tp"], record["usod_pp"],
                                                 record["usod_gp"])}
        for name in _CURVES:
            row = np.asarray(values[name], dtype=np.float64)
            if name in self._sums:
                self._sums[name] += row
            else:
                self._sums[name] = row.copy()
        for name in _SCALARS:
            self._scalars[name].append(float(f.max() if name == "fmax" else record[name]))
        summary = record_summary(record)
        self._keys.append(key)
        self._rows.extend(float(summary[k]) for k in _CSV_FLOATS)
        self._resized.append(bool(summary["resized"]))
        self.n += 1

    def _mean(self, name: str) -> np.ndarray:
        return np.true_divide(self._sums[name], self.n)

    def scores(self) -> dict[str, float]:
        """As :func:`~selfment_dist.evaluation.metrics.merge_records`."""
        if not self.n:
            raise ValueError("no records to merge (no images were evaluated)")
        one = {k: np.mean(np.frombuffer(v, dtype=np.float64)) for k, v in self._scalars.items()}
        fm_curve, em_curve = self._mean("fm_curve"), self._mean("em_curve")
        scores = {"iou": one["iou"], "accuracy": one["accuracy"], "fmax": one["fmax"],
                  "fmax_curve": self._mean("usod_f").max(),
                  "fmax_tokencut": self._mean("tokencut_f").max(), "max_fm": fm_curve.max(),
                  "mean_fm": fm_curve.mean(), "adp_fm": one["fm_adp"], "wfm": one["wfm"],
                  "sm": one["sm"], "max_em": em_curve.max(), "mean_em": em_curve.mean(),
                  "adp_em": one["em_adp"], "mae": one["mae"]}
        return {k: float(scores[k]) for k in SCORE_KEYS}

    def curves(self) -> dict[str, dict[str, np.ndarray]]:
        """As :func:`~selfment_dist.evaluation.metrics.merge_curves`."""
        if not self.n:
            raise ValueError("no records to merge (no images were evaluated)")
        flip = slice(None, None, -1)  # pysodmetrics' index i is the threshold (255 - i) / 255
        return {
            "usod": {"threshold": np.arange(len(self._sums["usod_f"]), dtype=np.float64) / 255,
                     "precision": self._mean("usod_p"), "recall": self._mean("usod_r"),
                     "fmeasure": self._mean("usod_f")},
            "sod": {"threshold": np.arange(256, dtype=np.float64) / 255,
                    "precision": self._mean("fm_p")[flip], "recall": self._mean("fm_r")[flip],
                    "fmeasure": self._mean("fm_curve")[flip],
                    "emeasure": self._mean("em_curve")[flip]},
        }

    def per_image(self) -> "PerImageRows":
        """The per-image CSV rows, ``(key, {PER_IMAGE_KEYS: value})``, built as they are read."""
        return PerImageRows(self)


class PerImageRows:
    """A read-only sequence of ``(key, row)`` over a :class:`RecordStream`'s compact rows."""

    def __init__(self, stream: RecordStream):
        self._s = stream

    def __len__(self) -> int:
        return self._s.n

    def __getitem__(self, i: int) -> tuple[str, dict]:
        if not -self._s.n <= i < self._s.n:
            raise IndexError(i)
        i %= self._s.n
        width = len(_CSV_FLOATS)
        values = self._s._rows[i * width:(i + 1) * width]
        row: dict = dict(zip(_CSV_FLOATS, values))
        row["resized"] = bool(self._s._resized[i])
        return self._s._keys[i], row

    def __iter__(self) -> Iterator[tuple[str, dict]]:
        return (self[i] for i in range(len(self)))

    def __eq__(self, other) -> bool:
        return list(self) == list(other)
