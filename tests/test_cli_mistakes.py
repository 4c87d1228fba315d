"""An adversarial user at the command line: every command that reads or writes files, given the
usual mistakes (a missing input, an output under a file or in a read-only folder, the wrong kind
of dataset, a malformed or misspelt config, out-of-range numbers).

The project's rule (README, "Command line"; :mod:`selfment_dist.cli`): a user mistake prints
exactly one line on stderr, ``selfment: error: …``, and exits 2; a traceback is a bug.

Every case runs ``selfment`` in this process (:func:`selfment_dist.cli.main`). No case may start
Ray: a mistake is to be caught before it. Where a command only looks at the mistake after
starting Ray (its check sits after ``ensure_ray``), the case is skipped and says so; the one
exception is ``evaluate``'s inputs, whose mistakes never send work to Ray, so there the
stand-in ``ensure_ray`` lets the command go on (see ``EVALUATE_INPUTS``). A case where the product breaks the rule today is kept as a strict xfail whose
reason says what happens (``BUG: …``): the suite stays green, the bug stays recorded, and the
fix turns the xfail into a failure that asks for the mark to go.

The helper here is not ``cli_output.cli_error_lines``: that one keeps only the ``selfment:`` and
``Traceback`` lines, and this module checks that the error is the *only* line on stderr.
"""
from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mounts import read_only_bind
from selfment_dist import cli

BACKBONE = "vit_small_patch16_224.dino"  # patch 16, 384 channels
ERROR_PREFIX = "selfment: error: "


# ---------------------------------------------------------------------------------------------
# Ray must not be reached

class ReachedRay(Exception):
    """A command got as far as starting Ray: the case is skipped (see the module doc)."""


_PIPELINE_MODULES = ("_internal.ray_runtime", "pseudo_label", "segment", "train", "evaluate",
                     "demo", "chain", "export_coco", "inspect")


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    """``ensure_ray`` (wherever a stage imported it) and ``ray.init`` raise :class:`ReachedRay`.
    Every module is imported before any is patched, so none binds the stand-in for later
    modules of the suite (monkeypatch restores them all)."""
    import ray

    modules = [importlib.import_module(f"selfment_dist.pipeline.{name}")
               for name in _PIPELINE_MODULES]

    def refuse(*args, **kwargs):
        raise ReachedRay("ensure_ray / ray.init")

    for module in modules:
        if hasattr(module, "ensure_ray"):
            monkeypatch.setattr(module, "ensure_ray", refuse)
    monkeypatch.setattr(ray, "init", refuse)


def run_cli(argv: list[str], capsys, what: str = "") -> tuple[int | str | None, list[str]]:
    """``selfment argv`` in this process: (exit status, every line it printed on stderr).
    A command that reaches Ray skips the test (``what``: the mistake, for the skip's reason);
    any other exception propagates (a bug: the test fails, or is an xfail)."""
    try:
        code = cli.main(argv)
    except SystemExit as exc:
        code = exc.code
    except ReachedRay:
        capsys.readouterr()
        pytest.skip(f"{what or argv[0]}: reaches Ray before this mistake is looked at")
    return code, capsys.readouterr().err.splitlines()


def assert_one_line_error(argv: list[str], capsys, what: str = "") -> str:
    """The rule: exit status 2 and exactly one line on stderr, ``selfment: error: …``."""
    code, lines = run_cli(argv, capsys, what)
    assert (code, len(lines)) == (2, 1) and lines[0].startswith(ERROR_PREFIX), (code, lines)
    return lines[0]


# ---------------------------------------------------------------------------------------------
# What the mistakes are made of (written once per module: the model stack is imported once)

