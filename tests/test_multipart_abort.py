"""A part too large for one PUT fails mid-upload on S3 (moto): nothing is published, no multipart
upload is left behind (they cost storage until aborted), and the retried write completes.

The sink is :class:`PartsSink`, the write task's code, called here as Ray Data calls it in a
worker. ``default_block_size`` (a user's storage option, 5 MiB: s3fs's minimum) makes a ~12 MiB
part a multipart upload: its first 5 MiB is uploaded while the part is still being written. The
failures are the two a worker meets: the rows stop coming (an upstream error), and the store
refuses a request (a dropped connection: every ``upload_part`` after the first fails, or the
final ``complete_multipart_upload`` does).
"""
from __future__ import annotations

from types import SimpleNamespace

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs

from selfment_dist.pipeline._internal.parts import PartsSink

BLOCK = 5 * 2**20
SCHEMA = pa.schema([("key", pa.string()), ("blob", pa.binary()), ("error", pa.string())])
ROWS, ROW_BYTES = 24, 2**19  # 12 MiB of incompressible bytes: three parts of an upload


def _blocks(fail_after: int | None = None):
    rng = np.random.default_rng(0)
    for i in range(0, ROWS, 4):
        if fail_after is not None and i >= fail_after:
            raise RuntimeError("upstream task failed")
        yield pa.table({"key": [f"k{j:03d}" for j in range(i, i + 4)],
                        "blob": [rng.bytes(ROW_BYTES) for _ in range(4)],
                        "error": pa.nulls(4, pa.string())}, schema=SCHEMA)


class _Refuse:
    """Patches s3fs's S3 calls: ``method`` fails (after ``after`` successful calls)."""

    def __init__(self, monkeypatch, method: str, after: int = 0):
        self.calls: list[str] = []
        real = s3fs.core.S3File._call_s3

        def call(file, name, *args, **kwargs):
            self.calls.append(name)
            if name == method and self.calls.count(name) > after:
                raise OSError(f"{name}: connection reset by peer (injected)")
            return real(file, name, *args, **kwargs)
        monkeypatch.setattr(s3fs.core.S3File, "_call_s3", call)


@pytest.mark.parametrize("failure", ["upstream", "upload_part", "complete"])
def test_a_failed_multipart_part_is_aborted_and_the_retry_completes(s3_bucket, monkeypatch,
                                                                   failure):
    bucket, storage = s3_bucket
    storage = {**storage, "default_block_size": BLOCK}
    client = boto3.client("s3", endpoint_url=storage["endpoint_url"], region_name="us-east-1")
    prefix = f"out-{failure}"  # the bucket's name is shared by the parametrisations
    sink = PartsSink(f"s3://{bucket}/{prefix}", SCHEMA, "feedfeedfeed", ROWS, storage)
    ctx = SimpleNamespace(task_idx=0)
    name = f"{prefix}/part-feedfeedfeed-000000.parquet"

    with monkeypatch.context() as patch:
        refused = None
        if failure == "upload_part":
            refused = _Refuse(patch, "upload_part", after=1)
        elif failure == "complete":
            refused = _Refuse(patch, "complete_multipart_upload")
        blocks = _blocks(fail_after=16 if failure == "upstream" else None)
        with pytest.raises((OSError, RuntimeError)):
            sink.write(blocks, ctx)
    if refused is not None:
        assert "create_multipart_upload" in refused.calls  # it was a multipart upload
    uploads = client.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", [])
    assert uploads == [], "a multipart upload was left dangling"
    listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    assert [o["Key"] for o in listed] == [], "a partial part was published"

    # The retry (Ray retries the write task under the same name) publishes the whole part.
    result = sink.write(_blocks(), ctx)
    assert result["file"] == name.rsplit("/", 1)[1] and result["rows"] == ROWS
    assert client.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", []) == []
    fs = s3fs.S3FileSystem(**storage)
    fs.invalidate_cache()
    with fs.open(f"{bucket}/{name}", "rb") as f:
        table = pq.read_table(f)
    assert table.column("key").to_pylist() == [f"k{j:03d}" for j in range(ROWS)]
    assert sum(len(b) for b in table.column("blob").to_pylist()) == ROWS * ROW_BYTES
