"""Ray Jobs: the config wiring of jobs/, and jobs/pipeline.py submitted to a real local Ray head.

The end-to-end test starts ``ray start --head --block`` on 127.0.0.1 in its own process group,
with its own ``--temp-dir`` and ports, so neither the in-process Ray of other test modules nor
any other Ray on this machine is attached or stopped (``ray stop`` would stop every Ray here).
It submits ``jobs/pipeline.py`` through the Jobs SDK with the runtime environment of
jobs/README.md's recipe, waits for SUCCEEDED, checks every stage's outputs, and always ends the
processes it started: the job, the head's process group, then any process whose command line
names its temp dir or config.
"""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image
from ray_jobs_helpers import submit_when_agent_is_up


REPO = Path(__file__).resolve().parents[1]
JOBS = REPO / "jobs"
N_TRAIN, N_EVAL, SIZE = 16, 6, (96, 128)
JOB_TIMEOUT_S = 480


@pytest.fixture(scope="module", autouse=True)
def jobs_on_path():
    """The entrypoints import ``_common`` from their own folder, as ``python jobs/x.py`` does."""
    sys.path.insert(0, str(JOBS))
    yield
    sys.path.remove(str(JOBS))


def _config(text: str, tmp_path: Path) -> dict:
    import _common

    path = tmp_path / "config.yaml"
    path.write_text(text)
    return _common.load_config(str(path))


# ---------------------------------------------------------------------------------------------
# Wiring and checks (no Ray)

def test_local_config_wires_every_stage_to_the_previous_one():
    import _common
    from selfment_dist.pipeline.chain import plan as chain_plan

    _, settings = chain_plan(_common.load_config(str(JOBS / "configs" / "local.yaml")))
    plan = {stage: s.model_dump() for stage, s in settings.items()}
    root = "/tmp/selfment-local"
    assert plan["pseudo_label"]["inputs"] == [f"{root}/data/train/images"]
    assert plan["pseudo_label"]["output"] == f"{root}/labels"
    assert plan["train"]["labels"] == f"{root}/labels"
    assert plan["train"]["output"] == f"{root}/model"
    assert plan["segment"]["model"] == f"{root}/model"
    assert plan["segment"]["inputs"] == [f"{root}/data/eval/images"]
    assert plan["evaluate"]["predictions"] == f"{root}/predictions"
    assert plan["evaluate"]["masks"] == f"{root}/data/eval/masks"
    assert plan["evaluate"]["output"] == f"{root}/report"
    assert plan["pseudo_label"]["weights"] == "random"


def test_s3_config_runs_at_scale_and_evaluates_benchmarks_with_the_trained_model():
    import _common
    from selfment_dist.pipeline.chain import plan as check

    config = _common.load_config(str(JOBS / "configs" / "s3.yaml"))
    section, settings = check(config)
    plan = {stage: s.model_dump(exclude_none=True) for stage, s in settings.items()}
    run = section.output
    assert run.startswith("s3://") and section.stages == list(_common.STAGES)
    assert plan["pseudo_label"]["weights"] == "hub" and plan["pseudo_label"]["image_size"] == 768
    assert plan["train"]["use_gpu"] is True and plan["train"]["workers"] > 1
    assert plan["train"]["labels"] == plan["pseudo_label"]["output"] == f"{run}/labels"
    assert plan["segment"]["model"] == plan["train"]["output"] == f"{run}/model"
    evaluate = plan["evaluate"]
    assert evaluate["model"] == f"{run}/model" and "predictions" not in evaluate
    assert all(isinstance(pair, tuple) and len(pair) == 2
               for pair in evaluate["benchmarks"].values())
    assert all(uri.startswith("s3://") for o in plan.values() for k, uri in o.items()
               if k in ("output", "labels", "model"))