def _write_labels(folder: Path, image: Path, *, objects: bool = False,
                  drop: tuple[str, ...] = (), manifest: str | None = "ok") -> Path:
    """A one-row pseudo-label dataset as `selfment pseudo-label` writes it (the contract's
    schema, a part named like the stage's, a complete manifest), less the columns ``drop``."""
    from selfment_dist.io.schema import QUALITY_COLUMNS, pseudo_label_schema
    from selfment_dist.stages import MANIFEST_NAME

    folder.mkdir(parents=True)
    grid = np.zeros((2, 2), bool)
    grid[0, 0] = True
    row = {"key": "a", "source": str(image), "width": 32, "height": 32, "grid_h": 2,
           "grid_w": 2, "mask": np.packbits(grid).tobytes(), "fg_fraction": 0.25,
           "error": None, "error_kind": None, **dict.fromkeys(QUALITY_COLUMNS, 0.5),
           "ipo_converged": True, "no_object": False}
    if objects:
        row["objects"] = None  # the column is there; no object in this row
    table = pa.Table.from_pylist([row], schema=pseudo_label_schema(objects=objects))
    table = table.drop_columns(list(drop))
    pq.write_table(table, folder / "part-0a1b2c-00000.parquet")
    if manifest == "ok":
        (folder / MANIFEST_NAME).write_text(json.dumps(
            {"status": "complete", "config": {"backbone": BACKBONE, "weights": "random",
                                              "image_size": 32, "no_object_threshold": 0.1}}))
    elif manifest is not None:
        (folder / MANIFEST_NAME).write_text(manifest)
    return folder


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> SimpleNamespace:
    """Paths (as strings) of the things the mistakes are made of."""
    import torch

    from selfment_dist.model.artifact import save_artifact
    from selfment_dist.model.head import PatchHead

    root = tmp_path_factory.mktemp("mistakes")
    p = SimpleNamespace(root=str(root))
    images = root / "images"
    images.mkdir()
    image = images / "a.png"
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(image)
    masks = root / "masks"
    masks.mkdir()
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(masks / "a.png")
    (root / "no_images").mkdir()
    (root / "no_images" / "readme.md").write_text("not an image")
    afile = root / "afile"
    afile.write_text("a regular file")
    p.images, p.image, p.masks, p.no_images = str(images), str(image), str(masks), \
        str(root / "no_images")
    p.afile, p.under_file = str(afile), str(afile / "out")
    p.missing = str(root / "does-not-exist")
    fresh = iter(range(10**6))
    # A new output path on every call: no case sees what another one may have written.
    p.fresh = lambda name: str(root / "outputs" / f"{name}-{next(fresh)}")

    p.labels = str(_write_labels(root / "labels", image))
    p.labels_objects = str(_write_labels(root / "labels_objects", image, objects=True))
    p.labels_no_quality = str(_write_labels(root / "labels_no_quality", image,
                                            drop=("confidence", "no_object")))
    p.labels_no_mask = str(_write_labels(root / "labels_no_mask", image, drop=("mask",)))
    p.labels_no_manifest = str(_write_labels(root / "labels_no_manifest", image, manifest=None))
    p.labels_bad_manifest = str(_write_labels(root / "labels_bad_manifest", image,
                                              manifest="{not json"))
    p.labels_part = str(Path(p.labels) / "part-0a1b2c-00000.parquet")  # a file, not the folder
    corrupt = _write_labels(root / "labels_corrupt_part", image, objects=True)
    (corrupt / "part-0a1b2c-00000.parquet").write_bytes(b"PAR1 truncated, not parquet")
    p.labels_corrupt_part = str(corrupt)

    model = root / "model"
    save_artifact(str(model), PatchHead(384, 16),
                  {"backbone": BACKBONE, "weights": "random", "image_size": 32})
    p.model = str(model)

    torch.manual_seed(0)
    official = {"proj.0.weight": torch.randn(16, 384), "proj.0.bias": torch.randn(16),
                "proj.2.weight": torch.randn(16, 16), "proj.2.bias": torch.randn(16),
                "classifier.weight": torch.randn(2, 16), "classifier.bias": torch.randn(2)}
    head = root / "head.pth"
    torch.save({"epoch": 1, "model_state": official,
                "args": {"dino_model_name": "dinov3_vits16", "img_size": 32}}, head)
    p.head = str(head)
    p.not_a_checkpoint = str(root / "garbage.pth")
    Path(p.not_a_checkpoint).write_bytes(b"this is not a torch checkpoint")

    coco = {"images": [{"id": 1, "file_name": "a.png", "width": 32, "height": 32}],
            "annotations": [], "categories": [{"id": 1, "name": "object"}]}
    p.coco = str(root / "coco.json")
    Path(p.coco).write_text(json.dumps(coco))
    p.json_not_coco = str(root / "list.json")
    Path(p.json_not_coco).write_text("[1, 2, 3]")
    p.not_json = str(root / "not.json")
    Path(p.not_json).write_text("{ this is not json")

    configs = {
        "syntax": "SECTION: {input: [x\n",
        "unknown_key": "SECTION: {bogus_option: 1}\n",
        "unknown_top": "bogus_top_level: 1\n",
        "not_mapping": "- just\n- a list\n",
        "section_not_mapping": "SECTION: 3\n",
        "python_tag": "SECTION: !!python/object/apply:os.system ['echo hi']\n",
    }
    p.config = {}
    for name, text in configs.items():
        for section in ("pseudo_label", "train", "segment", "evaluate", "inspect",
                        "export_coco", "import_checkpoint", "demo", "pipeline"):
            path = root / "configs" / f"{name}-{section}.yaml"
            path.parent.mkdir(exist_ok=True)
            path.write_text(text.replace("SECTION", section))
            p.config[name, section] = str(path)
    p.config_binary = str(root / "configs" / "binary.yaml")
    Path(p.config_binary).write_bytes(b"\xff\xfe\x00garbage\x80\x81")
    p.config_dir = str(root / "configs")
    return p


