"""Shared fixtures: offline hub, a local S3 server (moto) and one in-process local Ray that the
modules share."""
from __future__ import annotations

import os

import pytest

# Nothing in the suite may wait on a network: the model hub is off, and S3 is a local server.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
# Ray Train V2's controller polls its workers (and drains their reports) every 2 s by default;
# every 0.2 s, short epochs and checkpoints do not each wait for it. Set before any Ray starts:
# Ray's workers (the controller among them) and the CLI runs the tests start inherit it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
# Ray Train V2 starts a PreemptionWatcher actor (one more Python process, seconds of CPU) per
# run to react to node drains (spot preemption); no test drains a node (the multi-node tests
# remove nodes ungracefully), and Ray keeps this flag as the watcher's off switch.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# Ray keeps idle workers up to a soft limit (the node's CPU count, 2 here) and ends the others
# after a second; each pipeline run then restarted most of its decode and write workers (Python,
# Ray, Ray Data and pyarrow imports). The suite's drivers run pipeline after pipeline, as a
# long-lived driver would: keeping a dozen idle workers saves ~5-8% of the in-process modules'
# time. (Ray's system setting, read from the environment by every Ray the suite starts.)
os.environ.setdefault("RAY_num_workers_soft_limit", "12")

# Modules that replace the in-process Ray with a cluster of their own run last, so the shared
# one is started once (see ``ray_local``).
_LAST = ("test_multinode.py",)

# Two lanes, one per pytest-xdist worker (`-n 2` in pyproject's addopts). The suite is bound by
# process start-ups, most of them one Python import after another, so a single lane keeps the
# two cores busy only about two thirds of the time. Lane "shared": the modules on the shared
# in-process Ray (``ray_local``, started once per lane and kept warm), the kill tests among them
# (their re-runs). Lane "own": the modules that bring Rays of their own (a multi-node cluster, a
# `ray start` head, the demo's CLI) and those that need no Ray. Whole lanes, never single tests,
# go to a worker: a module's fixtures (a multi-node cluster) must exist once. The two take about
# the same time (see the README's Tests section).
SHARED_RAY_LANE = (
    "test_confidence.py", "test_driver_memory.py", "test_evaluate.py", "test_hardening_runs.py",
    "test_instances.py",
    "test_kill_resume.py", "test_official_semantics.py", "test_pipeline_strength.py",
    "test_pseudo_label.py", "test_pseudo_label_kill.py", "test_scale_resume.py",
    "test_segment.py", "test_train.py", "test_fidelity.py", "test_reproducing.py")


def lane(nodeid: str) -> str:
    return "shared" if nodeid.split("::", 1)[0].rsplit("/", 1)[-1] in SHARED_RAY_LANE else "own"


def pytest_collection_modifyitems(session, config, items):
    items.sort(key=lambda item: item.path.name in _LAST)  # stable: order kept otherwise
    strays = sorted({item.path.name for item in items if "ray_local" in item.fixturenames
                     and item.path.name not in SHARED_RAY_LANE})
    if strays:  # a second shared Ray in the other lane would cost its start and warm-up
        raise pytest.UsageError(f"tests/conftest.py: add {', '.join(strays)} to SHARED_RAY_LANE "
                                "(they use ray_local)")


def pytest_xdist_make_scheduler(config, log):
    """One work unit per lane. (xdist's own `--dist loadgroup` would do this with markers, but
    xdist 3.8 tags the groups onto `item._nodeid`, which pytest 9.2 no longer reads.)"""
    from xdist.scheduler import LoadScopeScheduling

    class LaneScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return lane(nodeid)

    return LaneScheduling(config, log)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API (moto's server) on 127.0.0.1; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    # Port 0: the server binds a free port itself and keeps it (no probe-release-reuse race).
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh bucket; yields (bucket_name, storage_options) for fsspec/s3fs."""
    import boto3

    name = "t-" + request.node.name.lower().replace("_", "-").replace("[", "-").replace("]", "")[:40]
    name = "".join(c for c in name if c.isalnum() or c == "-").strip("-")
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    client.create_bucket(Bucket=name)
    yield name, {"endpoint_url": s3_server, "key": "testing", "secret": "testing"}


_SHARED: dict = {}


def _shared_ray_is_up(ray) -> bool:
    try:
        return ray.is_initialized() and ray.get_runtime_context().gcs_address == _SHARED.get("gcs")
    except Exception:  # a client connection, or one that is going away
        return False


@pytest.fixture(scope="session")
def _ray_for_the_session():
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_local(_ray_for_the_session):
    """The suite's in-process local Ray (2 CPUs), started on first use and shared by every module
    that asks for it: a fresh Ray costs seconds to start, and more for its first dataset (Ray
    Data's own actors, task workers importing torch and timm); the task workers it keeps are
    reused by later modules. A module that connected this process to another Ray (a multi-node
    cluster) is followed by a fresh local one."""
    import ray

    if ray.is_initialized() and not _shared_ray_is_up(ray):
        ray.shutdown()
    if not ray.is_initialized():
        # address="local": never attach to another Ray on this machine (a multi-node test
        # cluster, another user's `ray start`), which would also refuse num_cpus.
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
        _SHARED["gcs"] = ray.get_runtime_context().gcs_address
    yield ray
