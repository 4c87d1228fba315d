"""Settings models: every option declared once, and the CLI, YAML and Jobs accept the same names.

Also: unknown keys and wrong types are one clear line each, secrets are never serialised, stage
functions take the settings object or the keyword form, and ``selfment run`` runs the chain.
"""
from __future__ import annotations

import argparse
import json
import sys
import typing
from pathlib import Path

import pytest
import yaml

from selfment_dist import cli
from selfment_dist.config import load_config, values_for
from selfment_dist.pipeline import chain
from selfment_dist.settings import (STAGE_SETTINGS, ChainSettings, DemoSettings, EvaluateSettings,
                                    PseudoLabelSettings, SettingsError, TrainSettings,
                                    build_settings, validate)

REPO = Path(__file__).resolve().parents[1]
JOBS = REPO / "jobs"
COMMAND_OF = {"pseudo_label": "pseudo-label", "train": "train", "segment": "segment",
              "evaluate": "evaluate"}


@pytest.fixture(scope="module", autouse=True)
def jobs_on_path():
    sys.path.insert(0, str(JOBS))
    yield
    sys.path.remove(str(JOBS))


def _sample(model, name):
    """A valid value for every field (its default where it has one)."""
    info = model.model_fields[name]
    if not info.is_required():
        return info.default
    kind = info.annotation
    return ["x"] if typing.get_origin(kind) is list else "x"


def _every_field(model) -> dict:
    values = {name: _sample(model, name) for name in model.model_fields}
    if model is EvaluateSettings:  # folders mode
        values.update(predictions="p", masks="m")
    values["storage_options"] = {}
    return values


def _subparser(command: str) -> argparse.ArgumentParser:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def _dests(command: str) -> set[str]:
    return {a.dest for a in _subparser(command)._actions} - {"help", "config"}


@pytest.mark.parametrize("stage", list(STAGE_SETTINGS))
def test_cli_yaml_and_jobs_accept_the_same_names(stage, tmp_path, monkeypatch):
    import _common

    model = STAGE_SETTINGS[stage]
    names = set(model.model_fields)
    # The command line: one flag per field, and no other.
    assert _dests(COMMAND_OF[stage]) == names
    # YAML: every name in the stage's section is taken, and set.
    values = _every_field(model)
    config_path = tmp_path / "c.yaml"
    config_path.write_text(yaml.safe_dump({stage: values}))
    config = load_config(str(config_path))
    assert set(values_for(config, model)) == names
    assert validate(model, values_for(config, model)).model_fields_set == names
    # Jobs: the entrypoint builds the same settings and hands them to the stage function.
    seen = []
    monkeypatch.setattr(_common, "stage_function",
                        lambda s: lambda settings: seen.append(settings) or {})
    assert _common.run_stage(stage, ["--config", str(config_path)]) == 0
    (settings,) = seen
    assert isinstance(settings, model) and settings.model_fields_set == names


def test_every_field_has_a_description_and_a_flag():
    for model in (*STAGE_SETTINGS.values(), ChainSettings, DemoSettings):
        for name, info in model.model_fields.items():
            assert info.description and "\n" not in info.description, (model.__name__, name)
            if info.annotation is bool and info.default is True:
                assert (info.json_schema_extra or {}).get("negative_flag"), name
    assert _dests("demo") == set(DemoSettings.model_fields)
    assert _dests("run") == set(ChainSettings.model_fields) - {"synthetic"} | set(
        cli.RUN_TOP_LEVEL)


def test_flags_keep_their_spellings():
    flags = {o for a in _subparser("pseudo-label")._actions for o in a.option_strings}
    assert {"--input", "--output", "--image-size", "--non-binary-graph", "--no-progress",
            "--storage-option", "--num-gpus-per-actor"} <= flags
    flags = {o for a in _subparser("evaluate")._actions for o in a.option_strings}
    assert {"--benchmark", "--predictions", "--masks", "--model"} <= flags
    assert "--format" in {o for a in _subparser("segment")._actions for o in a.option_strings}


