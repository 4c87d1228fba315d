"""A resume over a finished output of img2dataset shards reads key columns only and starts no
read task and no model actor; a shard with keys left is still read, its done rows skipped."""
from __future__ import annotations

import io
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from selfment_dist.io.sources import container_key_array, container_keys, iter_records
from selfment_dist.pipeline import pseudo_label
from selfment_dist.pipeline._internal.done_keys import SortedKeys
from selfment_dist.data.synthetic import make_scene


def _jpg(i: int, px: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(make_scene((7, i), size=(px, px))[0]).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _shard(path, keys: list, *, image_column: str = "jpg") -> None:
    table = {"jpg" if image_column == "jpg" else image_column: [_jpg(i) for i in range(len(keys))]}
    if keys is not None:
        table = {"key": keys, **table}
    pq.write_table(pa.table(table), path, row_group_size=4)


@pytest.mark.parametrize("keys", [["a", "b", None, "a", ""], ["x", "y", "z"]])
def test_container_keys_name_rows_as_reading_does(tmp_path, keys):
    path = tmp_path / "s.parquet"
    _shard(path, keys)
    unit = {"kind": "parquet", "uri": str(path), "key": "s.parquet"}
    assert container_keys(unit) == [r["key"] for r in iter_records(unit)]
    assert container_key_array(unit).to_pylist() == container_keys(unit)


def test_container_keys_without_key_column_or_image_column(tmp_path):
    no_key = tmp_path / "nokey.parquet"
    pq.write_table(pa.table({"jpg": [_jpg(0), _jpg(1)]}), no_key)
    unit = {"kind": "parquet", "uri": str(no_key), "key": "sub/nokey.parquet"}
    assert container_keys(unit) == [r["key"] for r in iter_records(unit)]
    no_image = tmp_path / "noimg.parquet"
    pq.write_table(pa.table({"key": ["a"], "caption": ["hi"]}), no_image)
    unit = {"kind": "parquet", "uri": str(no_image), "key": "noimg.parquet"}
    assert container_keys(unit) == [r["key"] for r in iter_records(unit)] == ["noimg.parquet"]
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really")
    assert container_keys({"kind": "parquet", "uri": str(broken), "key": "b"}) is None
    assert container_key_array({"kind": "parquet", "uri": str(broken), "key": "b"}) is None
    tar = tmp_path / "s.tar"
    with tarfile.open(tar, "w"):
        pass
    assert container_keys({"kind": "tar", "uri": str(tar), "key": "s.tar"}) is None


def test_contains_all():
    done = SortedKeys.build(["a", "bb", "ccc"])
    assert done.contains_all(["ccc", "a"]) and done.contains_all([])
    assert not done.contains_all(["a", "b"]) and not done.contains_all(["cccc"])
    assert not SortedKeys.build([]).contains_all(["a"])
    assert done.contains_arrow(pa.array(["bb", "a"]))
    assert done.contains_arrow(pa.array([], pa.string()))
    assert not done.contains_arrow(pa.array(["bb", "b"]))
    assert not done.contains_arrow(pa.array(["a", None]))
    arrow, repeats = SortedKeys.from_arrow([pa.chunked_array([["bb", "a"], ["ccc", "a"]])])
    assert arrow.keys.tolist() == done.keys.tolist() and repeats == 1
    assert list(arrow) == ["a", "bb", "ccc"] and SortedKeys.build(arrow) is arrow
    assert arrow.contains_each(["a", "b", "ccc"]).tolist() == [True, False, True]


def test_resume_skips_finished_shards_and_starts_nothing_when_all_done(ray_local, tmp_path,
                                                                       monkeypatch):
    shards = tmp_path / "shards"
    shards.mkdir()
    _shard(shards / "00000.parquet", [f"a{i}" for i in range(6)])
    _shard(shards / "00001.parquet", [f"b{i}" for i in range(6)])
    out = str(tmp_path / "labels")
    kw = dict(backbone="vit_small_patch16_224.dino", weights="random", image_size=64,
              batch_size=4, num_actors=1, progress=False, model_workers="tasks")
    first = pseudo_label.run_pseudo_label([str(shards / "00000.parquet")], out, **kw)
    assert first["images"] == 6

    built = []
    real = pseudo_label.model_dataset

    def spy(units, **kwargs):
        built.append([u["uri"].rsplit("/", 1)[-1] for u in units])
        return real(units, **kwargs)

    monkeypatch.setattr(pseudo_label, "model_dataset", spy)
    # A new shard beside a finished one: only the new shard is read.
    second = pseudo_label.run_pseudo_label([str(shards)], out, **kw)
    assert built == [["00001.parquet"]]
    assert (second["images"], second["skipped"], second["rows_total"]) == (6, 6, 12)
    # Half of a shard done: the shard is read, its done rows skipped.
    part = next(p for p in (tmp_path / "labels").glob("part-*.parquet")   # run ids are random
                if "b0" in pq.read_table(p, columns=["key"]).column("key").to_pylist())
    table = pq.read_table(part)
    keep = pa.array([k.startswith("a") or k in ("b0", "b1", "b2") for k in
                     table.column("key").to_pylist()])
    pq.write_table(table.filter(keep), part)
    built.clear()
    third = pseudo_label.run_pseudo_label([str(shards)], out, **kw)
    assert built == [["00001.parquet"]]
    assert (third["images"], third["skipped"], third["rows_total"]) == (3, 9, 12)
    # Everything done: no dataset, so no read task and no model actor.
    built.clear()
    fourth = pseudo_label.run_pseudo_label([str(shards)], out, **kw)
    assert built == []
    assert (fourth["images"], fourth["skipped"], fourth["rows_total"]) == (0, 12, 12)
    keys = pq.read_table(tmp_path / "labels", columns=["key"]).column("key").to_pylist()
    assert sorted(keys) == sorted([f"a{i}" for i in range(6)] + [f"b{i}" for i in range(6)])