def test_config_problems_are_reported_before_anything_runs(tmp_path):
    import _common
    from selfment_dist.pipeline.chain import plan as check
    from selfment_dist.pipeline.chain import stage_settings, stage_values

    with pytest.raises(ValueError, match=r"train\.epoch\b.*valid: .*epochs"):
        stage_values(_config("pipeline: {output: /x}\ntrain: {epoch: 3}\n", tmp_path))
    with pytest.raises(ValueError, match=r"pseudo_label\.inputs \(--input\) is required"):
        check(_config("pipeline: {output: /x}\n", tmp_path))
    with pytest.raises(ValueError, match=r"evaluate: masks \(--masks\) is required"):
        check(_config("pipeline: {output: /x, stages: [evaluate]}\n", tmp_path))
    with pytest.raises(ValueError, match=r"pipeline\.stages\.1: Input should be 'pseudo_label'"):
        check(_config("pipeline: {output: /x, stages: [pseudo_label, tune]}\n", tmp_path))
    with pytest.raises(ValueError, match="pipeline.output is required"):
        check(_config("pseudo_label: {inputs: [a], output: b}\n"
                      "pipeline: {stages: [pseudo_label]}\n", tmp_path))
    with pytest.raises(ValueError, match="output at the top level would apply to every stage"):
        check(_config("output: /x\npipeline: {output: /x}\n", tmp_path))
    with pytest.raises(ValueError, match="pipeline.synthetic.nval: unknown option"):
        check(_config("pipeline: {output: /x, synthetic: {n_train: 3, nval: 2}}\n", tmp_path))
    # A single-stage entrypoint says what is missing and exits 2, without starting Ray.
    (tmp_path / "train.yaml").write_text("train: {workers: 1}\n")
    assert _common.run_stage("train", ["--config", str(tmp_path / "train.yaml")]) == 2
    # Only the stages asked for need their inputs; --storage-option merges over the config's.
    config = _config("storage_options: {anon: false, key: k}\n"
                     "pipeline: {output: /r, stages: [segment, evaluate]}\n"
                     "segment: {inputs: [/images]}\nevaluate: {masks: /masks}\n", tmp_path)
    section, plan = check(config)
    assert plan["segment"].model == "/r/model"
    assert plan["evaluate"].predictions == "/r/predictions"
    merged = _common.load_config(str(tmp_path / "config.yaml"), {"key": "cli", "secret": "s"})
    assert merged["storage_options"] == {"anon": False, "key": "cli", "secret": "s"}
    assert "storage_options" not in plan["segment"].record()
    # Keys may be spelt like the command line's flags, as with `selfment --config`.
    config = _config("pipeline: {output: /r}\npseudo_label: {input: /imgs}\n"
                     "segment: {format: parquet}\n", tmp_path)
    assert stage_settings(config, "pseudo_label").inputs == ["/imgs"]
    assert stage_settings(config, "segment").output_format == "parquet"