@pytest.fixture(scope="module")
def ro(tmp_path_factory) -> str:
    """A folder this process cannot write to: chmod 0o500 for a normal user; as root (whom
    chmod does not stop) a read-only bind mount, where mounting is allowed (else skipped)."""
    base = tmp_path_factory.mktemp("read_only")
    if os.geteuid() != 0:
        folder = base / "ro"
        folder.mkdir()
        folder.chmod(0o500)
        yield str(folder)
        folder.chmod(0o700)
        return
    (base / "src").mkdir()
    with read_only_bind(base / "src", base / "ro") as folder:
        yield str(folder)


# ---------------------------------------------------------------------------------------------
# The cases: (command, mistake) → argv, from the workspace ``w`` and the read-only folder ``r``

Argv = Callable[[SimpleNamespace, str], list[str]]


def _pl(w, output=None, *extra, inputs=None):
    return ["pseudo-label", "--input", *(inputs or [w.images]),
            "--output", output or w.fresh("pl"), "--backbone", BACKBONE, "--weights", "random",
            "--image-size", "32", *extra]


def _train(w, labels=None, output=None, *extra):
    return ["train", "--labels", labels or w.labels, "--output", output or w.fresh("train"),
            *extra]


def _segment(w, model=None, output=None, *extra, inputs=None):
    return ["segment", "--model", model or w.model, "--input", *(inputs or [w.images]),
            "--output", output or w.fresh("seg"), *extra]


def _eval(w, predictions=None, masks=None, output=None, *extra):
    return ["evaluate", "--predictions", predictions or w.masks, "--masks", masks or w.masks,
            "--output", output or w.fresh("eval"), *extra]


def _instances(w, predictions=None, ground_truth=None, output=None, *extra):
    return ["evaluate", "--instances", "--predictions", predictions or w.coco,
            "--ground-truth", ground_truth or w.coco, "--output", output or w.fresh("inst"),
            *extra]


def _inspect(w, labels=None, output=None, *extra):
    return ["inspect", "--labels", labels or w.labels, "--output", output or w.fresh("insp"),
            *extra]


def _coco(w, labels=None, output=None, *extra):
    return ["export-coco", "--labels", labels or w.labels_objects,
            "--output", output or w.fresh("coco"), *extra]


def _import(w, head=None, output=None, *extra):
    return ["import-checkpoint", "--head", head or w.head, "--output", output or w.fresh("imp"),
            "--backbone", BACKBONE, "--weights", "random", *extra]


def _demo(w, output=None, *extra):
    return ["demo", "--output", output or w.fresh("demo"), "--weights", "random",
            "--n-images", "1", "--n-eval", "1", "--image-size", "32", "--epochs", "1", *extra]


