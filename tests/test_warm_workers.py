"""``model_workers="tasks"`` without Ray: what a warm worker keeps, and when it builds anew;
and what the stage refuses. (The pipelines on warm workers: test_pseudo_label.py.)"""
from __future__ import annotations

import pytest

from selfment_dist.pipeline._internal import warm as _warm
from selfment_dist.pipeline._internal.ray_runtime import UnschedulableError, check_model_workers


class Replica:
    built = 0

    def __init__(self, *, size: int, counters=None):
        Replica.built += 1
        self.size, self.counters = size, counters

    def __call__(self, batch):
        return [self.size, self.counters, batch]


@pytest.fixture(autouse=True)
def fresh_worker():
    _warm.forget()
    Replica.built = 0
    yield
    _warm.forget()


def test_a_worker_keeps_one_replica_per_settings_and_takes_each_runs_counters():
    run = _warm.run_on_warm_worker
    assert run("b1", udf_class=Replica, kwargs={"size": 64, "counters": "run-1"}) == [
        64, "run-1", "b1"]
    # Another run (its own counters), same settings: the same replica, told the new counters.
    assert run("b2", udf_class=Replica, kwargs={"size": 64, "counters": "run-2"}) == [
        64, "run-2", "b2"]
    assert Replica.built == 1
    # Other settings: built anew, and the worker keeps only that one.
    assert run("b3", udf_class=Replica, kwargs={"size": 32, "counters": "run-3"})[0] == 32
    assert run("b4", udf_class=Replica, kwargs={"size": 64, "counters": "run-4"})[0] == 64
    assert Replica.built == 3


def test_tasks_refuse_gpus_and_an_unschedulable_replica_at_once():
    cpu = {"num_gpus": 0, "fits_now": True, "need": {"CPU": 1.0}}
    check_model_workers("actors", {**cpu, "num_gpus": 1}, "segment")  # actors: GPUs are fine
    check_model_workers("tasks", cpu, "segment")
    with pytest.raises(ValueError, match="model_workers='tasks' runs on CPUs only"):
        check_model_workers("tasks", {**cpu, "num_gpus": 1}, "segment")
    with pytest.raises(UnschedulableError, match="segment: no model replica can start now"):
        check_model_workers("tasks", {**cpu, "fits_now": False, "need": {"CPU": 64.0}},
                            "segment")
    with pytest.raises(ValueError, match="model_workers must be one of actors, tasks"):
        check_model_workers("threads", cpu, "segment")
