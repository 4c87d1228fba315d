"""Hardening (issue 14) that needs no Ray: hostile inputs, settings, model folders, the CLI.

Every failure here is caught before Ray is needed, so nothing in this file reaches Ray: a call
of ``ensure_ray`` (any stage) or of ``ray.init`` fails the test, whether or not another module
left the suite's shared Ray running.
"""
from __future__ import annotations

import io
import json
import logging
import struct
import tarfile

import numpy as np
import pytest

from cli_output import cli_error_lines
import ray
from PIL import Image

from selfment_dist import cli
from selfment_dist.model.artifact import META_NAME, WEIGHTS_NAME, load_artifact, save_artifact
from selfment_dist.model.head import PatchHead
from selfment_dist.io.images import FORMATS, ImageDecodeError, decode_image
from selfment_dist.io.sources import error_kind, iter_records
from selfment_dist.pipeline.pseudo_label import MANIFEST_NAME, run_pseudo_label
from selfment_dist.pipeline.segment import run_segment
from selfment_dist.data.synthetic import make_scene
from selfment_dist.validation import SettingsError

BACKBONE = "vit_small_patch16_224.dino"
OK = dict(backbone=BACKBONE, weights="random", image_size=64, progress=False)


@pytest.fixture(autouse=True)
def _no_ray(monkeypatch):
    import importlib

    reached: list[str] = []

    def refuse(where):
        def call(*args, **kwargs):
            reached.append(where)
            raise AssertionError(f"a check in this file reached Ray ({where})")
        return call

    # Where it is defined (stages that import it when called) and where it was imported to.
    # Every module is imported before any is patched: one imported after ``ray_runtime`` was patched
    # would bind the refusal as its own, and keep it after this test.
    modules = {name: importlib.import_module(f"selfment_dist.pipeline.{name}")
               for name in ("_internal.ray_runtime", "pseudo_label", "segment", "train",
                            "evaluate", "demo")}
    for name, module in modules.items():
        if hasattr(module, "ensure_ray"):
            monkeypatch.setattr(module, "ensure_ray", refuse(f"{name}.ensure_ray"))
    monkeypatch.setattr(ray, "init", refuse("ray.init"))
    yield
    assert not reached, reached