def _run_config(w, name: str, output: str) -> str:
    """A `selfment run` config for the pseudo-label stage alone, rooted at ``output``."""
    path = Path(w.root) / "configs" / f"run-{name}.yaml"
    path.write_text(f"pipeline: {{output: {json.dumps(output)}, stages: [pseudo_label]}}\n"
                    f"pseudo_label: {{input: [{json.dumps(w.images)}], weights: random, "
                    f"backbone: {BACKBONE}, image_size: 32}}\n")
    return str(path)


def _plan(stage, *extra):
    return ["plan", stage, "--nodes", "CPU=4", *extra]


def _config_cases(command: str, section: str, base: Argv) -> dict[str, Argv]:
    """A command's config mistakes: missing, malformed, a misspelt option, a folder, binary."""
    return {
        f"{command}: config missing": lambda w, r: [*base(w, r), "--config", w.missing + ".yaml"],
        f"{command}: config YAML syntax": lambda w, r: [*base(w, r), "--config",
                                                         w.config["syntax", section]],
        f"{command}: config unknown key": lambda w, r: [*base(w, r), "--config",
                                                         w.config["unknown_key", section]],
        f"{command}: config unknown top-level key": lambda w, r: [
            *base(w, r), "--config", w.config["unknown_top", section]],
        f"{command}: config not a mapping": lambda w, r: [*base(w, r), "--config",
                                                           w.config["not_mapping", section]],
        f"{command}: config section not a mapping": lambda w, r: [
            *base(w, r), "--config", w.config["section_not_mapping", section]],
        f"{command}: config python tag": lambda w, r: [*base(w, r), "--config",
                                                        w.config["python_tag", section]],
        f"{command}: config is a folder": lambda w, r: [*base(w, r), "--config", w.config_dir],
        f"{command}: config is binary": lambda w, r: [*base(w, r), "--config", w.config_binary],
    }


