"""Typed settings of every stage: each option's type, range, default and one-line description.

This module is the one place an option is declared. The command line's flags and ``--help``
(:mod:`selfment_dist.cli`), the YAML sections (:mod:`selfment_dist.config`), the Ray Jobs
entrypoints (``jobs/``), the stage chain (:mod:`selfment_dist.pipeline.chain`) and the manifests
all read these models; adding an option is one field here (and its use in the stage).

    settings = PseudoLabelSettings(inputs=["s3://b/images/"], output="s3://b/labels", tau=0.3)
    run_pseudo_label(settings)

Why pydantic (v2, already a Ray dependency) rather than dataclasses: the models validate types
and ranges when built, report every problem with its location at once, refuse unknown keys,
and serialise with fields marked ``secret`` left out by construction; with dataclasses each of
those would be code of our own. Models are strict (``tau: "0.2"`` in YAML is an error, not a
silent conversion) except where a YAML spelling must become a Python type (a single input URI
becomes a list, ``[images, masks]`` a pair).

Field metadata read by the command line (``setting(..., flag=..., negative_flag=...)``):
``flag`` replaces the flag derived from the name (``inputs`` → ``--input``), ``negative_flag``
names the ``store_false`` flag of an option that defaults to True (``--no-progress``), ``cli``
picks a parser for values that are not a plain type (``key=value``, ``benchmark``, ``json``).
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal, Mapping

from pydantic import BeforeValidator, field_validator, model_validator
from typing_extensions import Annotated

from selfment_dist.defaults import (DEFAULT_BACKBONE, MAX_IMAGE_SIZE, MODEL_WORKERS,
                                    NO_OBJECT_THRESHOLD, PRECISIONS)
from selfment_dist.io.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from selfment_dist.settings_base import (Settings, SettingsError, Uri, UriList, build_settings,
                                         flag_of, fspath, setting, validate)
from selfment_dist.stages import CHAIN

__all__ = ["Settings", "StageSettings", "PseudoLabelSettings", "TrainSettings", "SegmentSettings",
           "EvaluateSettings", "InspectSettings", "ExportCocoSettings", "ImportCheckpointSettings", "SyntheticSettings", "ChainSettings", "DemoSettings",
           "ActorPoolSettings", "STAGE_SETTINGS", "SettingsError", "setting", "build_settings", "flag_of",
           "OUTPUT_FORMATS", "FEATURE_SOURCES", "MAX_IMAGE_SIZE", "validate"]

OUTPUT_FORMATS = ("png", "parquet")
FEATURE_SOURCES = ("auto", "stored", "backbone")
SHUFFLES = ("full", "local")
#: Most objects per image (``max_objects``); also spaces export-coco's annotation ids.
MAX_OBJECTS = 64
INSTANCE_MATCHES = ("file_name", "id")
LR_SCALINGS = ("none", "sqrt", "linear")
CONTRASTIVE_VARIANTS = ("official", "supcon")
QUANTIZE = ("floor", "round")  # saliency → 8 bits: floor((p*255)) is the official code's
RESIZE_MODES = ("mask", "prediction")  # evaluation: the official runner resizes the mask


def create_bucket_setting():
    """Every command that writes an output takes ``--create-bucket`` (alike, so defined once)."""
    return setting(False, "create the output's bucket when it does not exist (default: refuse a "
                          "missing bucket, likely a typo)")


class StageSettings(Settings):
    """What every stage takes: where Ray is and how to reach storage."""
    address: str | None = setting(
        None, "Ray cluster address (default: RAY_ADDRESS, the running Ray, else a local one)")
    storage_options: dict[str, Any] | None = setting(
        None, "fsspec options for every URI, e.g. endpoint_url=http://127.0.0.1:9000 "
              "(repeatable)", flag="--storage-option", metavar="KEY=VALUE", cli="key=value",
        secret=True)


class ActorPoolSettings(StageSettings):
    """The model actors of pseudo-label, segment and evaluate --model (see ``pipeline._plan``)."""
    num_actors: int | None = setting(
        None, "most model replicas (default: GPU actors as the GPU nodes hold, growing with an "
              "autoscaler; CPU actors: one per 8 CPUs of each node)", ge=1)
    num_gpus_per_actor: float | None = setting(
        None, "GPUs per replica, 0 to 1 (default 1 when the cluster has GPUs now, else 0; "
              "asks an autoscaler for GPU nodes)", ge=0.0, le=1.0)
    cpu_fallback: bool = setting(
        False, "let GPU actors run on CPU where CUDA is unusable (default: they refuse)")
    actor_wait_s: float | None = setting(
        None, "longest wait for the first model actor (default 600), then fail", gt=0.0)
    require_gpu: bool = setting(
        False, "never plan CPU model actors: with no GPU alive, wait (at most actor_wait_s) "
               "for one (default on a cluster whose config has GPU node types)")
    model_workers: Literal[MODEL_WORKERS] = setting(
        "actors", "actors (default) | tasks: CPU only, Ray task workers that keep their model "
                  "between tasks and between runs of one driver (repeated small runs skip the "
                  "model's start-up)")


class PseudoLabelSettings(ActorPoolSettings):
    """``selfment pseudo-label``: DINO features → NCut → IPO pseudo-masks, as a parquet dataset."""
    positional: ClassVar[tuple[str, ...]] = ("inputs", "output")
    section: ClassVar[str] = "pseudo_label"

    inputs: UriList = setting(
        description="folders, globs, list files, img2dataset parquet or WebDataset tar shards",
        flag="--input", metavar="URI")
    output: Uri = setting(description="parquet dataset folder (parts + _selfment.json manifest)",
                          metavar="URI")
    backbone: str = setting(DEFAULT_BACKBONE, "timm DINO model name")
    weights: str = setting("hub", "hub | random | PATH | URI of a checkpoint")
    image_size: int = setting(768, "square backbone input size (a multiple of the patch size; "
                              f"at most {MAX_IMAGE_SIZE}: memory)", gt=0, le=MAX_IMAGE_SIZE)
    precision: Literal[PRECISIONS] = setting(
        "fp32", "backbone numerics: fp32 (official), tf32 (CUDA matmuls in TF32) or bf16 "
                "(autocast); auto = fp32. NCut/IPO always run in IEEE fp32")
    tau: float = setting(0.2, "NCut: affinities above it become edges", ge=0.0, lt=1.0)
    eps: float = setting(1e-5, "NCut: the weight of the other (dropped) edges", gt=0.0, lt=1.0)
    binary_graph: bool = setting(True, "NCut: set kept affinities to 1 (else keep them)",
                                 negative_flag="--non-binary-graph")
    n_iter: int = setting(20, "IPO: most refinement rounds", ge=1)
    sample_size: int = setting(10, "IPO: fewest patches a side needs to go on", ge=1)
    no_object_threshold: float = setting(
        NO_OBJECT_THRESHOLD, "flag rows whose confidence is below it as no_object (kept; train "
                             "uses them unless --skip-no-object)", ge=0.0, le=1.0, metavar="X")
    batch_size: int | None = setting(None, "images per model call (default 32 on GPU, 8 on CPU)",
                                     ge=1)
    save_ncut: bool = setting(False, "also store the NCut mask before IPO")
    save_features: bool = setting(False, "also store float16 patch features")
    max_pixels: int | None = setting(DEFAULT_MAX_PIXELS,
                                     "refuse larger images (decompression bombs); null: no limit",
                                     ge=1)
    max_bytes: int | None = setting(DEFAULT_MAX_BYTES, "refuse larger encoded images (file, tar "
                                    "member, parquet cell), checked before reading", ge=1)
    allow_empty: bool = setting(False, "succeed on inputs without images")
    create_bucket: bool = create_bucket_setting()
    rows_per_file: int | None = setting(
        None, "rows per parquet part (default 1024; 256 with --save-features)", ge=1)
    progress: bool = setting(True, "show Ray Data's progress bars", negative_flag="--no-progress")
    max_objects: int = setting(
        1, "above 1: also up to N objects per image (MaskCut rounds) in an objects column",
        ge=1, le=MAX_OBJECTS, metavar="N")
    min_object_confidence: float | None = setting(
        None, "with --max-objects: drop objects whose confidence is below X", ge=0.0, le=1.0,
        metavar="X")
    object_ipo: bool = setting(False, "with --max-objects: refine each object with IPO")

    @model_validator(mode="after")
    def _object_options_need_objects(self) -> PseudoLabelSettings:
        if self.max_objects == 1 and (self.min_object_confidence is not None or self.object_ipo):
            raise ValueError("min_object_confidence and object_ipo need max_objects > 1")
        return self


class TrainSettings(StageSettings):
    """``selfment train``: the segmentation head on pseudo-labels with Ray Train (DDP)."""
    positional: ClassVar[tuple[str, ...]] = ("labels", "output")
    section: ClassVar[str] = "train"

    labels: Uri = setting(description="pseudo-label parquet dataset", metavar="URI")
    output: Uri = setting(description="model artifact folder (also holds the checkpoints)",
                          metavar="URI")
    create_bucket: bool = create_bucket_setting()
    workers: int = setting(2, "Ray Train workers (DDP ranks)", ge=1)
    use_gpu: bool = setting(False, "one GPU per worker; otherwise CPU")
    precision: Literal[PRECISIONS] = setting(
        "auto", "training numerics: auto (= fp32, official), fp32, tf32 (the backbone's CUDA "
                "matmuls) or bf16 (GPU autocast of the head and the backbone)")
    epochs: int = setting(1, "passes over the usable rows (official default: 1)", ge=1)
    batch_size: int = setting(1, "images per step per worker (official: 1)", ge=1)
    lr: float = setting(1e-3, "Adam's learning rate", gt=0.0)
    weight_decay: float = setting(1e-5, "Adam's weight decay", ge=0.0)
    lr_scaling: Literal[LR_SCALINGS] = setting(
        "none", "lr x f(batch size) for the faster large-batch configuration")
    shuffle: Literal[SHUFFLES] = setting(
        "full", "full: whole set reshuffled every epoch (official); local: small buffer")
    contrastive: Literal[CONTRASTIVE_VARIANTS] = setting(
        "official", "contrastive loss variant")
    sim_weight: float = setting(0.1, "weight of the contrastive term", ge=0.0)
    temperature: float = setting(0.05, "temperature of the contrastive term", gt=0.0)
    embed_dim: int = setting(128, "width of the head's embedding", ge=1)
    checkpoint_every: int = setting(200, "steps between checkpoints (and one per epoch)", ge=1)
    max_failures: int = setting(2, "worker failures Ray Train recovers from (-1: no limit)",
                                ge=-1)
    features: Literal[FEATURE_SOURCES] = setting(
        "auto", "stored feature column, or recompute with the frozen backbone (auto: stored "
                "when every part has it)")
    # Confidence filters are beyond the paper (the official code trains on every image) and the
    # confidence model is uncalibrated for real DINO features: all off by default.
    skip_no_object: bool = setting(False, "skip rows flagged no_object (beyond the paper)")
    min_confidence: float | None = setting(
        None, "train on rows with confidence >= X only (beyond the paper; default: every row)",
        ge=0.0, le=1.0, metavar="X")
    keep_fraction: float | None = setting(
        None, "train on the most confident fraction F of the rows (beyond the paper)", gt=0.0,
        le=1.0, metavar="F")
    max_pixels: int | None = setting(DEFAULT_MAX_PIXELS,
                                     "refuse larger images when recomputing features", ge=1)
    resources_per_worker: dict[str, float] | None = setting(
        None, "Ray resources per worker, e.g. '{\"CPU\": 4, \"GPU\": 1}'", metavar="JSON",
        cli="json")
    seed: int = setting(0, "head initialisation and shuffling")
    worker_wait_s: float | None = setting(
        None, "longest wait for nodes that can hold the workers (default 600), then fail",
        gt=0.0)
    collective_timeout_s: int = setting(
        300, "seconds a DDP collective (NCCL/gloo) may wait for a rank before the ranks fail "
             "and Ray Train restarts them (torch's default is 30 min)", ge=10)

    @model_validator(mode="after")
    def _one_confidence_cut(self) -> TrainSettings:
        given = [n for n in ("min_confidence", "keep_fraction", "skip_no_object")
                 if getattr(self, n) not in (None, False)]
        if len(given) > 1:
            raise ValueError(f"give one confidence filter, not {' and '.join(given)}")
        return self

    @model_validator(mode="after")
    def _whole_gpus(self) -> TrainSettings:
        # One DDP rank drives one device: a fraction of a GPU would put two NCCL ranks on one
        # device, more than one would leave GPUs idle.
        resources = self.resources_per_worker or {}
        if any(v < 0 for v in resources.values()):
            raise ValueError(f"resources_per_worker must not be negative, got {resources}")
        gpus = resources.get("GPU", 0)
        if gpus not in (0, 1):
            raise ValueError(f"resources_per_worker GPU must be 0 or 1 (one GPU per worker; "
                             f"use more workers for more GPUs), got {gpus}")
        if gpus == 1 and not self.use_gpu:
            raise ValueError("resources_per_worker asks for a GPU: set use_gpu")
        return self


class SegmentSettings(ActorPoolSettings):
    """``selfment segment``: saliency maps of images with a trained model."""
    positional: ClassVar[tuple[str, ...]] = ("model", "inputs", "output")
    section: ClassVar[str] = "segment"

    model: Uri = setting(description="model artifact folder", metavar="URI")
    inputs: UriList = setting(
        description="folders, globs, list files, img2dataset parquet or WebDataset tar shards",
        flag="--input", metavar="URI")
    output: Uri = setting(description="folder of <key>.png maps (or parquet parts)", metavar="URI")
    image_size: int | None = setting(
        None, "inference size (default: the model's, twice its training size)", gt=0,
        le=MAX_IMAGE_SIZE)
    batch_size: int = setting(8, "images per model call", ge=1)
    output_format: Literal[OUTPUT_FORMATS] = setting("png", "png maps or parquet parts",
                                                     flag="--format")
    overlays: bool = setting(False, "also write images with the mask tinted (png only)")
    exif_orientation: bool = setting(True, "apply EXIF orientation when decoding (web images)",
                                     negative_flag="--no-exif-orientation")
    quantize: Literal[QUANTIZE] = setting("floor", "saliency to 8 bits: floor (official) or round")
    rows_per_file: int | None = setting(None, "rows per parquet part (default 1024; parquet only)",
                                        ge=1)
    max_pixels: int | None = setting(DEFAULT_MAX_PIXELS, "refuse larger images", ge=1)
    max_bytes: int | None = setting(DEFAULT_MAX_BYTES, "refuse larger encoded images", ge=1)
    allow_empty: bool = setting(False, "succeed on inputs without images")
    create_bucket: bool = create_bucket_setting()
    progress: bool = setting(True, "show Ray Data's progress bars", negative_flag="--no-progress")

    @model_validator(mode="after")
    def _overlays_need_png(self) -> SegmentSettings:
        if self.overlays and self.output_format != "png":
            raise ValueError("overlays are written next to PNG maps: use output_format png")
        return self


def _pairs(value: Any) -> Any:
    """YAML's ``NAME: [images, masks]`` lists as ``(images, masks)`` tuples."""
    if isinstance(value, Mapping):
        return {k: tuple(fspath(x) for x in v) if isinstance(v, (list, tuple)) else v
                for k, v in value.items()}
    return value