def test_pipeline_skips_complete_stages_and_reruns_from_the_first_incomplete_one(
        tmp_path, monkeypatch):
    """The orchestration alone: stage functions replaced by fakes that write each stage's
    completion marker, so no Ray is needed."""
    from selfment_dist.pipeline import chain

    calls: list[str] = []

    def fake(stage, marker, document):
        def run(settings, fail=False):
            calls.append(stage)
            if fail:
                raise RuntimeError(f"{stage} broke")
            out = Path(settings.output)
            out.mkdir(parents=True, exist_ok=True)
            (out / marker).write_text(json.dumps(document))
            return {"stage": stage, **document}
        return run

    fakes = {
        "pseudo_label": fake("pseudo_label", "_selfment.json", {"status": "complete"}),
        "train": fake("train", "model.json", {"epochs": 1}),
        "segment": fake("segment", "_segment.json", {"status": "complete"}),
        "evaluate": fake("evaluate", "metrics.json",
                         {"datasets": {"synthetic": {"n_images": 2, "scores": {"mae": 0.5}}}}),
    }
    monkeypatch.setattr(chain, "stage_function", fakes.__getitem__)
    root = tmp_path / "run"
    text = (f"pipeline: {{output: {root}}}\npseudo_label: {{inputs: [/images]}}\n"
            "segment: {inputs: [/eval]}\nevaluate: {masks: /masks}\n")

    def run(extra: str = "", *, force: bool = False) -> dict:
        calls.clear()
        return chain.run_chain(_config(text + extra, tmp_path), force=force)

    def statuses(summary: dict) -> dict:
        return {s: r["status"] for s, r in summary["stages"].items()}

    first = run()
    assert calls == list(fakes) and first["status"] == "complete"
    assert first["metrics"] == {"synthetic": {"n_images": 2, "scores": {"mae": 0.5}}}
    assert json.loads((root / "pipeline_summary.json").read_text()) == first
    assert statuses(run()) == dict.fromkeys(fakes, "skipped") and calls == []
    # An output that lost its marker runs again, and so does everything after it.
    (root / "predictions" / "_segment.json").unlink()
    assert statuses(run()) == {"pseudo_label": "skipped", "train": "skipped",
                               "segment": "complete", "evaluate": "complete"}
    assert calls == ["segment", "evaluate"]
    # Other options for a stage: that stage and the ones after it.
    run("train: {epochs: 3}\n")
    assert calls == ["train", "segment", "evaluate"]
    # A subset: the other stages keep their records; evaluate is still complete.
    only = run("train: {epochs: 3}\npipeline: {output: %s, stages: [evaluate]}\n" % root)
    assert calls == [] and statuses(only)["evaluate"] == "skipped"
    assert list(only["stages"]) == list(fakes) and statuses(only)["train"] == "complete"
    # --force runs everything.
    run("train: {epochs: 3}\n", force=True)
    assert calls == list(fakes)
    # A failing stage is recorded, and the error goes on to fail the job.
    (root / "predictions" / "_segment.json").unlink()
    fakes["segment"] = (lambda f: lambda s: f(s, fail=True))(fakes["segment"])
    with pytest.raises(RuntimeError, match="segment broke"):
        run("train: {epochs: 3}\n")
    failed = json.loads((root / "pipeline_summary.json").read_text())
    assert failed["status"] == "failed" and failed["failed_stage"] == "segment"
    assert statuses(failed) == {"pseudo_label": "skipped", "train": "skipped",
                                "segment": "failed", "evaluate": "pending"}
    assert "segment broke" in failed["stages"]["segment"]["error"]


def _readme_runtime_env() -> dict:
    """The runtime_env of jobs/README.md's local recipe (the first --runtime-env-json)."""
    text = (JOBS / "README.md").read_text()
    match = re.search(r"--runtime-env-json '([^']+)'", text)
    assert match, "jobs/README.md lost its --runtime-env-json recipe"
    return json.loads(match.group(1))


def test_readme_recipe_names_an_existing_config_and_a_parseable_runtime_env():
    text = (JOBS / "README.md").read_text()
    assert "--working-dir . \\" in text
    assert "-- python jobs/pipeline.py --config jobs/configs/local.yaml" in text
    env = _readme_runtime_env()
    assert ".git/" in env["excludes"] and env["env_vars"]["HF_HUB_OFFLINE"] == "1"


# ---------------------------------------------------------------------------------------------
# A real Ray head, a real job