CASES: dict[str, Argv] = {
    # -- pseudo-label ---------------------------------------------------------------------
    "pseudo-label: input missing": lambda w, r: _pl(w, inputs=[w.missing]),
    "pseudo-label: input folder without images": lambda w, r: _pl(w, inputs=[w.no_images]),
    "pseudo-label: input is an explicit non-image file": lambda w, r: _pl(w, inputs=[w.afile]),
    "pseudo-label: input is a pseudo-label dataset": lambda w, r: _pl(w, inputs=[w.labels]),
    "pseudo-label: output is a file": lambda w, r: _pl(w, w.afile),
    "pseudo-label: output under a file": lambda w, r: _pl(w, w.under_file),
    "pseudo-label: output read-only": lambda w, r: _pl(w, r + "/out"),
    "pseudo-label: weights missing": lambda w, r: [*_pl(w), "--weights", w.missing + ".pth"],
    "pseudo-label: weights not a checkpoint": lambda w, r: [*_pl(w), "--weights",
                                                            w.not_a_checkpoint],
    "pseudo-label: image size 0": lambda w, r: [*_pl(w), "--image-size", "0"],
    "pseudo-label: image size huge": lambda w, r: [*_pl(w), "--image-size", "1000000"],
    "pseudo-label: image size not a patch multiple": lambda w, r: [*_pl(w), "--image-size", "33"],
    "pseudo-label: tau 1.5": lambda w, r: [*_pl(w), "--tau", "1.5"],
    "pseudo-label: max-objects 0": lambda w, r: [*_pl(w), "--max-objects", "0"],
    "pseudo-label: max-objects 65": lambda w, r: [*_pl(w), "--max-objects", "65"],
    "pseudo-label: min-object-confidence without objects": lambda w, r: [
        *_pl(w), "--min-object-confidence", "0.5"],
    "pseudo-label: num-gpus-per-actor 2": lambda w, r: [*_pl(w), "--num-gpus-per-actor", "2"],
    "pseudo-label: batch size -1": lambda w, r: [*_pl(w), "--batch-size", "-1"],
    "pseudo-label: storage option without =": lambda w, r: [*_pl(w), "--storage-option", "anon"],
    **_config_cases("pseudo-label", "pseudo_label", lambda w, r: _pl(w)),
    # -- train ----------------------------------------------------------------------------
    "train: labels missing": lambda w, r: _train(w, w.missing),
    "train: labels are an image folder": lambda w, r: _train(w, w.images),
    "train: labels are one parquet file": lambda w, r: _train(w, w.labels_part),
    "train: labels without a manifest": lambda w, r: _train(w, w.labels_no_manifest),
    "train: labels with a corrupt manifest": lambda w, r: _train(w, w.labels_bad_manifest),
    "train: labels without the mask column": lambda w, r: _train(w, w.labels_no_mask),
    "train: labels are a model": lambda w, r: _train(w, w.model),
    "train: labels part is not parquet": lambda w, r: _train(w, w.labels_corrupt_part),
    "train: output holds a model not made by train": lambda w, r: _train(w, None, w.model),
    "train: output is a file": lambda w, r: _train(w, None, w.afile),
    "train: output under a file": lambda w, r: _train(w, None, w.under_file),
    "train: output read-only": lambda w, r: _train(w, None, r + "/out"),
    "train: epochs 0": lambda w, r: _train(w, None, None, "--epochs", "0"),
    "train: lr 0": lambda w, r: _train(w, None, None, "--lr", "0"),
    "train: workers 0": lambda w, r: _train(w, None, None, "--workers", "0"),
    "train: keep-fraction 1.5": lambda w, r: _train(w, None, None, "--keep-fraction", "1.5"),
    "train: min-confidence with keep-fraction": lambda w, r: _train(
        w, None, None, "--min-confidence", "0.1", "--keep-fraction", "0.5"),
    "train: resources-per-worker not JSON": lambda w, r: _train(
        w, None, None, "--resources-per-worker", "{CPU: 4"),
    "train: resources-per-worker GPU 2": lambda w, r: _train(
        w, None, None, "--use-gpu", "--resources-per-worker", '{"GPU": 2}'),
    "train: resources-per-worker a list": lambda w, r: _train(
        w, None, None, "--resources-per-worker", "[1, 2]"),
    "train: collective timeout 1": lambda w, r: _train(w, None, None, "--collective-timeout-s",
                                                       "1"),
    "train: features stored without a features column": lambda w, r: _train(
        w, None, None, "--features", "stored"),
    **_config_cases("train", "train", lambda w, r: _train(w)),
    # -- segment --------------------------------------------------------------------------
    "segment: model missing": lambda w, r: _segment(w, w.missing),
    "segment: model is a labels dataset": lambda w, r: _segment(w, w.labels),
    "segment: model is a file": lambda w, r: _segment(w, w.afile),
    "segment: input missing": lambda w, r: _segment(w, inputs=[w.missing]),
    "segment: input folder without images": lambda w, r: _segment(w, inputs=[w.no_images]),
    "segment: input is a pseudo-label parquet": lambda w, r: _segment(w, inputs=[w.labels_part]),
    "segment: output is a file": lambda w, r: _segment(w, None, w.afile),
    "segment: output under a file": lambda w, r: _segment(w, None, w.under_file),
    "segment: output read-only": lambda w, r: _segment(w, None, r + "/out"),
    "segment: image size 0": lambda w, r: [*_segment(w), "--image-size", "0"],
    "segment: image size not a patch multiple": lambda w, r: [*_segment(w), "--image-size", "33"],
    "segment: overlays with parquet": lambda w, r: [*_segment(w), "--format", "parquet",
                                                    "--overlays"],
    "segment: batch size 0": lambda w, r: [*_segment(w), "--batch-size", "0"],
    **_config_cases("segment", "segment", lambda w, r: _segment(w)),
    # -- evaluate (folders) ---------------------------------------------------------------
    "evaluate: output is a file": lambda w, r: _eval(w, None, None, w.afile),
    "evaluate: output under a file": lambda w, r: _eval(w, None, None, w.under_file),
    "evaluate: output read-only": lambda w, r: _eval(w, None, None, r + "/out"),
    "evaluate: num-shards 0": lambda w, r: [*_eval(w), "--num-shards", "0"],
    "evaluate: empty name": lambda w, r: [*_eval(w), "--name", ""],
    **_config_cases("evaluate", "evaluate", lambda w, r: _eval(w)),
    # -- evaluate --instances -------------------------------------------------------------
    "evaluate --instances: predictions missing": lambda w, r: _instances(w, w.missing + ".json"),
    "evaluate --instances: ground truth missing": lambda w, r: _instances(
        w, None, w.missing + ".json"),
    "evaluate --instances: predictions not JSON": lambda w, r: _instances(w, w.not_json),
    "evaluate --instances: predictions are a PNG": lambda w, r: _instances(w, w.image),
    "evaluate --instances: predictions are a folder": lambda w, r: _instances(w, w.images),
    "evaluate --instances: predictions are a parquet file": lambda w, r: _instances(
        w, w.labels_part),
    "evaluate --instances: predictions JSON but not COCO": lambda w, r: _instances(
        w, w.json_not_coco),
    "evaluate --instances: ground truth JSON but not COCO": lambda w, r: _instances(
        w, None, w.json_not_coco),
    "evaluate --instances: output is a file": lambda w, r: _instances(w, None, None, w.afile),
    "evaluate --instances: output under a file": lambda w, r: _instances(w, None, None,
                                                                        w.under_file),
    "evaluate --instances: output read-only": lambda w, r: _instances(w, None, None,
                                                                     r + "/out"),
    # -- inspect --------------------------------------------------------------------------
    "inspect: labels missing": lambda w, r: _inspect(w, w.missing),
    "inspect: labels are an image folder": lambda w, r: _inspect(w, w.images),
    # (labels given as one part file: inspect reads it as a dataset of one part)
    "inspect: labels without confidence": lambda w, r: _inspect(w, w.labels_no_quality),
    "inspect: labels with a corrupt manifest": lambda w, r: _inspect(w, w.labels_bad_manifest),
    "inspect: labels part is not parquet": lambda w, r: _inspect(w, w.labels_corrupt_part),
    "inspect: labels are a model": lambda w, r: _inspect(w, w.model),
    "inspect: output is a file": lambda w, r: _inspect(w, None, w.afile),
    "inspect: output under a file": lambda w, r: _inspect(w, None, w.under_file),
    "inspect: output read-only": lambda w, r: _inspect(w, None, r + "/out"),
    "inspect: per-sheet 0": lambda w, r: [*_inspect(w), "--per-sheet", "0"],
    "inspect: thumb-size 4": lambda w, r: [*_inspect(w), "--thumb-size", "4"],
    "inspect: thumb-size 10": lambda w, r: [*_inspect(w), "--thumb-size", "10"],
    **_config_cases("inspect", "inspect", lambda w, r: _inspect(w)),
    # -- export-coco ----------------------------------------------------------------------
    "export-coco: labels missing": lambda w, r: _coco(w, w.missing),
    "export-coco: labels without objects": lambda w, r: _coco(w, w.labels),
    "export-coco: labels are an image folder": lambda w, r: _coco(w, w.images),
    "export-coco: labels are one parquet file": lambda w, r: _coco(w, w.labels_part),
    "export-coco: labels part is not parquet": lambda w, r: _coco(w, w.labels_corrupt_part),
    "export-coco: output is a file": lambda w, r: _coco(w, None, w.afile),
    "export-coco: output under a file": lambda w, r: _coco(w, None, w.under_file),
    "export-coco: output read-only": lambda w, r: _coco(w, None, r + "/out"),
    "export-coco: min-object-confidence 2": lambda w, r: [*_coco(w), "--min-object-confidence",
                                                          "2"],
    "export-coco: shard size 0": lambda w, r: [*_coco(w), "--shard-size", "0"],
    **_config_cases("export-coco", "export_coco", lambda w, r: _coco(w)),
    # -- import-checkpoint ----------------------------------------------------------------
    "import-checkpoint: head missing": lambda w, r: _import(w, w.missing + ".pth"),
    "import-checkpoint: head not a checkpoint": lambda w, r: _import(w, w.not_a_checkpoint),
    "import-checkpoint: head is a folder": lambda w, r: _import(w, w.images),
    "import-checkpoint: head is a model artifact file": lambda w, r: _import(
        w, w.model + "/head.safetensors"),
    "import-checkpoint: output is a file": lambda w, r: _import(w, None, w.afile),
    "import-checkpoint: output under a file": lambda w, r: _import(w, None, w.under_file),
    "import-checkpoint: output read-only": lambda w, r: _import(w, None, r + "/out"),
    "import-checkpoint: image size 0": lambda w, r: [*_import(w), "--image-size", "0"],
    "import-checkpoint: image size not a patch multiple": lambda w, r: [
        *_import(w), "--image-size", "33"],
    "import-checkpoint: backbone unknown": lambda w, r: [*_import(w), "--backbone", "vit_nope"],
    **_config_cases("import-checkpoint", "import_checkpoint", lambda w, r: _import(w)),
    # -- demo -----------------------------------------------------------------------------
    "demo: output is a file": lambda w, r: _demo(w, w.afile),
    "demo: output under a file": lambda w, r: _demo(w, w.under_file),
    "demo: output read-only": lambda w, r: _demo(w, r + "/out"),
    "demo: output a foreign non-empty folder": lambda w, r: _demo(w, w.images),
    "demo: output an object store": lambda w, r: _demo(w, "s3://bucket/demo"),
    "demo: n-images 0": lambda w, r: [*_demo(w), "--n-images", "0"],
    "demo: image size 0": lambda w, r: [*_demo(w), "--image-size", "0"],
    **_config_cases("demo", "demo", lambda w, r: _demo(w)),
    # -- run (the chain) ------------------------------------------------------------------
    "run: no config": lambda w, r: ["run"],
    "run: pipeline.output is a file": lambda w, r: [
        "run", "--config", _run_config(w, "is-file", w.afile)],
    "run: pipeline.output under a file": lambda w, r: [
        "run", "--config", _run_config(w, "under-file", w.under_file)],
    "run: pipeline.output read-only": lambda w, r: [
        "run", "--config", _run_config(w, "read-only", r + "/out")],
    "run: unknown stage": lambda w, r: [
        "run", "--config", _run_config(w, "stage", w.fresh("run")), "--stages", "nope"],
    **_config_cases("run", "pipeline", lambda w, r: ["run"]),
    # -- plan -----------------------------------------------------------------------------
    "plan: config missing": lambda w, r: [*_plan("pseudo-label"), "--config",
                                          w.missing + ".yaml"],
    "plan: config YAML syntax": lambda w, r: [*_plan("pseudo-label"), "--config",
                                              w.config["syntax", "pseudo_label"]],
    "plan: config unknown key": lambda w, r: [*_plan("train"), "--config",
                                              w.config["unknown_key", "train"]],
    "plan: config is a folder": lambda w, r: [*_plan("segment"), "--config", w.config_dir],
    "plan: config is binary": lambda w, r: [*_plan("segment"), "--config", w.config_binary],
    "plan: config not a mapping": lambda w, r: [*_plan("evaluate"), "--config",
                                                w.config["not_mapping", "evaluate"]],
    "plan: nodes garbage": lambda w, r: ["plan", "pseudo-label", "--nodes", "lots"],
    "plan: nodes negative": lambda w, r: ["plan", "pseudo-label", "--nodes", "CPU=-4"],
    "plan: rate garbage": lambda w, r: [*_plan("segment"), "--rate", "fast"],
    "plan: image size 0": lambda w, r: [*_plan("pseudo-label"), "--image-size", "0"],
    "plan: train workers 0": lambda w, r: [*_plan("train"), "--workers", "0"],
}

