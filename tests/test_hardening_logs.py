"""``--log-level DEBUG`` against S3 (moto) with a fake session token: the token and the secret
key appear in no log of that run, Ray's session logs included (issue 14, item 8)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import fsspec

from selfment_dist.synthetic import write_scenes

TOKEN = "FAKETOKENc0ffee5ecre7da7a0123456789abcdef"
SECRET = "FAKESECRETba5eba11deadbeef0123456789"


def test_debug_logs_never_hold_credentials(s3_bucket, tmp_path):
    bucket, storage = s3_bucket
    write_scenes(str(tmp_path / "data"), 2, size=(48, 48))
    fs = fsspec.filesystem("s3", **storage)
    for f in (tmp_path / "data" / "images").iterdir():
        fs.put_file(str(f), f"{bucket}/images/{f.name}")
    # Ray's unix sockets need a short path: not under tmp_path.
    ray_tmp = tempfile.mkdtemp(prefix="rl", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0", RAY_TMPDIR=ray_tmp)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "selfment_dist.cli", "--log-level", "DEBUG", "pseudo-label",
             "--input", f"s3://{bucket}/images", "--output", f"s3://{bucket}/out",
             "--backbone", "vit_small_patch16_224.dino", "--weights", "random",
             "--image-size", "64", "--no-progress",
             f"--storage-option=endpoint_url={storage['endpoint_url']}",
             "--storage-option=key=testing", f"--storage-option=secret={SECRET}",
             f"--storage-option=token={TOKEN}"],
            env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        logs = {"stdout": proc.stdout, "stderr": proc.stderr}
        assert "INFO selfment_dist" in proc.stderr  # the package's loggers did log
        for path in Path(ray_tmp).rglob("*"):
            if path.is_file() and not path.is_symlink() and "sockets" not in path.parts:
                try:
                    logs[str(path)] = path.read_bytes().decode("utf-8", "replace")
                except OSError:
                    continue
        assert any("/logs/" in name for name in logs), sorted(logs)[:10]
        leaks = [name for name, text in logs.items() if TOKEN in text or SECRET in text]
        assert not leaks, leaks
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
