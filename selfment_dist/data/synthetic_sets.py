"""Two synthetic scene sets under one root: training scenes and a held-out set with ground truth.

What ``selfment demo`` and a config's ``pipeline.synthetic`` (``selfment run``, ``jobs/pipeline.py``)
write before the stages run; the scenes themselves come from :mod:`selfment_dist.data.synthetic`.
"""
from __future__ import annotations

import logging
import math
from typing import Any

from selfment_dist.data.synthetic import write_scenes
from selfment_dist.io.storage import join, url_to_fs

logger = logging.getLogger(__name__)

__all__ = ["synthetic_layout", "write_synthetic_sets"]


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
    ``masks/<key>.png`` (see :func:`selfment_dist.data.synthetic.write_scenes`). A set whose folders
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
