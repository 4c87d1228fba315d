"""Shared fixtures: offline hub, a local S3 server (moto) and one local Ray per test module."""
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


@pytest.fixture(scope="module")
def ray_local():
    """One in-process Ray per test module (start-up costs seconds)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    # address="local": never attach to another Ray on this machine (a multi-node test cluster,
    # another user's `ray start`), which would also refuse num_cpus.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False, ignore_reinit_error=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def fast_train_controller():
    """Ray Train V2's controller polls its workers (and drains their reports) every 2 s by
    default; poll every 0.2 s, so short epochs and checkpoints do not each wait for it (a CLI
    run started by the test inherits the setting)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
        yield
