"""Saliency metrics as per-image records that merge exactly across shards.

Every protocol is computed from the same pair (prediction, ground truth), each an 8-bit grayscale
``uint8 (H, W)`` array as read from PNG (PIL ``convert("L")``), in the official Selfment runner's
frame (geshang777/Selfment ``eval/runner.py``): when the sizes differ the **mask** is resized to
the prediction's size (PIL bilinear on the 8-bit mask, values kept, binarised later by each
metric) and the record says so (``record["resized"]``). ``resize="prediction"`` is the other
convention (the prediction resized to the mask, as many SOD toolboxes do); it is not the paper's.

**Unsupervised-SOD protocol, the official Selfment ``compute_simple_metrics``**
(``eval/metrics.py``; keys ``iou``, ``accuracy``, ``fmax``). Per image, with ``v`` the prediction's 8-bit values,
``p = v / 255`` and the binary ground truth ``g = gt / 255 > 0.5`` (``gt >= 128``):

- ``iou = |B ∩ g| / |B ∪ g|`` and ``accuracy = mean(B == g)`` with ``B = p > 0.5`` (i.e.
  ``v >= 128``). An empty ``B`` against an empty ``g`` (empty union) is defined as IoU 1.0.
- For the 255 thresholds ``t_k = k / 255``, ``k = 0..254`` (float32 ``arange(0, 1, 1/255)``), the
  binary prediction is ``p > t_k``, taken exactly as ``v > k`` (what the float32 torch code
  computes; a float64 ``numpy.arange`` flips 24 of the ``v == k`` ties). With
  ``TP_k = |(p > t_k) ∩ g|``, ``PP_k = |p > t_k|``, ``GP = |g|`` and ``eps = 1e-7``::

      P_k = TP_k / (PP_k + eps)        R_k = TP_k / (GP + eps)
      F_k = (1 + β²) P_k R_k / (β² P_k + R_k + eps)        β² = 0.3² = 0.09

  the official ``FMeasureTorch(beta_square=0.3)``, which squares its parameter again (β² = 0.09,
  not 0.3; SelfMask/FOUND share the quirk). ``fmax`` is each image's own maximum over ``k``,
  averaged over images. The record keeps the integer counts ``TP_k, PP_k, GP``.
- ``fmax_curve``: the maximum over ``k`` of the image-averaged β² = 0.09 F curve (always <= the
  official one); not the paper's figure.

**TokenCut's protocol** (YangtaoWANG95/TokenCut ``unsupervised_saliency_detection/metric.py``;
key ``fmax_tokencut``): the same thresholds and counts, but β² = 0.3 (not squared again),
``P_k = 1`` when ``PP_k = 0``, ``R_k = 1`` when ``GP = 0``, ``F_k = 1.3 P R / (0.3 P + R)`` with
NaN → 0, and the maximum over ``k`` of the image-averaged curve (curve first, then max). Put it
beside TokenCut's tables, never beside the paper's ``fmax``. (TokenCut computes in float32: the
same values to ~1e-7.)

**SOD/COD protocol, the official ``compute_biref_metrics``** (keys ``max_fm mean_fm adp_fm wfm sm
max_em mean_em adp_em mae``): the official classes are pysodmetrics' (``Fmeasure`` β² = 0.3,
``WeightedFmeasure``, ``Smeasure``, ``Emeasure``, ``MAE``) with its normalisation (``gt > 128``,
prediction min-max scaled), fed float32 arrays as the official runner does (``pred / 255 * 255``
in float32, exact for 8-bit values; the min-max scaling then runs in float32, which moves a few
pixels across a 1/255 bin against a float64 pass). A record holds exactly what each class appends
to its lists in ``step`` for that image (Fmeasure: adaptive F, 256-threshold precision, recall
and F curves; Emeasure: adaptive E and its 256 curve; WeightedFmeasure, Smeasure, MAE: one
value), and :func:`merge_records` finishes them with the same ``numpy.mean`` calls as
``get_results()``. Merging records in a fixed order therefore reproduces a single pass over the
images in that order bit for bit, however the images were sharded; in any other order, to
rounding (~1e-15).

Records are small dicts of numpy scalars and arrays (~12 KB per image), picklable, so Ray tasks can
compute them anywhere and the driver merges them.
"""
from __future__ import annotations

