"""What must not grow with the number of images: the done keys a resume ships to the read tasks,
and the image bytes a resume reads from a finished img2dataset shard."""
from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from selfment_dist.io.sources import iter_records
from selfment_dist.pipeline.pseudo_label import SortedKeys


def test_done_keys_travel_as_one_flat_array():
    keys = [f"shard/{i:06d}" for i in range(5000)] + ["ünïcode/ key"]
    done = SortedKeys.build(keys)
    assert done.keys.dtype.kind == "S" and len(done) == len(keys)   # zero-copy in the store
    assert all(k in done for k in keys[::97]) and "ünïcode/ key" in done
    assert "shard/005000" not in done and "" not in done and "shard/00000" not in done
    assert "x" not in SortedKeys.build([])


def _shard(path, n: int, group: int) -> list[str]:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, "JPEG")
    keys = [f"{i:05d}" for i in range(n)]
    pq.write_table(pa.table({"key": keys, "jpg": [buf.getvalue()] * n}), path,
                   row_group_size=group)
    return keys


def test_resume_reads_no_image_bytes_of_finished_row_groups(tmp_path, monkeypatch):
    path = tmp_path / "00000.parquet"
    keys = _shard(path, 30, group=10)
    read_groups = []
    real = pq.ParquetFile.iter_batches

    def spy(self, *args, **kwargs):
        read_groups.extend(kwargs.get("row_groups") or [])
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    unit = {"kind": "parquet", "uri": str(path), "key": "00000"}
    done = SortedKeys.build(keys[:20] + ["00025"])
    got = [r["key"] for r in iter_records(unit, skip=done)]
    assert got == [k for k in keys[20:] if k != "00025"]
    assert read_groups == [2]            # groups 0 and 1: key column only
    # Nothing done: every group is read, every row comes out.
    read_groups.clear()
    assert [r["key"] for r in iter_records(unit, skip=frozenset())] == keys
    assert read_groups == [0, 1, 2]


def test_duplicate_keys_still_come_out_once_each_when_their_group_is_done(tmp_path):
    path = tmp_path / "dup.parquet"
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "PNG")
    pq.write_table(pa.table({"key": ["a", "a", "b", "c"], "png": [buf.getvalue()] * 4}), path,
                   row_group_size=2)
    unit = {"kind": "parquet", "uri": str(path), "key": "dup"}
    got = [r["key"] for r in iter_records(unit, skip=SortedKeys.build(["a", "b", "c"]))]
    assert got == ["a#dup1"]             # the repeat is not "done" under its own key
