"""selfment_dist.io: storage options, mask/feature encoding, the schema, decoding, sources (no Ray)."""
from __future__ import annotations

import io
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from selfment_dist.io import (PSEUDO_LABEL_SCHEMA, ImageDecodeError, decode_features,
                              decode_image, decode_mask, encode_features, encode_mask,
                              enumerate_units, error_row, iter_records, join,
                              parse_storage_options, pseudo_label_schema, url_to_fs)
from selfment_dist.io.storage import is_local, to_uri


def _encode(array_or_image, fmt: str, **kw) -> bytes:
    im = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(array_or_image)
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _rgb(h=24, w=32, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# --- storage -----------------------------------------------------------------------------------

def test_parse_storage_options_types():
    opts = parse_storage_options([
        "endpoint_url=http://127.0.0.1:9000/x?a=b", "max_concurrency=8", "timeout=2.5",
        "anon=false", "use_ssl=TRUE", "token=none", "client_kwargs.region_name=eu-west-1",
        'config_kwargs={"retries": {"max_attempts": 3}}', "key=007abc"])
    assert opts == {
        "endpoint_url": "http://127.0.0.1:9000/x?a=b", "max_concurrency": 8, "timeout": 2.5,
        "anon": False, "use_ssl": True, "token": None,
        "client_kwargs": {"region_name": "eu-west-1"},
        "config_kwargs": {"retries": {"max_attempts": 3}}, "key": "007abc"}
    assert isinstance(opts["max_concurrency"], int) and isinstance(opts["timeout"], float)
    assert parse_storage_options(None) == {} and parse_storage_options([]) == {}


@pytest.mark.parametrize("bad", ["novalue", "=x", " =1"])
def test_parse_storage_options_rejects(bad):
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_storage_options([bad])


def test_join_and_url_to_fs(tmp_path):
    assert join("s3://bucket/out/", "part.parquet") == "s3://bucket/out/part.parquet"
    assert join("s3://bucket", "a", "/b/", "c.json") == "s3://bucket/a/b/c.json"
    assert join("/tmp/x", "y") == "/tmp/x/y"
    fs, path = url_to_fs(str(tmp_path))
    assert is_local(fs) and to_uri(fs, path) == path
    mfs, mpath = url_to_fs("memory://bucket/k")
    assert not is_local(mfs) and to_uri(mfs, mpath).startswith("memory://")
    assert to_uri(mfs, mpath).endswith("/bucket/k")


# --- masks, features, schema -------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (4, 4), (48, 48), (7, 13)])
def test_mask_round_trip(shape):
    mask = np.random.default_rng(1).random(shape) > 0.5
    data = encode_mask(mask)
    assert data == np.packbits(mask, axis=None).tobytes()  # the contract, literally
    assert len(data) == (mask.size + 7) // 8
    np.testing.assert_array_equal(decode_mask(data, *shape), mask)


def test_mask_errors():
    with pytest.raises(ValueError, match="2-D"):
        encode_mask(np.zeros(5, bool))
    with pytest.raises(ValueError, match="expected 2 bytes"):
        decode_mask(b"\x00", 4, 4)


def test_features_round_trip():
    feats = np.random.default_rng(2).standard_normal((3, 4, 6)).astype(np.float16)
    out = decode_features(encode_features(feats), 3, 4)
    assert out.dtype == np.float16 and out.shape == (3, 4, 6)
    np.testing.assert_array_equal(out, feats)


def test_schema_matches_contract():
    types = {f.name: f.type for f in PSEUDO_LABEL_SCHEMA}
    assert types == {"key": pa.string(), "source": pa.string(), "width": pa.int32(),
                     "height": pa.int32(), "grid_h": pa.int16(), "grid_w": pa.int16(),
                     "mask": pa.binary(), "fg_fraction": pa.float32(), "error": pa.string(),
                     "error_kind": pa.string(),
                     # issue 13: quality columns
                     "fiedler_value": pa.float32(), "spectral_gap": pa.float32(),
                     "ncut_value": pa.float32(), "border_fraction": pa.float32(),
                     "ipo_change": pa.float32(), "ipo_converged": pa.bool_(),
                     "confidence": pa.float32(), "no_object": pa.bool_()}
    full = pseudo_label_schema(ncut_mask=True, features=True)
    assert full.names[-2:] == ["ncut_mask", "features"]
    assert full.field("ncut_mask").type == pa.binary() == full.field("features").type


def test_error_row_fits_schema():
    row = error_row("a/b", "s3://x/a/b.jpg", "empty file (0 bytes)", width=3, height=4)
    table = pa.Table.from_pylist([row], schema=pseudo_label_schema(ncut_mask=True, features=True))
    got = table.to_pylist()[0]
    assert got["error"] == "empty file (0 bytes)" and got["mask"] is None and got["width"] == 3
    pa.Table.from_pylist([error_row("k", "s", "m")], schema=PSEUDO_LABEL_SCHEMA)
    with pytest.raises(ValueError):
        error_row("k", "s", "")


# --- decoding ----------------------------------------------------------------------------------

def test_decode_ok_modes():
    rgb = _rgb()
    im = decode_image(_encode(rgb, "PNG"))
    assert im.mode == "RGB" and im.size == (32, 24)
    np.testing.assert_array_equal(np.asarray(im), rgb)
    assert decode_image(_encode(rgb, "JPEG")).size == (32, 24)
    rgba = np.concatenate([rgb, np.full((24, 32, 1), 128, np.uint8)], -1)
    assert decode_image(_encode(rgba, "PNG")).mode == "RGB"
    assert decode_image(_encode(Image.new("P", (5, 7)), "GIF")).size == (5, 7)
    grey16 = (np.arange(24 * 32, dtype=np.uint16).reshape(24, 32) * 80)
    out = np.asarray(decode_image(_encode(grey16, "PNG")))
    np.testing.assert_array_equal(out[..., 0], (grey16 >> 8).astype(np.uint8))


def test_decode_applies_exif_orientation():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise for display
    im = decode_image(_encode(_rgb(24, 32), "JPEG", exif=exif))
    assert im.size == (24, 32)  # width/height swapped: the displayed orientation


def test_decode_failures_have_clear_messages():
    jpeg = _encode(_rgb(64, 64), "JPEG")
    cases = {
        b"": "empty file",
        b"hello, I am a text file named .jpg": "not an image",
        jpeg[: len(jpeg) // 2]: "truncated or corrupt JPEG",
        _encode(np.zeros((8, 8), np.float32), "TIFF"): "unsupported image mode 'F'",
        _encode(np.zeros((8, 8), np.int32), "TIFF"): "unsupported image mode 'I'",
    }
    for data, message in cases.items():
        with pytest.raises(ImageDecodeError, match=message):
            decode_image(data)


def test_pixel_limit_checked_before_decoding(monkeypatch):
    bomb = _encode(Image.new("1", (4000, 3000)), "PNG")  # 12 MP in a few kB
    assert len(bomb) < 100_000

    def no_decode(self, *a, **k):
        raise AssertionError("pixels decoded before the size check")

    monkeypatch.setattr(Image.Image, "load", no_decode)
    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", no_decode)
    with pytest.raises(ImageDecodeError, match=r"too many pixels: 4000x3000 = 12,000,000 > "
                                               r"max_pixels 1,000,000"):
        decode_image(bomb, max_pixels=1_000_000)


# --- sources -----------------------------------------------------------------------------------

def _write(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _records(units, **kw):
    return [r for u in units for r in iter_records(u, **kw)]


def test_folder_keys_and_skips(tmp_path):
    png = _encode(_rgb(), "PNG")
    _write(tmp_path / "a.jpg", png)
    _write(tmp_path / "sub" / "dir" / "b.png", png)
    _write(tmp_path / "c.jpg", png)
    _write(tmp_path / "c.png", png)           # same stem as c.jpg: both keep their extension
    _write(tmp_path / "notes.json", b"{}")    # not an input
    _write(tmp_path / ".hidden.jpg", png)     # hidden
    _write(tmp_path / "_tmp" / "x.jpg", png)  # our own output folder: skipped (skip_rules)
    units = enumerate_units(str(tmp_path))
    assert [u["key"] for u in units] == ["a", "c.jpg", "c.png", "sub/dir/b"]
    assert {u["kind"] for u in units} == {"image"}
    recs = _records(units)
    assert all(r["data"] == png and r["error"] is None for r in recs)
    assert recs[0]["source"] == str(tmp_path / "a.jpg")
    # Stable: the same keys on every enumeration; skip drops done keys.
    assert enumerate_units(str(tmp_path)) == units
    assert [r["key"] for r in _records(units, skip={"a", "c.png"})] == ["c.jpg", "sub/dir/b"]


def test_glob_list_file_and_single_file(tmp_path):
    png = _encode(_rgb(), "PNG")
    for rel in ("imgs/x/1.jpg", "imgs/x/2.jpg", "imgs/y/3.jpg", "imgs/y/4.png"):
        _write(tmp_path / rel, png)
    units = enumerate_units(str(tmp_path / "imgs" / "*" / "*.jpg"))
    assert [u["key"] for u in units] == ["x/1", "x/2", "y/3"]
    lst = _write(tmp_path / "lists" / "todo.txt",
                 b"# comment\n\n../imgs/x/1.jpg\n" + str(tmp_path / "imgs/y/4.png").encode()
                 + b"\n../imgs/y/missing.jpg\n")
    units = enumerate_units(str(lst))
    assert [u["key"] for u in units] == ["x/1", "y/4", "y/missing"]
    recs = _records(units)
    assert recs[2]["data"] is None and "cannot read file" in recs[2]["error"]
    assert [u["key"] for u in enumerate_units(str(tmp_path / "imgs/y/4.png"))] == ["4"]
    with pytest.raises(FileNotFoundError):
        enumerate_units(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError):
        enumerate_units(str(tmp_path / "imgs" / "*.webp"))


def test_duplicate_keys_across_inputs_are_refused(tmp_path):
    png = _encode(_rgb(), "PNG")
    _write(tmp_path / "a" / "k.jpg", png)
    _write(tmp_path / "b" / "k.jpg", png)
    with pytest.raises(ValueError, match="same key 'k.jpg'"):
        enumerate_units([str(tmp_path / "a"), str(tmp_path / "b")])


def test_parquet_source(tmp_path):
    png = _encode(_rgb(), "PNG")
    table = pa.table({
        "key": ["000", "001", "002", "001", None],
        "jpg": [png, None, b"", png, png],
        "status": ["success", "failed_to_download", "success", "success", "success"],
        "error_message": [None, "HTTP 404", None, None, None],
        "url": ["u0", "u1", "u2", "u3", "u4"]})
    path = tmp_path / "shard" / "00000.parquet"
    path.parent.mkdir()
    pq.write_table(table, path, row_group_size=2)
    units = enumerate_units(str(tmp_path / "shard"))
    assert units == [{"kind": "parquet", "uri": str(path), "key": "00000.parquet"}]
    recs = _records(units)
    assert [r["key"] for r in recs] == ["000", "001", "002", "001#dup1", "00000/000000004"]
    assert recs[0]["data"] == png and recs[0]["error"] is None
    assert "no image bytes" in recs[1]["error"] and "HTTP 404" in recs[1]["error"]
    assert "empty image bytes" in recs[2]["error"]
    assert "duplicate key '001'" in recs[3]["error"]
    assert recs[4]["data"] == png
    assert {r["source"] for r in recs} == {str(path)}
    assert [r["key"] for r in _records(units, skip={"000", "002"})] == \
        ["001", "001#dup1", "00000/000000004"]


def test_parquet_source_without_image_column(tmp_path):
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"key": ["a"], "caption": ["hi"]}), path)
    (rec,) = _records(enumerate_units(str(path)))
    assert rec["key"] == "x.parquet" and "no image column" in rec["error"]
    assert "caption" in rec["error"]