import inspect
import warnings
from typing import Iterable, Sequence

import numpy as np
import py_sod_metrics as psm
from PIL import Image

__all__ = [
    "SCORE_KEYS",
    "PER_IMAGE_KEYS",
    "USOD_BETA_SQ",
    "USOD_EPS",
    "image_record",
    "merge_records",
    "merge_curves",
    "record_summary",
    "resize_to",
    "sod_scores",
    "RESIZE_MODES",
]

#: Which array is resized when a prediction and its mask differ in size: ``"mask"`` (to the
#: prediction's size, the official runner) or ``"prediction"`` (to the mask's size).
RESIZE_MODES = ("mask", "prediction")

#: The keys of :func:`sod_scores` / :func:`merge_records`, in reporting order.
SCORE_KEYS = ("iou", "accuracy", "fmax", "fmax_curve", "fmax_tokencut", "max_fm", "mean_fm",
              "adp_fm", "wfm", "sm",
              "max_em", "mean_em", "adp_em", "mae")
#: The per-image scalars of :func:`record_summary` (the per-image CSV columns).
PER_IMAGE_KEYS = SCORE_KEYS + ("resized",)

USOD_BETA_SQ = 0.3 ** 2  # the protocol's quirk: β = 0.3 squared again
USOD_EPS = 1e-7
USOD_THRESHOLDS = 255  # t_k = k / 255, k = 0 .. 254
TOKENCUT_BETA_SQ = 0.3  # TokenCut's metric.py: β² = 0.3, not squared again
_F64 = np.float64

# pysodmetrics >= 1.5 lets `step` skip normalisation (``normalize=False``) so the prediction is
# normalised once per image instead of once per metric class; older versions normalise inside.
_STEP_TAKES_NORMALIZE = "normalize" in inspect.signature(psm.MAE.step).parameters
if _STEP_TAKES_NORMALIZE:
    from py_sod_metrics.utils import prepare_data as _psm_prepare_data


