"""The command line: options, config files (command line wins) and dispatch to the pipelines."""
from __future__ import annotations

import subprocess
import sys

import pytest

from selfment_dist import cli


@pytest.fixture
def calls(monkeypatch):
    """Record what each command would call instead of running a pipeline: the settings that
    were set (on the command line or in the config), by name."""
    seen = []

    def fake_target(command):
        def run(settings, **_):
            seen.append((command, {k: getattr(settings, k) for k in settings.model_fields_set}))
            return {"ok": True}
        return run

    monkeypatch.setattr(cli, "_target", fake_target)
    return seen


def test_pseudo_label_options_reach_the_pipeline(calls):
    assert cli.main(["pseudo-label", "--input", "a/", "s3://b/x.tar", "--output", "s3://o",
                     "--weights", "random", "--image-size", "224", "--precision", "bf16",
                     "--storage-option", "endpoint_url=http://127.0.0.1:9", "--non-binary-graph"]) == 0
    (command, kwargs), = calls
    assert command == "pseudo-label"
    assert kwargs == {"inputs": ["a/", "s3://b/x.tar"], "output": "s3://o", "weights": "random",
                      "image_size": 224, "precision": "bf16", "binary_graph": False,
                      "storage_options": {"endpoint_url": "http://127.0.0.1:9"}}


def test_unset_options_are_left_to_the_pipeline_defaults(calls):
    cli.main(["train", "--labels", "l", "--output", "m"])
    assert calls[0][1] == {"labels": "l", "output": "m"}


def test_config_file_fills_in_and_command_line_wins(calls, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "address: auto\n"
        "storage_options: {endpoint_url: 'http://127.0.0.1:1', anon: false}\n"
        "pseudo_label:\n  input: [imgs/]\n  output: out/\n  image-size: 448\n  weights: random\n"
        "train: {labels: out/, output: model/, workers: 4}\n")
    cli.main(["pseudo-label", "--config", str(cfg), "--image-size", "224",
              "--storage-option", "endpoint_url=http://127.0.0.1:2"])
    kwargs = calls[0][1]
    assert kwargs["image_size"] == 224 and kwargs["weights"] == "random"
    assert kwargs["inputs"] == ["imgs/"] and kwargs["output"] == "out/" and kwargs["address"] == "auto"
    assert kwargs["storage_options"] == {"endpoint_url": "http://127.0.0.1:2", "anon": False}
    assert "workers" not in kwargs  # another command's section


