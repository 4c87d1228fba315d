"""docs/reproducing.md, run: its recipe commands, end to end, on synthetic data with a small
stand-in backbone (random ViT-S/16 weights at 32 px instead of the 7B checkpoint, two of the nine
benchmarks, one CPU training worker). The commands are read from the document itself, so the
document and this test cannot drift apart; only the setup values and a few scale-down flags
(`--model-workers tasks`, batch sizes) are this test's.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from selfment_dist.cli import main as cli_main
from selfment_dist.data.synthetic import write_scenes
from selfment_dist.evaluation.reports import STANDARD_BENCHMARKS

DOC = Path(__file__).resolve().parents[1] / "docs" / "reproducing.md"
KEPT = ("ECSSD", "CAMO")  # one SOD and one COD benchmark: each is one more segment run
# Scale-down flags per subcommand: one machine with 2 CPUs instead of GPU nodes.
SCALE_DOWN = {"pseudo-label": ["--model-workers", "tasks", "--batch-size", "4", "--no-progress"],
              "evaluate": ["--model-workers", "tasks", "--batch-size", "4"]}


def blocks() -> dict[str, str]:
    """The document's bash blocks by their first line (``# setup: …`` / ``# recipe: …``)."""
    found = re.findall(r"```bash\n(.*?)```", DOC.read_text(), flags=re.S)
    return {b.splitlines()[0].lstrip("# ").strip(): b for b in found}


def commands(block: str) -> list[str]:
    """The block's command lines, continuations joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", block)
    return [line.strip() for line in text.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def sourced(block: str, env: dict[str, str]) -> dict[str, str]:
    """The environment after bash runs ``block`` (a setup block of exports)."""
    out = subprocess.run(["bash", "-c", block + "\nenv -0"], env=env, check=True,
                         capture_output=True, text=True, timeout=30).stdout
    return dict(item.split("=", 1) for item in out.split("\0") if "=" in item)


def test_the_paper_setup_names_the_7b_backbone_and_every_benchmark():
    found = blocks()
    paper = sourced(found["setup: the paper's setting"], {"PATH": os.environ["PATH"]})
    assert paper["BACKBONE"] == "vit_7b_patch16_dinov3.lvd1689m"
    assert "dinov3_vit7b16" in paper["WEIGHTS"] and paper["SIZE"] == "768"
    assert paper["WORKERS"] == "8" and paper["GPU"] == "--use-gpu"
    bench = paper["BENCH"]
    flags = shlex.split(paper["BENCHMARKS"])
    named = dict(f.split("=", 1) for f in flags if f != "--benchmark")
    assert set(named) == set(STANDARD_BENCHMARKS)
    for name, entry in STANDARD_BENCHMARKS.items():
        assert named[name] == f"{bench}/{name}/{entry['images']},{bench}/{name}/{entry['masks']}"
    cheap = found["setup: ViT-S variant, NOT the paper's setting"]
    assert "vit_small_patch16_dinov3" in cheap
    for recipe in ("recipe: published head", "recipe: train"):
        assert "--save-features" not in found[recipe]
    assert "--features backbone" in found["recipe: train"]


def _official_head(path: Path) -> None:
    """A head checkpoint in the official train.py's layout, for the stand-in's 384-wide features."""
    g = torch.Generator().manual_seed(0)
    state = {"proj.0.weight": torch.randn(128, 384, generator=g) * 0.05,
             "proj.0.bias": torch.zeros(128),
             "proj.2.weight": torch.randn(128, 128, generator=g) * 0.05,
             "proj.2.bias": torch.zeros(128),
             "classifier.weight": torch.randn(2, 128, generator=g), "classifier.bias": torch.zeros(2)}
    torch.save({"epoch": 3, "model_state": state,
                "args": {"dino_model_name": "dinov3_vits16", "img_size": 16}}, path)


def _benchmark(root: Path, name: str, seed: int) -> None:
    """Two synthetic scenes in the benchmark's own folder layout."""
    entry = STANDARD_BENCHMARKS[name]
    write_scenes(str(root / "tmp"), 2, seed=seed, size=(40, 48))
    for kind, folder in (("images", entry["images"]), ("masks", entry["masks"])):
        target = root / name / folder
        target.parent.mkdir(parents=True, exist_ok=True)
        (root / "tmp" / kind).rename(target)


@pytest.mark.slow  # four CLI stages and three segment runs: ~2-3 minutes on 2 CPUs
def test_the_recipe_runs_end_to_end_with_a_small_stand_in(ray_local, tmp_path, monkeypatch,
                                                         capsys):
    found = blocks()
    bench, run = tmp_path / "bench", tmp_path / "run"
    for i, name in enumerate(KEPT):
        _benchmark(bench, name, seed=10 + i)
    write_scenes(str(tmp_path / "duts_tr"), 6, seed=3, size=(48, 64))
    _official_head(tmp_path / "selfment_head.pth")
    paper = sourced(found["setup: the paper's setting"], {"PATH": os.environ["PATH"]})
    kept = [f"--benchmark {f.replace(paper['BENCH'], str(bench))}"
            for f in shlex.split(paper["BENCHMARKS"]) if f.split("=", 1)[0] in KEPT]
    # The stand-in: everything the setup block sets, at a tiny scale.
    env = {"BACKBONE": "vit_small_patch16_dinov3.lvd1689m", "WEIGHTS": "random",
           "HEAD": str(tmp_path / "selfment_head.pth"),
           "TRAIN_IMAGES": str(tmp_path / "duts_tr" / "images"),
           "BENCH": str(bench), "RUN": str(run), "SIZE": "32", "EPOCHS": paper["EPOCHS"],
           "WORKERS": "1", "GPU": "", "BENCHMARKS": " ".join(kept)}
    assert set(env) <= set(paper)  # the setup block sets each of these
    for key, value in env.items():
        monkeypatch.setenv(key, value)

    for recipe in ("recipe: published head", "recipe: train"):
        for line in commands(found[recipe]):
            argv = shlex.split(os.path.expandvars(line))
            assert argv[0] == "selfment", line
            argv = argv[1:] + SCALE_DOWN.get(argv[1], [])
            assert cli_main(argv) == 0, argv
    capsys.readouterr()

    published = json.loads((run / "published" / "model.json").read_text())
    assert published["imported_from"]["epoch"] == 3 and published["inference_image_size"] == 32
    trained = json.loads((run / "model" / "model.json").read_text())
    assert trained["training"]["epochs"] == int(paper["EPOCHS"])
    assert trained["training"]["train_rows"] == 6  # every row, flagged or not
    for report in ("report-published", "report"):
        metrics = json.loads((run / report / "metrics.json").read_text())
        assert set(metrics["datasets"]) == set(KEPT)
        for entry in metrics["datasets"].values():
            assert entry["n_images"] == 2
            assert all(np.isfinite(v) for v in entry["scores"].values())
        assert metrics["config"]["exif_orientation"] is False
