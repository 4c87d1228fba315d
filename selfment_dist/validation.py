"""Settings checks (type and range), run once on entry to every ``run_*`` function.

Every pipeline checks its settings here before it starts Ray, writes a byte or starts an actor,
so the command line, a YAML config, a Ray Job and the Python API fail alike: a
:class:`SettingsError` whose message has one line per problem. Values from YAML arrive as
written (``tau: "0.2"`` is a string, and is refused rather than guessed at).
"""
from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any, Callable

__all__ = ["SettingsError", "check_settings", "PSEUDO_LABEL_RULES", "SEGMENT_RULES",
           "TRAIN_RULES"]


class SettingsError(ValueError):
    """One or more settings are invalid; ``problems`` lists them, one line each."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


Rule = Callable[[str, Any], "str | None"]


def _kind(value: Any) -> str:
    return f"the string {value!r}" if isinstance(value, str) else f"{value!r}"


def integer(*, low: int | None = None, optional: bool = False) -> Rule:
    """An int (never a bool, a float or a string) ≥ ``low``."""
    def rule(name: str, value: Any) -> str | None:
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, Integral):
            return f"{name} must be an integer, got {_kind(value)}"
        if low is not None and value < low:
            return f"{name} must be >= {low}, got {value}"
        return None
    return rule


def number(*, low: float | None = None, high: float | None = None, low_open: bool = False,
           high_open: bool = False, optional: bool = False) -> Rule:
    """A finite real number (not a bool or a string) in the given interval."""
    def rule(name: str, value: Any) -> str | None:
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
            return f"{name} must be a number, got {_kind(value)}"
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high:
            lo = "" if low is None else f"{'(' if low_open else '['}{low}"
            hi = "" if high is None else f"{high}{')' if high_open else ']'}"
            return f"{name} must be in {lo or '(-inf'}, {hi or 'inf)'}, got {value}"
        return None
    return rule


def flag() -> Rule:
    def rule(name: str, value: Any) -> str | None:
        return None if isinstance(value, bool) else f"{name} must be true or false, got " \
                                                    f"{_kind(value)}"
    return rule


def text(*, choices: tuple[str, ...] | None = None, optional: bool = False) -> Rule:
    def rule(name: str, value: Any) -> str | None:
        if value is None and optional:
            return None
        if not isinstance(value, str) or not value:
            return f"{name} must be a non-empty string, got {_kind(value)}"
        if choices is not None and value not in choices:
            return f"{name} must be one of {', '.join(choices)}, got {value!r}"
        return None
    return rule


def uris() -> Rule:
    """One URI, or a non-empty list of them."""
    def rule(name: str, value: Any) -> str | None:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not items:
            return f"{name} must be a URI or a non-empty list of URIs, got {_kind(value)}"
        bad = [v for v in items if not isinstance(v, str) or not v]
        return f"{name} must hold non-empty strings, got {bad[0]!r}" if bad else None
    return rule


def mapping(*, optional: bool = True) -> Rule:
    def rule(name: str, value: Any) -> str | None:
        if value is None and optional:
            return None
        return None if isinstance(value, dict) else f"{name} must be a mapping, got " \
                                                    f"{_kind(value)}"
    return rule


_PRECISIONS = ("auto", "fp32", "bf16")  # backbone.PRECISIONS, without importing torch here

#: Settings of ``run_pseudo_label`` and what each must be. ``num_gpus_per_actor`` is only
#: type-checked here; the cluster-dependent checks live with the resource planner.
PSEUDO_LABEL_RULES: dict[str, Rule] = {
    "inputs": uris(), "output": text(),
    "backbone": text(), "weights": text(), "image_size": integer(low=1),
    "precision": text(choices=_PRECISIONS),
    "tau": number(low=0.0, high=1.0, high_open=True),
    "eps": number(low=0.0, high=1.0, low_open=True, high_open=True),
    "binary_graph": flag(), "n_iter": integer(low=1), "sample_size": integer(low=1),
    "no_object_threshold": number(low=0.0, high=1.0),
    "batch_size": integer(low=1, optional=True),
    "save_ncut": flag(), "save_features": flag(),
    "max_pixels": integer(low=1, optional=True), "max_bytes": integer(low=1, optional=True),
    "storage_options": mapping(), "address": text(optional=True),
    "num_actors": integer(low=1, optional=True),
    "num_gpus_per_actor": number(low=0.0, optional=True),
    "cpu_fallback": flag(), "actor_wait_s": number(low=0.0, low_open=True, optional=True),
    "rows_per_file": integer(low=1, optional=True),
    "fail_once_after": integer(low=0, optional=True),
    "allow_empty": flag(), "progress": flag(),
}

#: Settings of ``run_segment``.
SEGMENT_RULES: dict[str, Rule] = {
    "model": text(), "inputs": uris(), "output": text(),
    "image_size": integer(low=1, optional=True), "batch_size": integer(low=1),
    "output_format": text(choices=("png", "parquet")), "overlays": flag(),
    "storage_options": mapping(), "address": text(optional=True),
    "num_actors": integer(low=1, optional=True),
    "num_gpus_per_actor": number(low=0.0, optional=True),
    "cpu_fallback": flag(), "actor_wait_s": number(low=0.0, low_open=True, optional=True),
    "max_pixels": integer(low=1, optional=True), "max_bytes": integer(low=1, optional=True),
    "allow_empty": flag(), "progress": flag(),
}

#: Settings of ``run_train`` (GPU counts are checked against the cluster by the planner).
TRAIN_RULES: dict[str, Rule] = {
    "labels": text(), "output": text(), "workers": integer(low=1), "use_gpu": flag(),
    "epochs": integer(low=1), "batch_size": integer(low=1),
    "lr": number(low=0.0, low_open=True), "weight_decay": number(low=0.0),
    "sim_weight": number(low=0.0), "temperature": number(low=0.0, low_open=True),
    "embed_dim": integer(low=1), "checkpoint_every": integer(low=1),
    "max_failures": integer(low=-1), "features": text(choices=("auto", "stored", "backbone")),
    "max_pixels": integer(low=1, optional=True), "storage_options": mapping(),
    "address": text(optional=True), "resources_per_worker": mapping(),
    "fail_at_step": integer(low=0, optional=True), "seed": integer(),
    "lr_scaling": text(choices=("none", "sqrt", "linear")),
    "shuffle": text(choices=("full", "local")),
    "contrastive": text(choices=("official", "supcon")),
}


def check_settings(settings: dict[str, Any], rules: dict[str, Rule],
                   extra: list[str] | None = None) -> None:
    """Raise :class:`SettingsError` listing every setting of ``settings`` that breaks its rule
    (settings without a rule pass), plus the ``extra`` problems found by the caller."""
    problems = [p for name, rule in rules.items() if name in settings
                for p in [rule(name, settings[name])] if p]
    problems += extra or []
    if problems:
        raise SettingsError(problems)


def check_backbone_size(backbone: Any, image_size: Any) -> list[str]:
    """The problem with ``backbone``/``image_size`` (unknown backbone, size not a positive
    multiple of its patch size), as a list of at most one line."""
    if not isinstance(backbone, str):
        return []  # already reported by the type rules
    from .backbone import backbone_family, check_image_size
    size_ok = not isinstance(image_size, bool) and isinstance(image_size, Integral) \
        and image_size >= 1  # else already reported by the type and range rules
    try:
        if size_ok:
            check_image_size(backbone, int(image_size))
        else:
            backbone_family(backbone)
    except ValueError as exc:
        return [str(exc)]
    return []
