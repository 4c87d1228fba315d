"""The stage registry: every stage once, with what the rest of the package needs to know of it.

The command line (one subcommand per stage, :mod:`selfment_dist.cli`), the YAML sections
(:mod:`selfment_dist.config`), ``STAGE_SETTINGS`` (:mod:`selfment_dist.settings`), the stage chain
(``selfment run``, :mod:`selfment_dist.pipeline.chain`), the Ray Jobs entrypoints (``jobs/``) and
the demo all read :data:`STAGES`. Adding a stage is one :class:`Stage` entry here (plus its
settings model and its run function).

Settings models and run functions are named as ``"module:attribute"`` and imported on first
use, so importing this module imports nothing else of the package (no pydantic, torch, timm or
Ray): ``selfment --help`` and the settings module itself can read it.

The names of the files a run leaves in its outputs are defined here too, once.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["Stage", "STAGES", "CHAIN", "stage", "MANIFEST_NAME", "SEGMENT_MANIFEST_NAME",
           "MODEL_META_NAME", "METRICS_NAME", "CHAIN_SUMMARY_NAME"]

#: The pseudo-label dataset's run manifest (``status``, config, parts), in its output folder.
MANIFEST_NAME = "_selfment.json"
#: The segment stage's run manifest.
SEGMENT_MANIFEST_NAME = "_segment.json"
#: A model artifact's metadata, written last once the weights are saved.
MODEL_META_NAME = "model.json"
#: The evaluation's scores, written last by ``evaluation.reports.write_reports``.
METRICS_NAME = "metrics.json"
#: The stage chain's record under ``pipeline.output``, rewritten after every stage.
CHAIN_SUMMARY_NAME = "pipeline_summary.json"


def load(ref: str) -> Any:
    """The attribute a ``"module:attribute"`` reference names (the module imported now)."""
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Stage:
    """One stage.

    ``name`` is its YAML section and its name in the chain (``pseudo_label``); the command line
    spells it with dashes. ``folder`` is its output folder under ``pipeline.output``: a stage
    with one is part of the chain (in the order of :data:`STAGES`); ``marker`` is the file its
    output holds once complete, and ``marker_status`` whether that file's ``status`` must also
    say ``complete``. ``takes_settings`` False: the run function takes the settings' fields as
    keywords instead of the settings object.
    """
    name: str
    help: str
    settings_ref: str
    run_ref: str
    folder: str | None = None
    marker: str | None = None
    marker_status: bool = False
    takes_settings: bool = True

    @property
    def command(self) -> str:
        return self.name.replace("_", "-")

    @property
    def in_chain(self) -> bool:
        return self.folder is not None

    @property
    def settings(self) -> type:
        """The stage's settings model (a :class:`selfment_dist.settings.StageSettings`)."""
        return load(self.settings_ref)

    def run_function(self) -> Callable[..., Any]:
        return load(self.run_ref)

    def run(self, settings: Any) -> Any:
        """Run the stage with its settings object."""
        function = self.run_function()
        if self.takes_settings:
            return function(settings)
        return function(**{name: getattr(settings, name) for name in type(settings).model_fields})


_SETTINGS = "selfment_dist.settings:"

#: Every stage, the chain's in pipeline order first.
STAGES: tuple[Stage, ...] = (
    Stage("pseudo_label", "DINO features → NCut → IPO pseudo-masks, as a parquet dataset",
          _SETTINGS + "PseudoLabelSettings",
          "selfment_dist.pipeline.pseudo_label:run_pseudo_label",
          folder="labels", marker=MANIFEST_NAME, marker_status=True),
    Stage("train", "train the segmentation head with Ray Train (DDP)",
          _SETTINGS + "TrainSettings", "selfment_dist.pipeline.train:run_train",
          folder="model", marker=MODEL_META_NAME),
    Stage("segment", "saliency maps of images with a trained model",
          _SETTINGS + "SegmentSettings", "selfment_dist.pipeline.segment:run_segment",
          folder="predictions", marker=SEGMENT_MANIFEST_NAME, marker_status=True),
    Stage("evaluate", "SOD/COD and unsupervised-SOD metrics, reports and plots",
          _SETTINGS + "EvaluateSettings", "selfment_dist.pipeline.evaluate:run_evaluate",
          folder="report", marker=METRICS_NAME),
    Stage("import_checkpoint",
          "turn an official Selfment head checkpoint (.pth) into a model artifact",
          _SETTINGS + "ImportCheckpointSettings",
          "selfment_dist.model.official_checkpoint:import_official_checkpoint",
          takes_settings=False),
    Stage("inspect", "contact sheets, confidence histogram and an HTML page of pseudo-labels",
          _SETTINGS + "InspectSettings", "selfment_dist.pipeline.inspect:run_inspect",
          takes_settings=False),
    Stage("export_coco", "the objects of pseudo-labels as COCO instance JSON (RLE)",
          _SETTINGS + "ExportCocoSettings", "selfment_dist.pipeline.export_coco:run_export_coco"),
)

#: The chain's stages (``selfment run``), in pipeline order, by name.
CHAIN: dict[str, Stage] = {s.name: s for s in STAGES if s.in_chain}


def stage(name: str) -> Stage:
    """The stage called ``name`` (``pseudo_label`` or ``pseudo-label``)."""
    key = name.replace("-", "_")
    for entry in STAGES:
        if entry.name == key:
            return entry
    raise KeyError(f"no stage {name!r}; stages: {', '.join(s.name for s in STAGES)}")