#: Cases where the product breaks the rule today (strict xfails): case → what happens, and
#: where the exception that escapes is raised.
#: Cases the product gets wrong today (name → what happens): strict xfails, so that a fix asks
#: for its mark to go. Empty: every case above holds.
BUGS: dict[str, str] = {}


def _params(cases: dict[str, Argv], bugs: dict[str, str]):
    unknown = set(bugs) - set(cases)
    assert not unknown, f"bugs recorded for no case: {sorted(unknown)}"
    for name, argv in cases.items():
        marks = ([pytest.mark.xfail(strict=True, reason=f"BUG: {bugs[name]}")]
                 if name in bugs else [])
        yield pytest.param(argv, id=name, marks=marks)


def _read_only(request) -> str:
    """The read-only folder for the cases about one (the fixture mounts it once per module)."""
    return (request.getfixturevalue("ro") if "read-only" in request.node.callspec.id
            else "/nonexistent-read-only-folder")


@pytest.mark.parametrize("argv", _params(CASES, BUGS))
def test_a_mistake_is_one_line_and_exit_2(argv: Argv, ws, request, capsys):
    assert_one_line_error(argv(ws, _read_only(request)), capsys, request.node.callspec.id)


# ---------------------------------------------------------------------------------------------
# evaluate: it starts Ray before it looks at its inputs