def _free_port() -> int:
    """A port for Ray Client's server, the one port ``ray start`` will not choose itself (it
    must be 1024-65535). Nothing here uses Ray Client, so should another process take this port
    meanwhile, only that unused server fails; the head and the job do not."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _dashboard_url(log_text: str) -> str | None:
    """The Jobs API address that ``ray start`` prints once the head is up (the port the
    dashboard bound, when asked for port 0)."""
    match = re.search(r"RAY_API_SERVER_ADDRESS='(http://[^']+)'", _ANSI.sub("", log_text))
    return match.group(1) if match else None


def _ray_cli() -> str:
    beside = Path(sys.executable).with_name("ray")
    return str(beside) if beside.exists() else (shutil.which("ray") or "ray")


def _end_processes(head: subprocess.Popen, markers: list[str]) -> None:
    """End the head's process group, then every process naming one of ``markers`` (ours only)."""
    import psutil

    try:
        os.killpg(head.pid, signal.SIGTERM)  # GCS, raylet, dashboard … shut down
        time.sleep(5)
        os.killpg(head.pid, signal.SIGKILL)  # `ray start --block` itself outlives SIGTERM
    except ProcessLookupError:
        pass
    head.wait(timeout=30)
    # Job drivers run in their own session; workers may outlive the raylet for a moment.
    mine = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if proc.pid != os.getpid() and any(m in cmdline for m in markers):
            mine.append(proc)
    for proc in mine:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(mine, timeout=30)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """``ray start --head`` on 127.0.0.1 with 2 CPUs and the dashboard (Jobs API); yields
    ``(dashboard URL, JobSubmissionClient, markers, work folder)``; always ends what it started.

    Token authentication (Ray >= 2.52) with a token of its own, given to the head through its
    environment and to the client as a header: ``~/.ray/auth_token`` and this process's Ray
    settings stay untouched.
    """
    from ray._private.authentication.authentication_token_generator import (
        generate_new_authentication_token)
    from ray.job_submission import JobSubmissionClient

    # Unix socket paths under the temp dir must stay short (107 bytes): not under tmp_path.
    temp_dir = tempfile.mkdtemp(prefix="sfjob-", dir="/tmp")
    work = tmp_path_factory.mktemp("job")
    # Port 0: the GCS, the dashboard and its agent bind free ports themselves and keep them (no
    # probe-release-reuse race); the other ports are Ray's own choice by default.
    command = [
        _ray_cli(), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
        "--port", "0", "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
        "--dashboard-port", "0", "--dashboard-agent-listen-port", "0",
        "--ray-client-server-port", str(_free_port()), "--num-cpus", "2", "--num-gpus", "0",
        "--temp-dir", temp_dir, "--disable-usage-stats",
    ]
    token = generate_new_authentication_token()
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)  # the job's driver inherits both
    # The entrypoint's `python` is looked up on the head's PATH: make it this test's interpreter,
    # as an activated venv would, even when pytest runs as `venv/bin/python -m pytest` unactivated.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    log_path = work / "ray_start.log"
    with open(log_path, "wb") as log:
        head = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    markers = [temp_dir, str(work)]
    try:
        with pytest.MonkeyPatch.context() as mp:  # the client prefers these over its address
            mp.delenv("RAY_ADDRESS", raising=False)
            mp.delenv("RAY_API_SERVER_ADDRESS", raising=False)
            deadline = time.monotonic() + 180
            while True:
                if head.poll() is not None:
                    pytest.fail(f"ray start exited {head.returncode}:\n"
                                f"{log_path.read_text()[-3000:]}")
                url = _dashboard_url(log_path.read_text(errors="replace"))
                if url is not None:
                    try:
                        client = JobSubmissionClient(
                            url, headers={"Authorization": f"Bearer {token}"})
                        break
                    except ConnectionError:  # the dashboard is not up yet
                        pass
                if time.monotonic() > deadline:
                    pytest.fail(f"no Ray dashboard ({url}) after 180 s:\n"
                                f"{log_path.read_text()[-3000:]}")
                time.sleep(1)
            yield url, client, markers, work
    finally:
        _end_processes(head, markers)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait(client, job_id: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        status = client.get_job_status(job_id)
        if status.is_terminal():
            return status
        if time.monotonic() > deadline:
            client.stop_job(job_id)
            return f"TIMEOUT after {timeout_s:.0f} s (was {status})"
        time.sleep(2)


@pytest.mark.slow
def test_readme_recipe_local_config_as_a_job_on_a_real_ray_head(ray_head):
    """The README's recipe: ``jobs/pipeline.py --config jobs/configs/local.yaml`` submitted to a
    real head. The shipped file as it is, except its output folder (moved under the test's) and
    fewer synthetic scenes; then the same config run again skips every stage."""
    from ray.job_submission import JobStatus

    url, client, markers, work = ray_head
    run = work / "run"
    config = yaml.safe_load((JOBS / "configs" / "local.yaml").read_text())
    config["pipeline"]["output"] = str(run)
    config["pipeline"]["synthetic"].update(n_train=N_TRAIN, n_eval=N_EVAL, size=list(SIZE))
    config_path = work / "pipeline.yaml"
    config_path.write_text(yaml.safe_dump(config))

    runtime_env = {**_readme_runtime_env(), "working_dir": str(REPO)}
    job_id = submit_when_agent_is_up(
        client, entrypoint=f"python jobs/pipeline.py --config {config_path}",
        runtime_env=runtime_env)
    status = _wait(client, job_id, JOB_TIMEOUT_S)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, f"job {job_id}: {status}\n{logs[-6000:]}"
    # The driver joined the head (RAY_ADDRESS from Ray Jobs), it did not start a Ray of its own.
    assert "Connecting to Ray at" in logs and "Starting a local Ray" not in logs
    image_size, epochs = config["pseudo_label"]["image_size"], config["train"]["epochs"]

    # pseudo-label: one row per training image, none failed
    labels = pq.read_table(run / "labels", columns=["key", "mask", "error", "features"])
    assert labels.num_rows == N_TRAIN and labels.column("error").null_count == N_TRAIN
    assert len(set(labels.column("key").to_pylist())) == N_TRAIN
    assert json.loads((run / "labels" / "_selfment.json").read_text())["status"] == "complete"
    # train: the model artifact
    meta = json.loads((run / "model" / "model.json").read_text())
    assert (run / "model" / "head.safetensors").stat().st_size > 0
    assert meta["training"]["epochs"] == epochs and meta["image_size"] == image_size
    # segment: one saliency PNG per held-out image, at its original size
    maps = sorted((run / "predictions").glob("*.png"))
    assert len(maps) == N_EVAL
    assert Image.open(maps[0]).size == (SIZE[1], SIZE[0]) and Image.open(maps[0]).mode == "L"
    # evaluate: metrics against the masks, and the reports
    metrics = json.loads((run / "report" / "metrics.json").read_text())
    assert metrics["datasets"]["synthetic"]["n_images"] == N_EVAL
    # The dataset MAE is the mean of the per-image ones in the CSV (not a range check).
    with open(run / "report" / "per_image.csv", newline="") as f:
        maes = [float(row["mae"]) for row in csv.DictReader(f)]
    assert len(maes) == N_EVAL
    assert metrics["datasets"]["synthetic"]["scores"]["mae"] == pytest.approx(
        sum(maes) / len(maes), abs=1e-6)
    for name in ("metrics.md", "per_image.csv", "plots/synthetic_pr.png"):
        assert (run / "report" / name).stat().st_size > 0
    # the pipeline's own summary, also the last thing the job printed
    summary = json.loads((run / "pipeline_summary.json").read_text())
    assert summary["status"] == "complete"
    assert {s: r["status"] for s, r in summary["stages"].items()} == dict.fromkeys(
        ["pseudo_label", "train", "segment", "evaluate"], "complete")
    assert summary["metrics"]["synthetic"]["n_images"] == N_EVAL
    assert '"status": "complete"' in logs

    # The same config again: every stage is complete with the same options, so nothing runs
    # (in this process, and no Ray is needed for it).
    import ray

    import _common
    from selfment_dist.pipeline.chain import run_chain
    was_initialized = ray.is_initialized()
    again = run_chain(_common.load_config(str(config_path)), config_uri=str(config_path))
    assert {s: r["status"] for s, r in again["stages"].items()} == dict.fromkeys(
        ["pseudo_label", "train", "segment", "evaluate"], "skipped")
    assert again["metrics"] == summary["metrics"]
    assert ray.is_initialized() == was_initialized
