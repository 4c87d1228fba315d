"""GPU readiness without a GPU: resource planning per node with faked cluster resources, the
actors' refusal of a silent CPU fallback, CUDA fault handling with injected faults, the autocast
guard of NCut/IPO, and the validation of GPU counts. No Ray cluster is started here."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from selfment_dist.algorithm.ncut import fiedler_vectors, ncut_bipartition, take_dense_fallbacks
from selfment_dist.algorithm.ipo import ipo_refine
from selfment_dist.pipeline._internal import device as _device
from selfment_dist.pipeline._internal.plan import (LIGHT_TASK_CPUS, UnschedulableError, check_gpus_per_actor,
                                          plan_resources)

HEAD_NO_CPU = {"CPU": 0.0, "memory": 1e9}


def node(cpus: float, gpus: float = 0.0) -> dict:
    return {"CPU": float(cpus), "GPU": float(gpus)} if gpus else {"CPU": float(cpus)}


# ---------------------------------------------------------------------------------------------
# Planning per node

def test_head_without_cpus_and_two_small_workers_get_one_fitting_actor_each():
    """The issue's hang: 4 CPUs in total, but no node could hold the 3-CPU actor planned."""
    plan = plan_resources(None, None, nodes=[HEAD_NO_CPU, node(2), node(2)])
    assert plan["num_gpus"] == 0 and plan["device"] == "cpu"
    assert plan["num_cpus"] <= 2 - 2 * LIGHT_TASK_CPUS      # fits a node, leaves room for I/O
    assert plan["actors"] == 2 and plan["cpu_threads"] == 2
    assert plan["min_actors"] == plan["initial_actors"] == 2   # both nodes used from the start
    # Two actors on one surviving 2-CPU node still leave a CPU for decode and write tasks.
    assert 2 - 2 * plan["num_cpus"] >= 2 * LIGHT_TASK_CPUS
    assert plan["fits_now"] and plan["decode_max"] is None    # decode: elastic


