"""The planner as a pure function of node shapes, ``selfment plan``, elastic decode and the
"no silent CPU on a GPU cluster" rule. No Ray cluster is started here."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from selfment_dist.cli import main
from selfment_dist.pipeline import plan_command
from selfment_dist.pipeline._internal import plan as _plan
from selfment_dist.pipeline._internal.plan import StagePlan, parse_node_shape, plan_stage

S3_CONFIG = str(Path(__file__).resolve().parents[1] / "jobs" / "configs" / "s3.yaml")


def plan_json(capsys, *argv: str) -> dict:
    assert main(["plan", *argv]) == 0
    return json.loads(capsys.readouterr().out)


# ---------------------------------------------------------------------------------------------
# Decode is elastic: never a start-time cap

def test_cold_autoscaling_cluster_does_not_get_one_decode_task(capsys):
    """A head with no CPUs and nothing else yet (the shipped AWS and KubeRay shape)."""
    plan = plan_json(capsys, "pseudo-label", "--nodes", "CPU=0", "--num-gpus-per-actor", "1")
    assert plan["decode_concurrency"] == {"min": 1, "max": None}
    assert plan["model_actors"] == {"min": 1, "max": None, "initial": 1, "now": 0}
    assert plan["device"] == "cuda" and not plan["fits_now"]
    assert plan["bound_by"].startswith("no model actor fits")


@pytest.mark.parametrize("shape, decode_cpus, actors", [
    ("CPU=16,GPU=1", 12, 1), ("CPU=96,GPU=8", 64, 8)])
def test_decode_may_use_the_cpus_the_gpu_actors_leave(capsys, shape, decode_cpus, actors):
    plan = plan_json(capsys, "pseudo-label", "--nodes", "CPU=0", "--nodes", shape)
    assert plan["decode_concurrency"]["max"] is None
    assert plan["decode_cpus_now"] >= decode_cpus
    assert plan["decode_tasks_now"] * plan["decode_task_cpus"] >= decode_cpus
    assert plan["model_actors"]["now"] == actors and plan["num_gpus"] == 1
    assert plan["batch_size"] == 32 and plan["precision"] == "fp32"
    assert plan["images_per_s"] == min(plan["model_images_per_s"], plan["decode_images_per_s"])


def test_the_pipeline_decodes_without_a_cap():
    from selfment_dist.pipeline._internal.ray_runtime import decode_pool

    plan = plan_stage([{"CPU": 4.0}])
    assert decode_pool(plan).size is None


# ---------------------------------------------------------------------------------------------
# The command: shapes, config, rates, stage options

def test_repeated_shapes_config_and_rates(capsys):
    plan = plan_json(capsys, "segment", "--nodes", "CPU=0", "--nodes", "4xCPU=8,GPU=1",
                     "--config", S3_CONFIG,
                     "--rate", "gpu_actor_images_per_s_fp32=100000")
    assert len(plan["nodes"]) == 5 and plan["model_actors"]["now"] == 4
    assert plan["batch_size"] == 16 and plan["image_size"] == 1536     # the file's segment section
    assert plan["rates"]["gpu_actor_images_per_s_fp32"] == 100000
    assert plan["bound_by"] == "decode"                                # a fast GPU: CPUs bound it


def test_precision_picks_the_assumed_gpu_rate(capsys):
    fp32 = plan_json(capsys, "pseudo-label", "--nodes", "CPU=8,GPU=1")
    bf16 = plan_json(capsys, "pseudo-label", "--nodes", "CPU=8,GPU=1", "--precision", "bf16")
    assert bf16["model_images_per_s"] > fp32["model_images_per_s"] > 0
    # The rates are the reference model's (ViT-S/16, 768 px), scaled by the cost model of
    # pipeline/_internal/rates.py: four times the patches cost more than four times the time
    # (attention and NCut are quadratic), a larger backbone costs more, segment skips NCut.
    big = plan_json(capsys, "pseudo-label", "--nodes", "CPU=8,GPU=1", "--image-size", "1536")
    assert big["model_images_per_s"] < fp32["model_images_per_s"] / 8
    base = plan_json(capsys, "pseudo-label", "--nodes", "CPU=8,GPU=1",
                     "--backbone", "vit_base_patch16_dinov3.lvd1689m")
    assert base["backbone"] == "vit_base_patch16_dinov3.lvd1689m"
    assert base["model_images_per_s"] < fp32["model_images_per_s"] / 2
    segment = plan_json(capsys, "segment", "--nodes", "CPU=8,GPU=1", "--image-size", "768")
    assert segment["model_images_per_s"] > fp32["model_images_per_s"]
    measured = plan_json(capsys, "pseudo-label", "--nodes", "CPU=8,GPU=1",
                         "--rate", "gpu_actor_images_per_s_fp32=90")
    assert measured["model_images_per_s"] == pytest.approx(90)  # the reference model itself


def test_train_plan_says_whether_the_workers_fit(capsys):
    plan = plan_json(capsys, "train", "--nodes", "CPU=0", "--nodes", "2xCPU=48,GPU=4",
                     "--config", S3_CONFIG)
    assert plan["workers"] == 8 and plan["fits"]
    small = plan_json(capsys, "train", "--nodes", "CPU=0", "--nodes", "8xCPU=6,GPU=1",
                      "--workers", "8", "--use-gpu", "--resources-per-worker",
                      '{"CPU": 10, "GPU": 1}')
    assert not small["fits"] and small["workers_the_nodes_hold"] == 0


@pytest.mark.parametrize("argv, message", [
    (["--nodes", "CPU=lots"], "node shape 'CPU=lots'"),
    (["--nodes", "CPU=4", "--rate", "warp=9"], "unknown rate"),
    (["--nodes", "CPU=4", "--num-gpus-per-actor", "0", "--require-gpu"], "require_gpu"),
])
def test_mistakes_are_one_error_line(capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        main(["plan", "pseudo-label", *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("selfment: error:") and message in err


def test_the_command_starts_no_ray(capsys):
    import ray

    plan_json(capsys, "evaluate", "--nodes", "CPU=4")
    assert not ray.is_initialized()


def test_node_shapes_parse():
    assert parse_node_shape("CPU=16, GPU=1,memory=1e9") == {"CPU": 16, "GPU": 1, "memory": 1e9}
    assert plan_command.parse_nodes(["3xCPU=2"]) == [{"CPU": 2.0}] * 3


# ---------------------------------------------------------------------------------------------
# No silent CPU on a GPU cluster

def test_require_gpu_plans_gpu_actors_that_wait_for_a_gpu_node():
    plan = plan_stage([{"CPU": 0.0}, {"CPU": 16.0}], require_gpu=True)
    assert isinstance(plan, StagePlan)
    assert plan.num_gpus == 1 and plan.device == "cuda" and not plan.fits_now
    assert plan_stage([{"CPU": 16.0}]).num_gpus == 0  # nothing asks for a GPU: CPU actors


def test_live_plan_follows_a_cluster_config_with_gpu_types(monkeypatch):
    """GPU nodes scaled down to zero: the cluster's config still has GPU types, so the stage
    waits for one (bounded_actor_start's probe, at most actor_wait_s) instead of CPU actors."""
    monkeypatch.setattr(_plan, "alive_nodes", lambda: [{"CPU": 0.0}, {"CPU": 16.0}])
    monkeypatch.setattr(_plan, "cluster_asks_for_gpus", lambda: True)
    plan = _plan.plan_resources(None, None)
    assert plan["num_gpus"] == 1 and not plan["fits_now"] and plan["require_gpu"]
    assert _plan.plan_resources(None, 0).num_gpus == 0   # an explicit CPU plan stays one


def test_cpu_plan_on_a_remote_cluster_is_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(_plan, "alive_nodes", lambda: [{"CPU": 16.0}])
    monkeypatch.setattr(_plan, "cluster_asks_for_gpus", lambda: False)
    monkeypatch.setattr(_plan, "connected_to_remote_cluster", lambda: True)
    with caplog.at_level(logging.WARNING, logger=_plan.__name__):
        plan = _plan.plan_resources(None, None, stage="segment")
    assert plan.device == "cpu"
    assert any(r.levelno == logging.WARNING and "CPU model actors on a remote cluster"
               in r.getMessage() for r in caplog.records)
    assert plan.record()["device"] == "cpu"  # what the run summary keeps under "plan"


# ---------------------------------------------------------------------------------------------
# Loose files of one decode task are fetched concurrently

def test_prefetch_yields_what_a_one_by_one_read_yields(tmp_path):
    from selfment_dist.io.prefetch import iter_unit_records
    from selfment_dist.io.sources import IMAGE, iter_records

    units = []
    for i in range(7):
        path = tmp_path / f"{i}.jpg"
        if i != 3:  # 3 is missing: an error record in its place
            path.write_bytes(bytes([i]) * (10 + 100 * (i == 5)))  # 5 is over max_bytes
        units.append({"kind": IMAGE, "uri": str(path), "key": str(i)})
    options = {"skip": {"1"}, "max_bytes": 50}
    expected = [r for u in units for r in iter_records(u, **options)]
    got = list(iter_unit_records(units, threads=3, **options))
    assert got == expected
    assert [r["key"] for r in got] == ["0", "2", "3", "4", "5", "6"]
    assert got[2]["error"] and got[4]["error"] and got[0]["data"] == b"\0" * 10


def test_prefetch_reads_files_at_once(monkeypatch):
    import threading
    import time

    from selfment_dist.io import prefetch

    lock, state = threading.Lock(), {"now": 0, "most": 0}

    def slow(unit, **_):
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
        time.sleep(0.05)
        with lock:
            state["now"] -= 1
        yield {"key": unit["key"]}

    monkeypatch.setattr(prefetch, "iter_records", slow)
    units = [{"kind": "image", "uri": f"s3://b/{i}", "key": str(i)} for i in range(16)]
    keys = [r["key"] for r in prefetch.iter_unit_records(units, threads=8)]
    assert keys == [str(i) for i in range(16)] and state["most"] >= 4


# ---------------------------------------------------------------------------------------------
# The one-call GPU check, at smoke size on CPU

@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_gpu_check_smoke_runs_every_step_on_cpu(tmp_path):
    """``SMOKE=1 bash benchmarks/gpu_check.sh OUT``: every step passes and prints its RESULT
    lines (the figures a GPU slot would give, at tiny sizes), exit status 0."""
    import os
    import subprocess

    root = Path(__file__).resolve().parents[1]
    # BUDGET_S guards a GPU slot (9.5 min); here every step must run even on a loaded machine.
    env = {**os.environ, "SMOKE": "1", "BUDGET_S": "1200", "STEP_LIMIT_SCALE": "3"}
    done = subprocess.run(["bash", str(root / "benchmarks" / "gpu_check.sh"), str(tmp_path)],
                          cwd=root, env=env, capture_output=True, text=True, timeout=1300)
    results = dict(line.split()[1:3] for line in done.stdout.splitlines()
                   if line.startswith("RESULT "))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    steps = ("build", "forward", "ncut", "eigh", "h2d", "decode", "pipeline", "train", "segment")
    assert {results[f"{s}_status"] for s in steps} == {"ok"}
    for key in ("cpu_count", "dev_shm_gib", "torch_cuda_build", "forward_fp32_64_images_per_s",
                "forward_bf16_128_images_per_s", "ncut_ipo_ms_per_image_b4_g8",
                "eigh_f64_k48_cpu_ms", "h2d_pinned_gb_per_s", "decode_resize_ms_640x480",
                "pipeline_images_per_s", "pipeline_gpu_util_mean", "train_w1_images_per_s",
                "segment_images_per_s"):
        assert key in results, key
    assert results["pipeline_plan_decode_max"] == "elastic" and results["all_ok"] == "1"
    assert (tmp_path / "results.txt").read_text().count("RESULT ") == len(
        [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")])


def test_the_cluster_launchers_bootstrap_config_tells_gpu_types(tmp_path):
    """On a cluster launcher's head the autoscaler config lies in ~/ray_bootstrap_config.yaml:
    the shipped AWS config has GPU types, a CPU-only one does not, a missing one says nothing."""
    root = Path(__file__).resolve().parents[1]
    assert _plan._bootstrap_config_has_gpus(str(root / "cluster" / "aws-gpu.yaml"))
    cpu_only = tmp_path / "cpu.yaml"
    cpu_only.write_text("available_node_types: {head: {resources: {CPU: 4}}}\n")
    assert not _plan._bootstrap_config_has_gpus(str(cpu_only))
    assert not _plan._bootstrap_config_has_gpus(str(tmp_path / "missing.yaml"))