def test_unknown_keys_and_wrong_types_are_one_line_each(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("pseudo_label: {input: [x], output: y, tau: '0.2', image_size: -1, eps: 2}\n")
    with pytest.raises(SettingsError) as err:
        chain.stage_settings(load_config(str(path)), "pseudo_label")
    assert sorted(err.value.problems) == [
        "pseudo_label.eps: Input should be less than 1 (got 2)",
        "pseudo_label.image_size: Input should be greater than 0 (got -1)",
        "pseudo_label.tau: Input should be a valid number (got '0.2')"]
    path.write_text("pseudo_label: {input: [x], output: y, taux: 0.3}\nbatchsize: 3\n")
    with pytest.raises(SettingsError) as err:
        chain.stage_settings(load_config(str(path)), "pseudo_label")
    assert err.value.problems[0] == "batchsize: unknown top-level option"
    assert err.value.problems[1].startswith("pseudo_label.taux: unknown option; valid: actor_wait_s,")


def test_command_line_errors_exit_2_before_running(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["pseudo-label", "--input", "a", "--output", "b", "--tau", "2"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == (
        "selfment: error: pseudo_label.tau: Input should be less than 1 (got 2.0)\n")


def test_secrets_are_never_serialised():
    s = TrainSettings(labels="l", output="o", storage_options={"secret": "TOKEN"})
    assert s.storage_options == {"secret": "TOKEN"}
    assert "TOKEN" not in json.dumps(s.record()) and "TOKEN" not in s.model_dump_json()
    assert set(s.record()) == set(TrainSettings.model_fields) - {"storage_options"}


def test_settings_or_keyword_form():
    s = build_settings(PseudoLabelSettings, ("imgs/", "out/"), {"tau": 0.3})
    assert s.inputs == ["imgs/"] and s.tau == 0.3 and s.model_fields_set == {"inputs", "output",
                                                                              "tau"}
    assert build_settings(PseudoLabelSettings, (s,), {}) is s
    assert build_settings(PseudoLabelSettings, (s,), {"eps": 0.1}).eps == 0.1
    with pytest.raises(TypeError, match="expected PseudoLabelSettings"):
        build_settings(PseudoLabelSettings, (TrainSettings(labels="l", output="o"),), {})
    with pytest.raises(TypeError, match="multiple values for output"):
        build_settings(PseudoLabelSettings, ("a", "b"), {"output": "c"})
    with pytest.raises(SettingsError, match="train.epochs: Input should be greater"):
        build_settings(TrainSettings, ("l", "o"), {"epochs": 0})


def test_chain_records_settings_without_secrets(tmp_path, monkeypatch):
    seen = {}

    def fake(stage):
        def run(settings):
            seen[stage] = settings
            Path(settings.output).mkdir(parents=True, exist_ok=True)
            return {}
        return run

    monkeypatch.setattr(chain, "stage_function", fake)
    config = {"storage_options": {"token": "TOKEN"},
              "pipeline": {"output": str(tmp_path / "run"), "stages": ["train", "pseudo_label"]},
              "pseudo_label": {"inputs": "/imgs", "tau": 0.25}}
    summary = chain.run_chain(config)
    assert list(seen) == ["pseudo_label", "train"]  # pipeline order
    assert seen["train"].labels == str(tmp_path / "run" / "labels")
    assert seen["train"].storage_options == {"token": "TOKEN"}
    text = (tmp_path / "run" / chain.SUMMARY_NAME).read_text()
    assert "TOKEN" not in text
    assert summary["stages"]["pseudo_label"]["options"]["tau"] == 0.25


@pytest.mark.parametrize("resources, use_gpu, problem", [
    ({"GPU": 0.5}, True, "GPU must be 0 or 1"),
    ({"GPU": 2}, True, "GPU must be 0 or 1"),
    ({"GPU": 1}, False, "set use_gpu"),
    ({"CPU": -1}, False, "must not be negative"),
])
def test_training_gpus_are_whole_and_one_per_worker(resources, use_gpu, problem):
    with pytest.raises(ValueError, match=problem):
        TrainSettings(labels="l", output="m", resources_per_worker=resources, use_gpu=use_gpu)
    assert TrainSettings(labels="l", output="m", resources_per_worker={"CPU": 4, "GPU": 1},
                         use_gpu=True).resources_per_worker == {"CPU": 4, "GPU": 1}