@pytest.mark.parametrize("cpus", [2, 3, 5])
def test_actors_restarted_on_one_survivor_leave_room_for_decode_and_write(cpus):
    plan = plan_resources(None, None, nodes=[HEAD_NO_CPU, node(cpus), node(cpus)])
    both = min(plan["actors"], int(cpus // plan["num_cpus"])) * plan["num_cpus"]
    assert cpus - both >= 2 * LIGHT_TASK_CPUS


@pytest.mark.parametrize("nodes, actors, cpus", [
    ([node(8)], 1, 6.5),
    ([node(16)], 2, 6.5),
    ([node(2), node(32)], 4, 6.5),     # sized for the large node; the small one decodes
    ([node(1)], 1, 0.5),
])
def test_cpu_actor_sizes_fit_the_nodes_that_exist(nodes, actors, cpus):
    plan = plan_resources(None, 0, nodes=nodes)
    assert (plan["actors"], plan["num_cpus"]) == (actors, cpus)
    assert any(n["CPU"] >= plan["num_cpus"] for n in nodes)


def test_no_gpu_now_but_gpus_asked_for_plans_an_elastic_gpu_pool():
    """The autoscaler starts GPU nodes only when actors ask for GPUs: the request comes from the
    settings, and the pool is not capped by the GPUs present at start-up."""
    cpu_only = [node(4)]
    plan = plan_resources(None, 1, nodes=cpu_only)
    assert plan["num_gpus"] == 1 and plan["device"] == "cuda" and plan["require_gpu"]
    assert plan["min_actors"] == plan["initial_actors"] == 1
    assert plan["actors"] is None                               # unbounded: grows with GPU nodes
    assert not plan["fits_now"] and plan["need"] == {"CPU": 1.0, "GPU": 1.0}
    # GPU nodes arrive: the same settings give the same pool (it was never sized from them)
    # and now it fits; the default (no GPU setting) picks the GPU plan too.
    grown = [node(4), node(8, 4), node(8, 4)]
    again = plan_resources(None, 1, nodes=grown)
    assert again["actors"] is None and again["fits_now"]
    assert again["initial_actors"] == 8                         # the GPUs there are, at once
    assert plan_resources(None, None, nodes=grown)["num_gpus"] == 1
    # Decode tasks are elastic; the CPUs the actors leave are theirs.
    assert again["decode_max"] is None and again["decode_cpus_now"] == 20 - 8
    # An explicit cap stays a cap.
    assert plan_resources(3, 1, nodes=grown)["actors"] == 3


def test_mixed_cluster_without_gpu_setting_uses_its_gpus_and_cpu_fallback_only_when_asked():
    nodes = [HEAD_NO_CPU, node(16), node(8, 1)]
    plan = plan_resources(None, None, nodes=nodes)
    assert plan["num_gpus"] == 1 and plan["num_cpus"] == 1 and plan["require_gpu"]
    fallback = plan_resources(None, None, nodes=nodes, allow_cpu_fallback=True)
    assert not fallback["require_gpu"] and fallback["device"] is None


@pytest.mark.parametrize("bad", [1.5, 2, -1])
def test_gpu_counts_are_checked_before_anything_starts(bad):
    with pytest.raises(ValueError, match="num_gpus_per_actor must be between 0 and 1"):
        check_gpus_per_actor(bad)
    with pytest.raises(ValueError, match="num_gpus_per_actor"):
        plan_resources(None, bad, nodes=[node(4, 2)])
    check_gpus_per_actor(0.5)  # two replicas share one GPU: fine


def test_unschedulable_start_fails_with_a_message_naming_the_resource(monkeypatch):
    """No node holds a model actor now: a probe waits for one (what an autoscaler adds nodes
    for) and, when none comes, the error names what no node has before any dataset starts. When
    the probe succeeds, Ray Data's own wait for the first actor is bounded the same way."""
    import ray

    from selfment_dist.pipeline._internal import plan as _plan
    from selfment_dist.pipeline._internal import ray_runtime as _ray

    monkeypatch.setattr(_plan, "alive_nodes", lambda: [HEAD_NO_CPU, node(2)])
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    plan = plan_resources(None, 1, nodes=[HEAD_NO_CPU, node(2)])
    probed = []
    monkeypatch.setattr(_ray, "_probe_holds_a_model_actor",
                        lambda p, wait_s: probed.append((p["need"], wait_s)) or False)
    with pytest.raises(UnschedulableError, match=r"within 5 s.*GPU: 1.*\{CPU: 2\}"):
        with _ray.bounded_actor_start(plan, 5, "pseudo-label"):
            pytest.fail("no dataset starts when no node can hold a model actor")
    assert probed == [({"CPU": 1.0, "GPU": 1.0}, 5.0)]
    with _ray.bounded_actor_start(plan, 5, "segment", probe=False):  # a later block of a run
        pass
    assert len(probed) == 1
    # The probe saw room, but Ray Data's start timed out (the room went in between).
    monkeypatch.setattr(_ray, "_probe_holds_a_model_actor", lambda p, wait_s: True)
    with pytest.raises(UnschedulableError) as info:
        with _ray.bounded_actor_start(plan, 5, "pseudo-label"):
            raise ray.exceptions.GetTimeoutError("Timed out while starting actors. This may ...")
    text = str(info.value)
    assert "within 5 s" in text and "GPU: 1" in text and "{CPU: 2}" in text
    with pytest.raises(ValueError, match="actor_wait_s"):
        with _ray.bounded_actor_start(plan, 0, "segment"):
            pass


# ---------------------------------------------------------------------------------------------
# Actors and CUDA faults

def test_gpu_actor_refuses_to_fall_back_to_cpu(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [0])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(_device.GpuUnavailableError, match="refusing to run on CPU"):
        _device.actor_device("cuda", require_gpu=True)
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [])
    with pytest.raises(_device.GpuUnavailableError, match="without a GPU"):
        _device.actor_device("cuda", require_gpu=True)
    # Asked-for fallback: no check, the device is left to the backbone (CPU here).
    assert _device.actor_device(None, require_gpu=False) is None
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [0])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _device.actor_device("cuda", require_gpu=True) == "cuda"