def _jpeg(seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(make_scene((3, seed), size=(32, 40))[0]).save(buf, "JPEG")
    return buf.getvalue()


def _tar(samples: int) -> tuple[bytes, list[int]]:
    """A WebDataset shard (``s000.jpg`` + ``s000.txt`` …) and each member's header offset."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for i in range(samples):
            for ext, data in (("jpg", _jpeg(i)), ("txt", b"caption")):
                info = tarfile.TarInfo(f"s{i:03d}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    offsets = [m.offset for m in tarfile.open(fileobj=io.BytesIO(data))]
    return data, offsets


def _records(path, **kw) -> list[dict]:
    return list(iter_records({"kind": "tar", "uri": str(path), "key": path.name}, **kw))


# -- 4: truncated WebDataset shards -------------------------------------------------------------

@pytest.mark.parametrize("cut", ["inside_header", "no_end_marker"])
def test_truncated_shard_gives_an_error_row_naming_the_last_good_sample(tmp_path, cut):
    data, offsets = _tar(6)
    # offsets[2 * i] is sample i's first header: cut 100 bytes into sample 3's header, or keep
    # every member whole but drop the end-of-archive blocks.
    end_of_last = offsets[-1] + 512 + 512  # header + the 7-byte caption padded to one block
    data = data[:offsets[6] + 100] if cut == "inside_header" else data[:end_of_last]
    shard = tmp_path / "shard.tar"
    shard.write_bytes(data)
    records = _records(shard)
    good = [r["key"] for r in records if r["error"] is None]
    errors = [r for r in records if r["error"] is not None]
    expected_last = "s002" if cut == "inside_header" else "s005"
    assert good == [f"s{i:03d}" for i in range(int(expected_last[1:]) + 1)]
    (err,) = errors
    assert err["key"] == "shard.tar" and err["source"] == str(shard)
    assert "truncated WebDataset shard" in err["error"]
    assert f"last complete sample: {expected_last}" in err["error"]
    assert err["error_kind"] == "permanent"


def test_whole_shard_has_no_error_row(tmp_path):
    shard = tmp_path / "shard.tar"
    shard.write_bytes(_tar(3)[0])
    assert [r["error"] for r in _records(shard)] == [None] * 3


# -- 6 and 7: decoders and byte limits ----------------------------------------------------------

def test_only_the_supported_formats_are_opened():
    assert set(FORMATS) == {"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"}
    image = Image.fromarray(np.full((8, 8, 3), 128, np.uint8))
    for fmt in ("PPM", "TGA", "ICO", "PCX", "SGI", "IM"):  # formats Pillow reads
        buf = io.BytesIO()
        image.save(buf, fmt)
        with pytest.raises(ImageDecodeError, match="unrecognised format"):
            decode_image(buf.getvalue())
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n"  # named .jpg in the issue
    with pytest.raises(ImageDecodeError, match="unrecognised format"):
        decode_image(eps)
    for fmt in ("PNG", "GIF", "BMP", "TIFF", "WEBP"):
        buf = io.BytesIO()
        image.save(buf, fmt)
        assert decode_image(buf.getvalue()).size == (8, 8)


def test_byte_limit_is_checked_before_reading(tmp_path):
    big = tmp_path / "big.jpg"
    big.write_bytes(_jpeg() + b"\0" * 5000)
    unit = {"kind": "image", "uri": str(big), "key": "big"}
    (rec,) = iter_records(unit, max_bytes=4000)
    assert rec["error"].startswith("too many bytes: ") and "max_bytes 4,000" in rec["error"]
    assert rec["data"] is None and rec["error_kind"] == "permanent"
    (rec,) = iter_records(unit, max_bytes=None)
    assert rec["error"] is None
    with pytest.raises(ImageDecodeError, match="too many bytes"):
        decode_image(rec["data"], max_bytes=100)
    # A tar member over the limit: judged by its header's size, the shard goes on.
    data, _ = _tar(3)
    shard = tmp_path / "s.tar"
    shard.write_bytes(data)
    sizes = [len(_jpeg(i)) for i in range(3)]
    limit = sorted(sizes)[1]
    records = _records(shard, max_bytes=limit)
    assert [r["key"] for r in records] == ["s000", "s001", "s002"]
    for r, size in zip(records, sizes):
        assert (r["error"] is None) == (size <= limit), (r, size, limit)


# -- 3: error kinds -----------------------------------------------------------------------------

def test_read_failures_are_transient_bad_data_permanent(tmp_path):
    assert error_kind(TimeoutError("slow")) == "transient"
    assert error_kind(ConnectionResetError()) == "transient"
    assert error_kind(OSError(5, "I/O error")) == "transient"
    assert error_kind(FileNotFoundError("gone")) == "permanent"
    assert error_kind(ValueError("bad")) == "permanent"
    botocore = pytest.importorskip("botocore.exceptions")
    assert error_kind(botocore.ReadTimeoutError(endpoint_url="http://x")) == "transient"
    (rec,) = iter_records({"kind": "image", "uri": str(tmp_path / "missing.jpg"), "key": "m"})
    assert rec["error_kind"] == "permanent"
    not_an_image = tmp_path / "x.jpg"
    not_an_image.write_bytes(b"text")
    (rec,) = iter_records({"kind": "parquet", "uri": str(not_an_image), "key": "x"})
    assert rec["error_kind"] == "permanent"


# -- 2: settings, checked on entry --------------------------------------------------------------

@pytest.mark.parametrize("bad, fragment", [
    # The settings models' messages (selfment_dist.settings): "<stage>.<name>: ... (got ...)".
    ({"eps": 2}, "pseudo_label.eps: Input should be less than 1 (got 2)"),
    ({"eps": 0.0}, "pseudo_label.eps: Input should be greater than 0 (got 0.0)"),
    ({"tau": "0.2"}, "pseudo_label.tau: Input should be a valid number (got '0.2')"),
    ({"tau": 2.0}, "pseudo_label.tau: Input should be less than 1 (got 2.0)"),
    ({"max_pixels": -1}, "pseudo_label.max_pixels: Input should be greater than or equal to 1"),
    ({"max_bytes": 0}, "pseudo_label.max_bytes: Input should be greater than or equal to 1"),
    ({"rows_per_file": 0}, "pseudo_label.rows_per_file: Input should be greater than or equal"),
    ({"batch_size": -2}, "pseudo_label.batch_size: Input should be greater than or equal to 1"),
    ({"image_size": 0}, "pseudo_label.image_size: Input should be greater than 0"),
    ({"image_size": 60}, "not a positive multiple of"),
    ({"image_size": "64"}, "pseudo_label.image_size: Input should be a valid integer"),
    ({"n_iter": 2.5}, "pseudo_label.n_iter: Input should be a valid integer"),
    ({"num_actors": 0}, "pseudo_label.num_actors: Input should be greater than or equal to 1"),
    ({"backbone": "vit_nope"}, "unsupported backbone"),
    ({"binary_graph": "yes"}, "pseudo_label.binary_graph: Input should be a valid boolean"),
    ({"inputs": []}, "pseudo_label.inputs: Value should have at least 1 item"),
])
def test_pseudo_label_settings_fail_before_anything_is_written(tmp_path, bad, fragment):
    out = tmp_path / "out"
    args = {"inputs": str(tmp_path), "output": str(out), **OK, **bad}
    inputs = args.pop("inputs")
    with pytest.raises(SettingsError) as info:
        run_pseudo_label(inputs, **args)
    assert fragment in str(info.value)
    assert not out.exists()


def test_every_problem_is_reported_one_line_each(tmp_path):
    with pytest.raises(SettingsError) as info:
        run_pseudo_label(str(tmp_path), str(tmp_path / "o"), **{**OK, "eps": 2, "tau": "x",
                                                               "rows_per_file": 0})
    assert len(info.value.problems) == 3
    assert str(info.value).count("\n") == 2


def test_segment_settings_fail_before_the_model_is_read(tmp_path):
    with pytest.raises(SettingsError, match="segment.batch_size: Input should be greater than or"):
        run_segment(str(tmp_path / "no-model"), str(tmp_path), str(tmp_path / "o"),
                    batch_size=-1)
    with pytest.raises(SettingsError, match="segment.max_pixels: Input should be greater than"):
        run_segment(str(tmp_path / "no-model"), str(tmp_path), str(tmp_path / "o"),
                    max_pixels=0)


# -- 9: model folders ---------------------------------------------------------------------------

@pytest.mark.parametrize("in_dim", [10**6, 10**12])
def test_model_json_cannot_size_the_head(tmp_path, in_dim, monkeypatch):
    save_artifact(str(tmp_path), PatchHead(8, 4), {"backbone": BACKBONE})
    meta = json.loads((tmp_path / META_NAME).read_text())
    meta["in_dim"] = in_dim
    (tmp_path / META_NAME).write_text(json.dumps(meta))
    built = []
    real_init = PatchHead.__init__

    def spy(self, *a, **kw):
        real_init(self, *a, **kw)
        if self.mlp[0].weight.device.type != "meta":
            built.append(a)
    monkeypatch.setattr(PatchHead, "__init__", spy)
    with pytest.raises(ValueError, match=r"mlp\.0\.weight: shape \[128, 8\], expected "
                                         rf"\[128, {in_dim}\]"):
        load_artifact(str(tmp_path))
    assert built == []  # nothing was allocated at the claimed size


def test_weights_with_a_bad_header_are_a_clear_error(tmp_path):
    save_artifact(str(tmp_path), PatchHead(8, 4), {})
    (tmp_path / WEIGHTS_NAME).write_bytes(struct.pack("<Q", 10**9) + b"{}")
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        load_artifact(str(tmp_path))


# -- 10: the command line -----------------------------------------------------------------------

_cli = cli_error_lines  # (exit code, selfment:/Traceback lines)


def test_user_mistakes_are_one_line_and_exit_2(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(make_scene((1, 1), size=(32, 32))[0]).save(images / "a.jpg")
    out = tmp_path / "out"
    base = ["pseudo-label", "--input", str(images), "--output", str(out), "--backbone", BACKBONE,
            "--weights", "random", "--image-size", "64"]
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    bad_ckpt = tmp_path / "bad.pt"
    bad_ckpt.write_bytes(b"not a checkpoint")
    yaml_tag = tmp_path / "tag.yaml"
    yaml_tag.write_text("pseudo_label: !!python/object/apply:os.system ['echo hi']\n")
    yaml_syntax = tmp_path / "syntax.yaml"
    yaml_syntax.write_text("pseudo_label: {input: [x\n")
    cases = {
        "missing input": ["pseudo-label", "--input", str(tmp_path / "nope"), *base[3:]],
        "output is a file": [*base[:3], "--output", str(a_file), *base[5:]],
        "image size 0": [*base, "--image-size", "0"],
        "negative batch size": [*base, "--batch-size", "-4"],
        "unknown backbone": [*base, "--backbone", "vit_huge_nope"],
        "eps out of range": [*base, "--eps", "2"],
        "not an int": [*base, "--image-size", "abc"],
        "bad checkpoint": [*base, "--weights", str(bad_ckpt)],
        "missing checkpoint": [*base, "--weights", str(tmp_path / "none.pt")],
        "yaml python tag": ["pseudo-label", "--config", str(yaml_tag)],
        "yaml syntax": ["pseudo-label", "--config", str(yaml_syntax)],
        "segment bad model": ["segment", "--model", str(tmp_path), "--input", str(images),
                              "--output", str(tmp_path / "seg")],
        "bad log level": ["--log-level", "LOUD", *base],
    }
    for name, argv in cases.items():
        code, err = _cli(argv, capsys)
        assert code == 2, (name, code, err)
        assert len(err) == 1 and err[0].startswith("selfment: error: "), (name, err)
    assert not out.exists()  # nothing was written by any of them
    assert not (tmp_path / "seg").exists()


# -- 8: logging ---------------------------------------------------------------------------------

def test_log_level_is_this_packages_and_secrets_are_redacted(capsys):
    root = logging.getLogger()
    saved = (root.level, list(root.handlers), logging.getLogger("selfment_dist").level)
    for h in list(root.handlers):
        root.removeHandler(h)
    try:
        cli.configure_logging("DEBUG", {"key": "AKIAFAKE", "secret": "s3cr3t-value",
                                        "client_kwargs": {"aws_session_token": "TOKEN-xyz"}})
        logging.getLogger("botocore.endpoint").debug("X-Amz-Security-Token: TOKEN-xyz")
        logging.getLogger("selfment_dist.test").debug("opened with %s", "TOKEN-xyz s3cr3t-value")
        err = capsys.readouterr().err
        assert "botocore" not in err
        assert "opened with *** ***" in err
        assert "TOKEN-xyz" not in err and "s3cr3t-value" not in err
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved[1]:
            root.addHandler(h)
        root.setLevel(saved[0])
        logging.getLogger("selfment_dist").setLevel(saved[2])


def test_train_settings_fail_before_anything_is_read(tmp_path):
    from selfment_dist.pipeline.train import run_train

    with pytest.raises(SettingsError) as info:
        run_train(str(tmp_path / "no-labels"), str(tmp_path / "m"), batch_size=-1, lr="1e-3",
                  epochs=0)
    assert info.value.problems == [
        "train.epochs: Input should be greater than or equal to 1 (got 0)",
        "train.batch_size: Input should be greater than or equal to 1 (got -1)",
        "train.lr: Input should be a valid number (got '1e-3')"]
    assert not (tmp_path / "m").exists()


def test_jobs_entrypoint_refuses_bad_settings_before_running(tmp_path, monkeypatch, caplog):
    from pathlib import Path
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "jobs"))
    import _common

    images = tmp_path / "images"
    images.mkdir()
    (tmp_path / "c.yaml").write_text(
        f"pseudo_label: {{inputs: [{images}], output: {tmp_path / 'out'}, weights: random, "
        f"image_size: 64, eps: 2, tau: '0.2'}}\n")
    with caplog.at_level(logging.ERROR):
        assert _common.run_stage("pseudo_label", ["--config", str(tmp_path / "c.yaml")]) == 2
    assert "pseudo_label.eps: Input should be less than 1" in caplog.text
    assert "pseudo_label.tau: Input should be a valid number" in caplog.text
    assert not (tmp_path / "out").exists()