#: `selfment evaluate`'s inputs, looked at only once Ray is up (``run_evaluate`` calls
#: ``ensure_ray`` before listing the folders or reading the model). With these mistakes nothing
#: is ever sent to Ray (no pair to score; the model fails in the driver), so the stand-in lets
#: ``ensure_ray`` through here: the outcome is the one a user sees, less Ray's start-up.
EVALUATE_INPUTS: dict[str, Argv] = {
    "evaluate: predictions missing": lambda w, r: _eval(w, w.missing),
    "evaluate: masks missing": lambda w, r: _eval(w, None, w.missing),
    "evaluate: predictions are a file": lambda w, r: _eval(w, w.afile),
    "evaluate: masks are a file": lambda w, r: _eval(w, None, w.afile),
    "evaluate: benchmark model missing": lambda w, r: [
        "evaluate", "--model", w.missing, "--benchmark", f"B={w.images},{w.masks}",
        "--output", w.fresh("bench")],
    "evaluate: benchmark model is a labels dataset": lambda w, r: [
        "evaluate", "--model", w.labels, "--benchmark", f"B={w.images},{w.masks}",
        "--output", w.fresh("bench")],
    "evaluate: benchmark images missing": lambda w, r: [
        "evaluate", "--model", w.model, "--benchmark", f"B={w.missing},{w.masks}",
        "--output", w.fresh("bench")],
}
EVALUATE_BUGS: dict[str, str] = {}