def test_label_actor_refuses_before_building_a_model(monkeypatch):
    from selfment_dist.pipeline._internal.model_stage import ActorResources
    from selfment_dist.pipeline.pseudo_label import LabelActor
    from selfment_dist.settings import PseudoLabelSettings

    import ray
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: ["0"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(_device.GpuUnavailableError):
        LabelActor(settings=PseudoLabelSettings(inputs=["unused"], output="unused",
                                                backbone="vit_small_patch16_224.dino",
                                                weights="random", image_size=64),
                   resources=ActorResources(device="cuda", require_gpu=True))


def test_cuda_oom_retries_with_smaller_batches(monkeypatch):
    calls = []
    emptied = []
    monkeypatch.setattr(_device, "_empty_cache", lambda: emptied.append(1))
    monkeypatch.setattr(_device, "_OOM_LIMITS", {})  # this test's actor memory only

    def fn(items):
        calls.append(len(items))
        if len(items) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [f"ok{i}" for i in items]

    out = _device.run_guarded(fn, list(range(8)), what="labelling")
    assert out == [f"ok{i}" for i in range(8)]     # every image labelled, none an error row
    assert calls[:3] == [8, 4, 2] and max(calls[3:]) <= 2 and emptied
    # The actor remembers: later batches start at the size that fitted, with no OOM first.
    assert _device.oom_limit("labelling") == 2 and _device.oom_limit("segmenting") is None
    calls.clear()
    assert _device.run_guarded(fn, list(range(6)), what="labelling") == [f"ok{i}" for i in range(6)]
    assert calls == [2, 2, 2]
    _device.forget_oom_limits()
    assert _device.oom_limit("labelling") is None


def test_other_cuda_error_exits_the_actor_instead_of_writing_error_rows(monkeypatch):
    exits = []

    def fake_exit(code):
        exits.append(code)
        raise SystemExit(code)  # os._exit would end the test process

    monkeypatch.setattr(_device.os, "_exit", fake_exit)

    def fn(items):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    with pytest.raises(SystemExit):
        _device.run_guarded(fn, list(range(4)), what="labelling")
    assert exits == [1]


def test_ordinary_errors_stay_with_their_image():
    def fn(items):
        if 3 in items:
            raise ValueError("bad image")
        return list(items)

    out = _device.run_guarded(fn, [1, 2, 3, 4], what="labelling")
    assert out[:2] == [1, 2] and out[3] == 4
    assert out[2] == "labelling failed: ValueError: bad image"


def test_label_actor_with_an_injected_cuda_fault_exits(monkeypatch):
    """The actor path end to end: a sticky CUDA fault in the labeller → exit, no error rows."""
    from selfment_dist.pipeline.pseudo_label import LabelActor

    actor = object.__new__(LabelActor)
    actor.save_ncut = actor.save_features = False
    actor.counters = None
    from selfment_dist.model.preprocess import DeviceResizer
    actor.resizer = DeviceResizer(64, "cpu")

    def broken(images, **kw):
        raise RuntimeError("CUDA error: uncorrectable ECC error encountered")

    actor.labeler = broken
    monkeypatch.setattr(_device.os, "_exit", lambda code: (_ for _ in ()).throw(SystemExit(code)))
    with pytest.raises(SystemExit):
        actor._label(np.zeros((2, 64, 64, 3), np.uint8))


# ---------------------------------------------------------------------------------------------
# Numerics

def _features(seed=0, h=6, w=6, c=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, h, w, c, generator=g)


def test_ncut_and_ipo_ignore_a_callers_bf16_autocast():
    x = _features()
    plain = ncut_bipartition(x)
    refined = ipo_refine(x, plain, sample_size=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(ncut_bipartition(x), plain)
        assert torch.equal(ipo_refine(x, plain, sample_size=2), refined)
        v = fiedler_vectors(torch.nn.functional.normalize(x.reshape(2, 36, 16), dim=-1))
        assert v.dtype == torch.float32


def test_dense_eigh_fallbacks_are_counted_and_logged(monkeypatch, caplog):
    from selfment_dist.algorithm import ncut

    def never_converges(m, u0, *, return_values=False, **kw):
        out = (u0.clone(), torch.zeros(m.shape[0], dtype=torch.bool))
        return (*out, m.new_zeros(m.shape[0], 2, dtype=torch.float64)) if return_values else out

    monkeypatch.setattr(ncut, "_block_krylov_second", never_converges)
    take_dense_fallbacks()
    x = torch.nn.functional.normalize(torch.randn(3, 20, 8), dim=-1)
    with caplog.at_level("WARNING", logger="selfment_dist.algorithm.ncut"):
        fiedler_vectors(x, dense_max_nodes=4)
    assert take_dense_fallbacks() == 3 and take_dense_fallbacks() == 0
    assert any("dense float64 eigh fallback" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------------------------
# Options

def test_evaluate_with_a_model_takes_segments_actor_options(monkeypatch):
    from selfment_dist import cli

    seen = {}
    monkeypatch.setattr(cli, "_target", lambda command: lambda settings: seen.update(
        {k: getattr(settings, k) for k in settings.model_fields_set}) or {})
    assert cli.main(["evaluate", "--model", "m", "--benchmark", "B=i,g", "--output", "o",
                     "--num-actors", "2", "--num-gpus-per-actor", "1", "--cpu-fallback",
                     "--actor-wait-s", "30", "--batch-size", "4"]) == 0
    assert {k: seen[k] for k in ("num_actors", "num_gpus_per_actor", "cpu_fallback",
                                 "actor_wait_s", "batch_size")} == {
        "num_actors": 2, "num_gpus_per_actor": 1.0, "cpu_fallback": True, "actor_wait_s": 30.0,
        "batch_size": 4}


def test_evaluate_forwards_the_actor_options_to_segment(monkeypatch, tmp_path):
    from selfment_dist.pipeline import evaluate, segment

    calls = []

    def fake_segment(model, inputs, output, **kw):
        calls.append(kw)
        raise RuntimeError("stop here")

    monkeypatch.setattr(segment, "run_segment", fake_segment)
    monkeypatch.setattr(evaluate, "ensure_ray", lambda address: None)
    with pytest.raises(RuntimeError, match="stop here"):
        evaluate.run_evaluate(output=str(tmp_path), model="m",
                              benchmarks={"B": ("i", str(tmp_path))},
                              num_actors=3, num_gpus_per_actor=0.5, actor_wait_s=9)
    assert calls[0]["num_actors"] == 3 and calls[0]["num_gpus_per_actor"] == 0.5
    assert calls[0]["actor_wait_s"] == 9 and calls[0]["cpu_fallback"] is False
    assert "batch_size" not in calls[0]                 # left to run_segment's default


def test_optimizer_state_is_loaded_on_cpu_on_resume(monkeypatch, tmp_path):
    """Adam's ``step`` must stay a CPU tensor after a resume (on CUDA, map_location=device put
    it on the GPU: one sync per parameter per step)."""
    from selfment_dist.model.head import PatchHead
    from selfment_dist.pipeline._internal import train_checkpoints as train

    head = PatchHead(in_dim=8, embed_dim=4)
    opt = torch.optim.Adam(head.parameters())
    head(torch.randn(1, 4, 8))[0].sum().backward()
    opt.step()
    torch.save({"head": head.state_dict(), "optimizer": opt.state_dict()},
               tmp_path / train.STATE_FILE)
    (tmp_path / train._PROGRESS_FILE).write_text(train.Progress().to_json())
    seen = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: seen.append(kw.get("map_location"))
                        or real(*a, **kw))
    head2 = PatchHead(in_dim=8, embed_dim=4)
    opt2 = torch.optim.Adam(head2.parameters())
    train.restore(str(tmp_path), head2, opt2, torch.device("cpu"))
    assert seen == ["cpu"]
    state = next(iter(opt2.state.values()))
    assert state["step"].device.type == "cpu"


def test_the_s3_job_pins_training_to_the_multi_gpu_nodes_of_the_aws_config():
    """Training workers fit only the 4-GPU node type (NCCL inside a node), not the 1-GPU ones
    meant for the model actors."""
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[1]
    job = yaml.safe_load((root / "jobs" / "configs" / "s3.yaml").read_text())
    aws = yaml.safe_load((root / "cluster" / "aws-gpu.yaml").read_text())
    need = job["train"]["resources_per_worker"]
    fits = [name for name, t in aws["available_node_types"].items()
            if all(t["resources"].get(k, 0) >= v for k, v in need.items())]
    assert fits and all(aws["available_node_types"][n]["resources"]["GPU"] >= 4 for n in fits)
    labelling = job["pseudo_label"]
    assert labelling["num_gpus_per_actor"] == 1 and "num_actors" not in labelling