def test_unknown_config_key_is_a_clear_error(calls, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("pseudo_label: {input: [x], output: y, imagesize: 3}\n")
    with pytest.raises(SystemExit):
        cli.main(["pseudo-label", "--config", str(cfg)])
    assert "pseudo_label.imagesize" in capsys.readouterr().err


def test_required_options_may_come_from_config_only(calls, tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["segment", "--model", "m"])
    assert "--input" in capsys.readouterr().err
    cfg = tmp_path / "c.yaml"
    cfg.write_text("segment: {input: [imgs], output: preds}\n")
    cli.main(["segment", "--model", "m", "--config", str(cfg)])
    assert calls[0][1] == {"model": "m", "inputs": ["imgs"], "output": "preds"}


def test_evaluate_modes(calls, capsys):
    cli.main(["evaluate", "--predictions", "p", "--masks", "m", "--output", "o", "--name", "ECSSD"])
    assert calls[-1][1] == {"predictions": "p", "masks": "m", "output": "o", "name": "ECSSD"}
    cli.main(["evaluate", "--model", "art", "--benchmark", "ECSSD=s3://e/images,s3://e/masks",
              "--benchmark", "CAMO=c/Images/Test,c/GT", "--output", "o"])
    assert calls[-1][1]["benchmarks"] == {"ECSSD": ("s3://e/images", "s3://e/masks"),
                                          "CAMO": ("c/Images/Test", "c/GT")}
    for bad in (["--predictions", "p", "--output", "o"],
                ["--model", "art", "--output", "o"],
                ["--predictions", "p", "--masks", "m", "--model", "a", "--output", "o"],
                ["--model", "a", "--benchmark", "NOCOMMA=x", "--output", "o"]):
        with pytest.raises(SystemExit):
            cli.main(["evaluate", *bad])


def test_console_script_help_runs():
    out = subprocess.run([sys.executable, "-m", "selfment_dist.cli", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for command in ("pseudo-label", "train", "segment", "evaluate", "demo"):
        assert command in out


def test_negative_flag_in_config_keeps_its_meaning(calls, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("pseudo_label: {input: [x], output: y, non_binary_graph: true}\n")
    cli.main(["pseudo-label", "--config", str(cfg)])
    assert calls[-1][1]["binary_graph"] is False
    cfg.write_text("pseudo_label: {input: [x], output: y, binary_graph: true}\n")
    cli.main(["pseudo-label", "--config", str(cfg)])
    assert calls[-1][1]["binary_graph"] is True


def test_precision_choices_are_the_backbones():
    from selfment_dist.model.backbone import PRECISIONS
    from selfment_dist.settings import PseudoLabelSettings

    flags, kwargs = cli.argument(PseudoLabelSettings, "precision")
    assert flags == ["--precision"] and tuple(kwargs["choices"]) == PRECISIONS


def test_stage_modules_leave_the_model_stack_to_the_actors():
    """Ray imports a stage module in every worker process that runs one of its decode or write
    tasks: importing it must not import timm (2-3 s of CPU per process), nor torch for
    pseudo-label; the model actors and the drivers' checks import the model stack."""
    code = ("import sys\n"
            "import selfment_dist.pipeline.pseudo_label\n"
            "from selfment_dist.validation import check_backbone_size as check\n"
            "from selfment_dist.defaults import resolve_precision\n"
            # The pseudo-label driver's own checks of a known backbone: no torch either.
            "assert check('vit_small_patch16_224.dino', 64) == []\n"
            "assert 'multiple of' in check('vit_small_patch14_dinov2.lvd142m', 64)[0]\n"
            "assert resolve_precision('auto') == 'fp32'\n"
            "assert 'torch' not in sys.modules, 'pseudo_label imports torch'\n"
            "import selfment_dist.pipeline.segment, selfment_dist.pipeline._internal.train_worker\n"
            "import selfment_dist.pipeline.evaluate, selfment_dist.pipeline.train\n"
            "assert 'timm' not in sys.modules, 'a stage module imports timm'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_a_bug_keeps_its_traceback_and_a_user_mistake_is_one_line(monkeypatch, capsys):
    """Only SelfmentUserError is a user mistake (one line, exit 2): a ValueError from inside a
    run is a bug, so it propagates (the interpreter prints its traceback and exits 1)."""
    from selfment_dist.errors import UserValueError

    def raising(exc):
        def target(command):
            def run(settings, **_):
                raise exc
            return run
        return target

    argv = ["train", "--labels", "l", "--output", "m"]
    monkeypatch.setattr(cli, "_target", raising(ValueError("an internal shape mismatch")))
    with pytest.raises(ValueError, match="internal shape mismatch"):
        cli.main(argv)
    monkeypatch.setattr(cli, "_target", raising(UserValueError("no pseudo-labels at l")))
    assert cli.main(argv) == 2
    assert capsys.readouterr().err.splitlines()[-1] == "selfment: error: no pseudo-labels at l"


def test_a_bug_exits_1_with_a_traceback():
    code = ("import sys\n"
            "from selfment_dist import cli\n"
            "def target(command):\n"
            "    def run(settings, **_):\n"
            "        raise ValueError('an internal shape mismatch')\n"
            "    return run\n"
            "cli._target = target\n"
            "sys.exit(cli.main(['train', '--labels', 'l', '--output', 'm']))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "selfment: error" not in proc.stderr