class EvaluateSettings(ActorPoolSettings):
    """``selfment evaluate``: folders of maps and masks, or a model and benchmarks to segment."""
    section: ClassVar[str] = "evaluate"

    output: Uri = setting(description="folder of metrics.json, metrics.md, per_image.csv, plots/",
                          metavar="URI")
    create_bucket: bool = create_bucket_setting()
    predictions: Uri | None = setting(
        None, "folder of saliency PNGs (with --instances: a COCO JSON of predicted instances)",
        metavar="URI")
    masks: Uri | None = setting(None, "folder of ground-truth PNGs", metavar="URI")
    name: str = setting("default", "dataset name in the reports", min_length=1)
    model: Uri | None = setting(None, "model artifact: segment the benchmarks first",
                                metavar="URI")
    benchmarks: Annotated[dict[str, tuple[Uri, Uri]] | None, BeforeValidator(_pairs)] = setting(
        None, "NAME=IMAGES_URI,MASKS_URI to segment with --model and score (repeatable)",
        flag="--benchmark", metavar="NAME=IMAGES_URI,MASKS_URI", cli="benchmark")
    image_size: int | None = setting(
        None, "inference size with --model (default: the model's, twice its training size)",
        gt=0, le=MAX_IMAGE_SIZE)
    batch_size: int | None = setting(None, "images per model call with --model", ge=1)
    num_shards: int | None = setting(None, "Ray tasks per dataset (default: fill the cluster)",
                                     ge=1)
    instances: bool = setting(
        False, "class-agnostic instance AP/AR (pycocotools) of --predictions against "
               "--ground-truth, two COCO JSON files")
    ground_truth: Uri | None = setting(None, "with --instances: COCO JSON of the true instances",
                                       metavar="URI")
    match_images: Literal[INSTANCE_MATCHES] = setting(
        "file_name", "with --instances: pair the two files' images by file_name (a path "
                     "ending matches: s3://b/img/a.png ~ img/a.png) or by id")
    resize: Literal[RESIZE_MODES] = setting(
        "mask", "what a size mismatch resizes: the mask (to the prediction, official) or the "
                "prediction (to the mask)")
    exif_orientation: bool = setting(
        False, "with --model: apply EXIF orientation to benchmark images (official: not)")
    quantize: Literal[QUANTIZE] = setting("floor", "with --model: maps to 8 bits, floor (official) "
                                                   "or round")

    @model_validator(mode="after")
    def _one_mode(self) -> EvaluateSettings:
        if self.instances or self.ground_truth is not None:
            if not (self.instances and self.predictions and self.ground_truth):
                raise ValueError("instances needs predictions and ground_truth (two COCO JSON "
                                 "files), and ground_truth needs instances")
            if self.masks is not None or self.model is not None or self.benchmarks:
                raise ValueError("instances takes predictions and ground_truth only (no masks, "
                                 "model or benchmarks)")
            return self
        by_files = self.predictions is not None or self.masks is not None
        by_model = self.model is not None or self.benchmarks is not None
        if by_files == by_model:
            raise ValueError("give either predictions and masks, or model and benchmarks")
        if by_files and self.masks is None:
            raise ValueError("masks (--masks) is required with predictions")
        if by_files and self.predictions is None:
            raise ValueError("predictions (--predictions) is required with masks")
        if by_model and (self.model is None or not self.benchmarks):
            raise ValueError("model needs at least one benchmark NAME=IMAGES_URI,MASKS_URI")
        return self