@pytest.mark.parametrize("argv", _params(EVALUATE_INPUTS, EVALUATE_BUGS))
def test_evaluate_input_mistakes_are_one_line_and_exit_2(argv: Argv, ws, monkeypatch, request,
                                                          capsys):
    evaluate = importlib.import_module("selfment_dist.pipeline.evaluate")
    monkeypatch.setattr(evaluate, "ensure_ray", lambda *args, **kwargs: False)
    assert_one_line_error(argv(ws, "/nonexistent-read-only-folder"), capsys,
                          request.node.callspec.id)


# ---------------------------------------------------------------------------------------------
# Control: without the mistake, each command's base line is accepted

BASES: dict[str, Argv] = {
    "pseudo-label": lambda w, r: _pl(w),
    "train": lambda w, r: _train(w),
    "segment": lambda w, r: _segment(w),
    "evaluate": lambda w, r: _eval(w),
    "evaluate --model": lambda w, r: ["evaluate", "--model", w.model, "--benchmark",
                                      f"B={w.images},{w.masks}", "--output", w.fresh("bench")],
    "evaluate --instances": lambda w, r: _instances(w),
    "inspect": lambda w, r: _inspect(w),
    "export-coco": lambda w, r: _coco(w),
    "import-checkpoint": lambda w, r: _import(w),
    "demo": lambda w, r: _demo(w),
    "run": lambda w, r: ["run", "--config", _run_config(w, "ok", w.fresh("run"))],
    "plan": lambda w, r: _plan("pseudo-label", "--image-size", "224"),
}


@pytest.mark.parametrize("argv", [pytest.param(a, id=n) for n, a in BASES.items()])
def test_the_commands_without_a_mistake_get_past_their_checks(argv: Argv, ws, capsys):
    """What the cases above change is the only mistake: each base command line either runs
    to the end (no Ray needed) or gets as far as starting Ray."""
    try:
        code = cli.main(argv(ws, "/nonexistent-read-only-folder"))
    except ReachedRay:
        return
    except SystemExit as exc:
        code = exc.code
    assert code == 0, capsys.readouterr().err


def test_a_malformed_ground_truth_names_its_file(ws, tmp_path, capsys):
    """Ground truth that parses as COCO-like JSON but has the wrong shape is refused by the
    evaluation, which holds documents, not paths: the line still names the file."""
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps({"images": [{"id": "x"}], "annotations": []}))
    line = assert_one_line_error(_instances(ws, None, str(gt)), capsys)
    assert "ground truth: images[0]" in line and str(gt) in line