def resize_to(pred: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize a ``uint8 (h, w)`` map to ``shape = (H, W)`` with PIL bilinear → ``uint8 (H, W)``."""
    h, w = shape
    return np.asarray(Image.fromarray(pred).resize((w, h), Image.BILINEAR))


def _as_gray_u8(arr: np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(f"{what} must be a non-empty 2-D (H, W) array, got shape {arr.shape}")
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    if arr.dtype != np.uint8:
        raise TypeError(f"{what} must be uint8 (as read from an 8-bit PNG) or bool, got {arr.dtype}")
    return arr


def _usod_counts(v: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """``TP_k``, ``PP_k`` (int64, 255) for ``v > k``, k = 0..254, and ``GP``."""
    hist_all = np.bincount(v.ravel(), minlength=256)
    hist_fg = np.bincount(v[g], minlength=256)
    # |v > k| = total - |v <= k| = total - cumsum(hist)[k]
    pp = hist_all.sum() - np.cumsum(hist_all)[:USOD_THRESHOLDS]
    tp = hist_fg.sum() - np.cumsum(hist_fg)[:USOD_THRESHOLDS]
    return tp.astype(np.int64), pp.astype(np.int64), int(hist_fg.sum())


def usod_fcurves(tp: np.ndarray, pp: np.ndarray, gp: np.ndarray) -> tuple[np.ndarray, ...]:
    """Precision, recall and F (β² = 0.09) curves from counts; broadcasts over leading axes."""
    tp = tp.astype(_F64)
    precision = tp / (pp + USOD_EPS)
    recall = tp / (np.asarray(gp, _F64)[..., None] + USOD_EPS)
    f = (1 + USOD_BETA_SQ) * precision * recall / (USOD_BETA_SQ * precision + recall + USOD_EPS)
    return precision, recall, f


def tokencut_fcurve(tp: np.ndarray, pp: np.ndarray, gp: np.ndarray) -> np.ndarray:
    """TokenCut's per-image F curve (β² = 0.3; P = 1 on an empty prediction, R = 1 on an empty
    ground truth, NaN → 0); broadcasts over leading axes like :func:`usod_fcurves`."""
    tp, pp = tp.astype(_F64), pp.astype(_F64)
    gp = np.broadcast_to(np.asarray(gp, _F64)[..., None], tp.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(pp == 0, 1.0, tp / pp)
        recall = np.where(gp == 0, 1.0, tp / gp)
        f = (1 + TOKENCUT_BETA_SQ) * precision * recall / (TOKENCUT_BETA_SQ * precision + recall)
    return np.nan_to_num(f, nan=0.0)


def _sod_step(pred: np.ndarray, gt: np.ndarray) -> dict:
    """Run each pysodmetrics class on one image; keep exactly what its `step` appended."""
    with warnings.catch_warnings():
        # Fmeasure warns on construction that FmeasureV2 will replace it; it is still the
        # reference for max/mean/adaptive F of the SOD literature.
        warnings.filterwarnings("ignore", message="This class will be removed")
        fm = psm.Fmeasure()
    wfm, sm, em, mae = psm.WeightedFmeasure(), psm.Smeasure(), psm.Emeasure(), psm.MAE()
    # The official runner hands these classes float32 arrays (``pred / 255`` read back times
    # 255): exact for 8-bit values, but the min-max scaling then runs in float32.
    pred, gt = pred.astype(np.float32), gt.astype(np.float32)
    if _STEP_TAKES_NORMALIZE:
        p, g = _psm_prepare_data(pred, gt)
        kwargs = {"normalize": False}
    else:  # pragma: no cover - pysodmetrics < 1.5
        p, g, kwargs = pred, gt, {}
    for metric in (fm, wfm, sm, em, mae):
        metric.step(p, g, **kwargs)
    # get_results() of a one-image evaluator is that image's appended values, as float64.
    f, e = fm.get_results(), em.get_results()["em"]
    return {
        "fm_adp": _F64(f["fm"]["adp"]),
        "fm_curve": np.asarray(f["fm"]["curve"], _F64),
        "fm_p": np.asarray(f["pr"]["p"], _F64),
        "fm_r": np.asarray(f["pr"]["r"], _F64),
        "wfm": _F64(wfm.get_results()["wfm"]),
        "sm": _F64(sm.get_results()["sm"]),
        "em_adp": _F64(e["adp"]),
        "em_curve": np.asarray(e["curve"], _F64),
        "mae": _F64(mae.get_results()["mae"]),
    }


def image_record(pred: np.ndarray, gt: np.ndarray, *, resize: str = "mask") -> dict:
    """Everything every protocol needs from one image, to be merged by :func:`merge_records`.

    Args:
        pred: ``uint8 (h, w)`` saliency map (0 = background, 255 = foreground), or bool.
        gt: ``uint8 (H, W)`` ground-truth mask, or bool.
        resize: when the sizes differ, ``"mask"`` resizes the mask to ``(h, w)`` (PIL bilinear,
            the official runner) and ``"prediction"`` the prediction to ``(H, W)``.

    Returns:
        A picklable dict: ``shape`` the scored (rows, cols), ``pred_shape`` and ``mask_shape`` as
        given, ``resized`` bool; unsupervised protocol ``iou``, ``accuracy`` (float64),
        ``usod_tp``, ``usod_pp`` (int64, 255), ``usod_gp`` (int);
        pysodmetrics ``fm_adp``, ``fm_curve``/``fm_p``/``fm_r`` (float64, 256, index i is the
        threshold ``(255 - i) / 255``), ``wfm``, ``sm``, ``em_adp``, ``em_curve`` (256), ``mae``.

    Raises:
        ValueError / TypeError: on a non-2-D, empty or non-uint8/bool array, or an unknown
        ``resize``.
    """
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    pred = _as_gray_u8(pred, "pred")
    gt = _as_gray_u8(gt, "gt")
    pred_shape, mask_shape = pred.shape, gt.shape
    resized = pred_shape != mask_shape
    if resized and resize == "mask":
        gt = resize_to(gt, pred_shape)  # soft edges stay; each metric binarises
    elif resized:
        pred = resize_to(pred, mask_shape)

    g = gt >= 128  # gt / 255 > 0.5
    b = pred >= 128  # pred / 255 > 0.5
    union = np.count_nonzero(b | g)
    iou = np.count_nonzero(b & g) / union if union else 1.0
    tp, pp, gp = _usod_counts(pred, g)
    record = {
        "shape": gt.shape,
        "pred_shape": pred_shape,
        "mask_shape": mask_shape,
        "resized": resized,
        "iou": _F64(iou),
        "accuracy": _F64(np.count_nonzero(b == g) / b.size),
        "usod_tp": tp,
        "usod_pp": pp,
        "usod_gp": gp,
    }
    record.update(_sod_step(pred, gt))
    return record


def _stack(records: Sequence[dict], key: str) -> np.ndarray:
    # The same array pysodmetrics builds in get_results(): np.array(list, dtype=float64).
    return np.array([r[key] for r in records], dtype=_F64)


def _check(records: Iterable[dict]) -> list[dict]:
    records = list(records)
    if not records:
        raise ValueError("no records to merge (no images were evaluated)")
    return records


def merge_records(records: Iterable[dict]) -> dict[str, float]:
    """Final scores of a set of per-image records (see the module docstring for the formulas).

    The records are merged in the order given; sort them by a stable key (e.g. the file key) to
    get the same bits however they were sharded.

    Returns:
        ``{key: float}`` for every key of :data:`SCORE_KEYS`.

    Raises:
        ValueError: when ``records`` is empty.
    """
    records = _check(records)
    _, _, f = usod_fcurves(_stack(records, "usod_tp"), _stack(records, "usod_pp"),
                            _stack(records, "usod_gp"))
    tokencut = tokencut_fcurve(_stack(records, "usod_tp"), _stack(records, "usod_pp"),
                                _stack(records, "usod_gp"))
    fm_curve = np.mean(_stack(records, "fm_curve"), axis=0)
    em_curve = np.mean(_stack(records, "em_curve"), axis=0)
    scores = {
        "iou": np.mean(_stack(records, "iou")),
        "accuracy": np.mean(_stack(records, "accuracy")),
        # Official: mean over images of each image's own max (per-image maxima, then mean).
        "fmax": np.mean(f.max(axis=1)),
        "fmax_curve": np.mean(f, axis=0).max(),
        "fmax_tokencut": np.mean(tokencut, axis=0).max(),
        "max_fm": fm_curve.max(),
        "mean_fm": fm_curve.mean(),
        "adp_fm": np.mean(_stack(records, "fm_adp")),
        "wfm": np.mean(_stack(records, "wfm")),
        "sm": np.mean(_stack(records, "sm")),
        "max_em": em_curve.max(),
        "mean_em": em_curve.mean(),
        "adp_em": np.mean(_stack(records, "em_adp")),
        "mae": np.mean(_stack(records, "mae")),
    }
    return {k: float(scores[k]) for k in SCORE_KEYS}


def merge_curves(records: Iterable[dict]) -> dict[str, dict[str, np.ndarray]]:
    """Dataset curves for plotting, averaged over images like the scores.

    Returns:
        ``{"usod": {threshold, precision, recall, fmeasure}, "sod": {threshold, precision,
        recall, fmeasure, emeasure}}``; float64 arrays in increasing threshold order (threshold in
        [0, 1]: 255 values ``k/255`` with ``p > t`` for "usod", 256 values ``i/255`` with
        ``p >= t`` on the min-max normalised map for pysodmetrics' "sod").

    Raises:
        ValueError: when ``records`` is empty.
    """
    records = _check(records)
    p, r, f = usod_fcurves(_stack(records, "usod_tp"), _stack(records, "usod_pp"),
                            _stack(records, "usod_gp"))
    flip = slice(None, None, -1)  # pysodmetrics' index i is the threshold (255 - i) / 255
    return {
        "usod": {
            "threshold": np.arange(USOD_THRESHOLDS, dtype=_F64) / 255,
            "precision": p.mean(axis=0),
            "recall": r.mean(axis=0),
            "fmeasure": f.mean(axis=0),
        },
        "sod": {
            "threshold": np.arange(256, dtype=_F64) / 255,
            "precision": np.mean(_stack(records, "fm_p"), axis=0)[flip],
            "recall": np.mean(_stack(records, "fm_r"), axis=0)[flip],
            "fmeasure": np.mean(_stack(records, "fm_curve"), axis=0)[flip],
            "emeasure": np.mean(_stack(records, "em_curve"), axis=0)[flip],
        },
    }


def record_summary(record: dict) -> dict[str, float | bool]:
    """Per-image scalars of one record (the per-image CSV row), keyed like :data:`PER_IMAGE_KEYS`.

    Curve metrics are this image's own: ``fmax``/``max_fm``/``max_em`` are the maxima of its
    curves and ``mean_fm``/``mean_em`` their means; for one image ``fmax_curve == fmax``. The
    dataset ``fmax`` is the mean of these per-image ``fmax`` values; the pysodmetrics scores
    average curves first.
    """
    _, _, f = usod_fcurves(record["usod_tp"], record["usod_pp"], record["usod_gp"])
    tokencut = tokencut_fcurve(record["usod_tp"], record["usod_pp"], record["usod_gp"])
    return {
        "iou": float(record["iou"]),
        "accuracy": float(record["accuracy"]),
        "fmax": float(f.max()),
        "fmax_curve": float(f.max()),
        "fmax_tokencut": float(tokencut.max()),
        "max_fm": float(record["fm_curve"].max()),
        "mean_fm": float(record["fm_curve"].mean()),
        "adp_fm": float(record["fm_adp"]),
        "wfm": float(record["wfm"]),
        "sm": float(record["sm"]),
        "max_em": float(record["em_curve"].max()),
        "mean_em": float(record["em_curve"].mean()),
        "adp_em": float(record["em_adp"]),
        "mae": float(record["mae"]),
        "resized": bool(record["resized"]),
    }


def sod_scores(preds: Sequence[np.ndarray], gts: Sequence[np.ndarray], *,
               resize: str = "mask") -> dict[str, float]:
    """Both protocols' scores over a list of images (the public API).

    Args:
        preds: ``uint8 (h, w)`` saliency maps as read from 8-bit PNGs.
        gts: ``uint8 (H, W)`` ground-truth masks, same length and order.
        resize: which one is resized (bilinear) when the sizes differ: ``"mask"`` (to the
            prediction, as the official runner) or ``"prediction"``.

    Returns:
        ``{iou, accuracy, fmax, fmax_curve, fmax_tokencut, max_fm, mean_fm, adp_fm, wfm, sm,
        max_em, mean_em, adp_em, mae}``
        as floats; see the module docstring for the exact definitions.

    Raises:
        ValueError: on lists of different lengths, empty lists or malformed arrays.
    """
    preds, gts = list(preds), list(gts)
    if len(preds) != len(gts):
        raise ValueError(f"{len(preds)} predictions but {len(gts)} ground truths")
    return merge_records(image_record(p, g, resize=resize) for p, g in zip(preds, gts))