#: The chain's stages' settings models, in pipeline order (from the stage registry).
STAGE_SETTINGS: dict[str, type[StageSettings]] = {name: s.settings for name, s in CHAIN.items()}


def _pair(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


class SyntheticSettings(Settings):
    """``pipeline.synthetic``: synthetic scenes written first (kept when already there)."""
    section: ClassVar[str] = "pipeline.synthetic"

    root: Uri | None = setting(None, "where the scenes go (default: <pipeline.output>/data)")
    n_train: int = setting(32, "training scenes (pseudo-labelled, then trained on)", ge=1)
    n_eval: int = setting(12, "held-out scenes (segmented and evaluated)", ge=1)
    size: Annotated[tuple[int, int], BeforeValidator(_pair)] = setting(
        (96, 128), "H, W of the scenes")
    seed: int = setting(0, "scenes are a pure function of the seed")
    eval_camouflage_fraction: float = setting(0.5, "share of camouflaged held-out scenes",
                                              ge=0.0, le=1.0)


class ChainSettings(Settings):
    """``pipeline:`` (and ``selfment run``): the stages to run in order, and the run's root."""
    section: ClassVar[str] = "pipeline"

    output: Uri | None = setting(
        None, "the run's root: labels/ model/ predictions/ report/ pipeline_summary.json",
        metavar="URI")
    stages: list[Literal[tuple(STAGE_SETTINGS)]] = setting(
        list(STAGE_SETTINGS), "the stages to run (always in pipeline order)", metavar="STAGE")
    synthetic: SyntheticSettings | None = setting(
        None, "write synthetic scenes first and run on them", cli="none")
    force: bool = setting(False, "run every stage, even those recorded complete")

    @field_validator("stages", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("stages")
    @classmethod
    def _in_order(cls, value: list[str]) -> list[str]:
        return [s for s in STAGE_SETTINGS if s in value]


class DemoSettings(Settings):
    """``selfment demo``: synthetic data through the whole chain on a local Ray."""
    positional: ClassVar[tuple[str, ...]] = ("output_dir",)
    section: ClassVar[str] = "demo"

    output_dir: str = setting("selfment_demo", "local folder of the demo's outputs",
                              flag="--output", metavar="DIR", min_length=1)
    n_images: int = setting(32, "training scenes", ge=1)
    n_eval: int = setting(12, "held-out scenes", ge=1)
    image_size: int = setting(224, "backbone input size (a multiple of 16)", gt=0,
                              le=MAX_IMAGE_SIZE)
    epochs: int = setting(3, "training epochs", ge=1)
    workers: int = setting(2, "Ray Train DDP workers (CPU)", ge=1)
    batch_size: int = setting(8, "images per model call and per training step", ge=1)
    weights: str | None = setting(
        None, "hub | random | PATH (default: hub when reachable, else random)")
    backbone: str = setting(DEFAULT_BACKBONE, "timm DINO model name")
    num_cpus: int = setting(2, "CPUs of the in-process Ray", ge=1)
    verbose: bool = setting(False, "show Ray's own output instead of one bar per stage")


class InspectSettings(StageSettings):
    """``selfment inspect``: contact sheets, histogram and HTML page of pseudo-labels."""
    section: ClassVar[str] = "inspect"

    labels: Uri = setting(description="pseudo-label parquet dataset", metavar="URI")
    output: Uri = setting(description="folder for the pictures", metavar="URI")
    create_bucket: bool = create_bucket_setting()
    per_sheet: int = setting(24, "images per contact sheet", ge=1)
    thumb_size: int = setting(128, "pixels per image tile", ge=8)
    max_pixels: int | None = setting(DEFAULT_MAX_PIXELS, "refuse larger images", ge=1)


class ExportCocoSettings(StageSettings):
    """``selfment export-coco``: the ``objects`` of pseudo-labels as COCO instance JSON."""
    positional: ClassVar[tuple[str, ...]] = ("labels", "output")
    section: ClassVar[str] = "export_coco"

    labels: Uri = setting(description="pseudo-label parquet dataset (with an objects column)",
                          metavar="URI")
    output: Uri = setting(description="folder of COCO JSON files, one per shard",
                          metavar="URI")
    create_bucket: bool = create_bucket_setting()
    min_object_confidence: float | None = setting(
        None, "leave out objects whose confidence is below X", ge=0.0, le=1.0, metavar="X")
    shard_size: int = setting(1000, "images per JSON file", ge=1, metavar="N")
    merge: bool = setting(False, "also write all shards as one file, instances.json")


class ImportCheckpointSettings(StageSettings):
    """``selfment import-checkpoint``: an official Selfment head checkpoint → model artifact."""
    section: ClassVar[str] = "import_checkpoint"

    head: str = setting(description="official checkpoint: torch.save({'model_state': ..., "
                                    "'args': ...})", metavar="HEAD.pth", min_length=1)
    output: Uri = setting(description="model artifact folder", metavar="MODEL_URI")
    create_bucket: bool = create_bucket_setting()
    backbone: str | None = setting(None, "timm DINO name (default: from the checkpoint's "
                                         "dino_model_name, e.g. dinov3_vit7b16)")
    weights: str = setting("hub", "backbone weights for segment: hub | random | PATH | URI")
    image_size: int | None = setting(
        None, "inference size (default: twice the checkpoint's img_size, i.e. 1536)", gt=0,
        le=MAX_IMAGE_SIZE)
