"""Input and config rules of issue 30 (docs/inputs.md), no Ray: which names are inputs and which
are skipped (and counted), literal paths that look like globs, tar members of every type, and
configs that must fail in one line (alias bombs, list sections, one option spelt twice, an
image size that cannot fit in memory)."""
from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import time

import pytest

from cli_output import cli_error_lines
import ray
from PIL import Image

from selfment_dist import cli
from selfment_dist.config import read_config
from selfment_dist.errors import SelfmentUserError
from selfment_dist.io.sources import enumerate_units, iter_records
from selfment_dist.settings import PseudoLabelSettings, SegmentSettings, SettingsError, validate


@pytest.fixture(autouse=True)
def _no_ray(monkeypatch):
    """Every check here happens before Ray: reaching ``ray.init`` fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a check in this file reached Ray")
    monkeypatch.setattr(ray, "init", refuse)


def _jpeg(seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (seed, 2 * seed % 256, 40)).save(buf, "JPEG")
    return buf.getvalue()


def _write(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


_cli = cli_error_lines  # (exit code, selfment:/Traceback lines)


# -- 1: names starting with "_" are images; the few skipped names are counted ---------------------

def test_camera_names_are_inputs_and_skipped_names_are_counted(tmp_path):
    for rel in ("_DSC0001.JPG", "DSC0002.JPG", "_selects/DSC0003.JPG"):
        _write(tmp_path / rel, _jpeg())
    # Skipped on purpose, each counted: macOS litter, hidden folders, markers, our own outputs.
    for rel in ("._DSC0002.JPG", ".DS_Store", ".git/objects/x.jpg", "_SUCCESS",
                "__MACOSX/._DSC0001.JPG", "_tmp/part.jpg", "_overlays/DSC0002.png"):
        _write(tmp_path / rel, b"litter")
    _write(tmp_path / "DSC0002.xmp", b"<x/>")  # a sidecar: not an input by its extension
    units = enumerate_units(str(tmp_path))
    assert [u["key"] for u in units] == ["DSC0002", "_DSC0001", "_selects/DSC0003"]
    skipped = units.skipped
    assert skipped["total"] == 8
    assert skipped["by_reason"] == {"hidden": 3, "marker": 1, "system": 1, "selfment output": 2,
                                    "not an image": 1}
    assert ".git" in skipped["examples"] and "_SUCCESS" in skipped["examples"]


def test_enumeration_of_a_glob_also_counts_skips(tmp_path):
    _write(tmp_path / "a" / "_x.jpg", _jpeg())
    _write(tmp_path / "a" / "._x.jpg", b"litter")
    units = enumerate_units(str(tmp_path / "a" / "*.jpg"))
    assert [u["key"] for u in units] == ["_x"]
    assert units.skipped["total"] == 1


# -- 6: a literal path that holds glob characters ------------------------------------------------

def test_an_existing_path_with_glob_characters_is_taken_literally(tmp_path):
    folder = tmp_path / "photos [2020]"
    _write(folder / "a.jpg", _jpeg())
    _write(tmp_path / "photos 2" / "b.jpg", _jpeg())  # what the glob would have matched
    assert [u["key"] for u in enumerate_units(str(folder))] == ["a"]
    single = _write(tmp_path / "what?.jpg", _jpeg())
    assert [u["uri"] for u in enumerate_units(str(single))] == [str(single)]
    # Not an existing path: a glob, as before; a one-character class forces one.
    assert [u["key"] for u in enumerate_units(str(tmp_path / "photos [2]" / "*"))] == ["photos 2/b"]
    assert [u["key"] for u in enumerate_units(str(tmp_path / "photos [[]2020]" / "*.jp[g]"))] \
        == ["photos [2020]/a"]


# -- 10: tar members of every type ------------------------------------------------------------

def _member(name: str, kind: bytes, data: bytes = b"", linkname: str = "") -> tuple:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, (io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def test_every_tar_member_is_a_row_or_an_error_row(tmp_path):
    jpg, jpg2 = _jpeg(1), _jpeg(2)
    members = [
        _member("_a.jpg", tarfile.REGTYPE, jpg),           # camera-style name: an image
        _member("b.jpg", tarfile.REGTYPE, jpg),
        _member("sub", tarfile.DIRTYPE),                  # a folder: not an image, no row
        _member("sub/c.jpg", tarfile.SYMTYPE, linkname="../b.jpg"),
        _member("d.jpg", tarfile.LNKTYPE, linkname="b.jpg"),
        _member("e.jpg", tarfile.FIFOTYPE),
        _member("f.jpg", tarfile.CHRTYPE),
        _member("g.jpg", tarfile.REGTYPE, jpg),
        _member("g.jpg", tarfile.REGTYPE, jpg2),          # the same name again (tar -r)
        _member("._b.jpg", tarfile.REGTYPE, b"AppleDouble"),  # macOS resource fork: skipped
    ]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for info, data in members:
            tf.addfile(info, data)
    path = _write(tmp_path / "shard.tar", buf.getvalue())
    recs = list(iter_records({"kind": "tar", "uri": str(path), "key": "shard.tar"}))
    by_key = {r["key"]: r for r in recs}
    assert [r["key"] for r in recs] == ["_a", "b", "sub/c", "d", "e", "f", "g", "g#dup1"]
    assert by_key["_a"]["data"] == jpg and by_key["b"]["data"] == jpg
    assert by_key["g"]["data"] == jpg and by_key["g"]["error"] is None
    assert "symbolic link" in by_key["sub/c"]["error"] and "not followed" in by_key["sub/c"]["error"]
    assert "hard link" in by_key["d"]["error"]
    assert "fifo" in by_key["e"]["error"] and "device" in by_key["f"]["error"]
    assert "duplicate key 'g'" in by_key["g#dup1"]["error"]
    assert all(r["data"] is None for k, r in by_key.items() if k not in ("_a", "b", "g"))


# -- 2, 9, 12: configs that must fail in one line ------------------------------------------------

# A "billion laughs" (9**9 leaves) inside the value of a known option, in a few hundred bytes.
_LEVELS = ["&a [x, x, x, x, x, x, x, x, x]"] + [
    f"&{c} [{', '.join(['*' + p] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi")]
_BOMB = f"pseudo_label:\n  output: o\n  input: x\n  tau: [{', '.join(_LEVELS)}]\n"


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path):
    cfg = tmp_path / "bomb.yaml"
    cfg.write_text(_BOMB)
    assert len(_BOMB) < 600
    start = time.perf_counter()
    with pytest.raises(SelfmentUserError, match="expands to more than"):
        read_config(str(cfg))
    assert time.perf_counter() - start < 1.0


def test_a_yaml_alias_bomb_through_the_cli(tmp_path):
    cfg = tmp_path / "bomb.yaml"
    cfg.write_text(_BOMB)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "selfment_dist.cli", "pseudo-label", "--config",
                           str(cfg)], capture_output=True, text=True, timeout=60)
    assert time.perf_counter() - start < 30  # the interpreter's start included
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("selfment: error: "), lines[:5]
    assert "alias" in lines[0]


def test_a_large_value_below_the_cap_gives_a_short_line(tmp_path, capsys):
    cfg = tmp_path / "big.yaml"
    cfg.write_text(f"pseudo_label:\n  output: o\n  input: x\n  tau: [{', '.join(_LEVELS[:5])}]\n")
    code, err = _cli(["pseudo-label", "--config", str(cfg)], capsys)  # 9**5 leaves: accepted
    assert code == 2 and len(err) == 1 and "pseudo_label.tau" in err[0], err
    assert len(err[0]) < 400


def test_small_anchors_and_merge_keys_still_work(tmp_path):
    cfg = tmp_path / "ok.yaml"
    cfg.write_text("pseudo_label: {<<: {tau: 0.3}, image_size: &s 64, input: [x], output: o}\n"
                   "segment: {image_size: *s}\n")
    settings = cli.command_settings("pseudo-label", {}, str(cfg))
    assert (settings.tau, settings.image_size) == (0.3, 64)


@pytest.mark.parametrize("text, fragment", [
    ("pseudo_label: [1, 2]\n", "pseudo_label: must be a mapping of options"),
    ("pseudo_label: 3\n", "pseudo_label: must be a mapping of options"),
    ("pseudo_label: {image_size: 64, image-size: 128, input: x, output: o}\n",
     "image_size and image-size"),
    ("pseudo_label: {input: x, inputs: y, output: o}\n", "input and inputs"),
    ("image_size: 64\nimage-size: 128\n", "image_size and image-size"),
])
def test_bad_config_shapes_are_one_line(tmp_path, capsys, text, fragment):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    code, err = _cli(["pseudo-label", "--config", str(cfg)], capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("selfment: error: "), err
    assert fragment in err[0], err


def test_list_section_in_run_config_is_one_line(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("pipeline: [1, 2]\n")
    code, err = _cli(["run", "--config", str(cfg)], capsys)
    assert code == 2 and len(err) == 1 and "pipeline: must be a mapping" in err[0], err


# -- 7: an image size that cannot fit in memory ---------------------------------------------------

def test_image_size_has_a_memory_bound(tmp_path, capsys):
    from selfment_dist.settings import MAX_IMAGE_SIZE

    images = _write(tmp_path / "in" / "a.jpg", _jpeg()).parent
    a_file = _write(tmp_path / "out.txt", b"x")  # today's code stops there, before Ray
    for size in ("1000000", str(MAX_IMAGE_SIZE + 16)):
        code, err = _cli(["pseudo-label", "--input", str(images), "--output", str(a_file),
                          "--weights", "random", "--image-size", size], capsys)
        assert code == 2 and len(err) == 1, err
        assert "image_size" in err[0] and str(MAX_IMAGE_SIZE) in err[0], err
    for size in (32, 64, 768, 1536, MAX_IMAGE_SIZE):
        PseudoLabelSettings(inputs=["x"], output="o", image_size=size)
    with pytest.raises(SettingsError, match="segment.image_size: .* 4096"):
        validate(SegmentSettings, {"model": "m", "inputs": ["x"], "output": "o",
                                   "image_size": MAX_IMAGE_SIZE * 2}, "segment")


def test_evaluate_lists_maps_with_the_same_rule(tmp_path):
    """A segment of ``_selects/DSC0003.JPG`` writes ``_selects/DSC0003.png``: evaluate must see it."""
    from selfment_dist.pipeline.evaluate import list_images

    for rel in ("_selects/DSC0003.png", "_DSC0001.png", "_overlays/_DSC0001.png",
                "__MACOSX/._DSC0001.png", ".hidden.png"):
        _write(tmp_path / rel, b"png")
    found, _ = list_images(str(tmp_path))
    assert sorted(found) == ["_DSC0001", "_selects/DSC0003"]