def test_parquet_image_struct_column(tmp_path):
    png = _encode(_rgb(), "PNG")
    path = tmp_path / "hf.parquet"
    pq.write_table(pa.table({"key": ["k"], "image": [{"bytes": png, "path": "k.png"}]}), path)
    (rec,) = _records(enumerate_units(str(path)))
    assert rec["data"] == png


def _tar(members: list[tuple[str, bytes]], gz: bool = False) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_webdataset_source(tmp_path):
    png, jpg = _encode(_rgb(), "PNG"), _encode(_rgb(), "JPEG")
    data = _tar([("s/000.jpg", jpg), ("s/000.json", b"{}"), ("s/000.seg.png", png),
                 ("s/001.txt", b"caption only"),
                 ("s/002.png", png), ("s/002.cls", b"3")])
    _write(tmp_path / "shards" / "a-000.tar", data)
    _write(tmp_path / "shards" / "b-000.tar.gz", _tar([("9.webp", _encode(_rgb(), "WEBP"))], gz=True))
    units = enumerate_units(str(tmp_path / "shards"))
    assert [(u["kind"], u["key"]) for u in units] == [("tar", "a-000.tar"), ("tar", "b-000.tar.gz")]
    recs = _records(units)
    assert [r["key"] for r in recs] == ["s/000", "s/001", "s/002", "9"]
    assert recs[0]["data"] == jpg  # the plain image member, not the .seg.png
    assert "no image member (found .txt)" in recs[1]["error"]
    assert recs[2]["data"] == png and recs[3]["data"]


def test_truncated_tar_keeps_what_was_read(tmp_path):
    jpg = _encode(_rgb(64, 64), "JPEG")
    data = _tar([(f"{i:03d}.jpg", jpg) for i in range(4)])
    path = _write(tmp_path / "cut.tar", data[: 512 * 2 + len(jpg) + 700])
    recs = _records(enumerate_units(str(path)))
    assert recs[0]["key"] == "000" and recs[0]["data"] == jpg
    assert recs[-1]["key"] == "cut.tar"
    assert "unreadable WebDataset shard after" in recs[-1]["error"]
    # A shard whose error row is already done is not reported twice.
    assert all(r["key"] != "cut.tar" for r in _records(enumerate_units(str(path)),
                                                        skip={"cut.tar"}))


def test_non_local_filesystem():
    import fsspec

    fs = fsspec.filesystem("memory")
    png = _encode(_rgb(), "PNG")
    fs.pipe({"/bkt/in/a/1.jpg": png, "/bkt/in/2.png": png})
    units = enumerate_units("memory://bkt/in")
    assert [u["key"] for u in units] == ["2", "a/1"]
    assert units[0]["uri"].startswith("memory://")
    assert _records(units)[1]["data"] == png
    fs.rm("/bkt", recursive=True)
