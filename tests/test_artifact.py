"""Model artifact folder: round trips (local, file://, S3) and clear errors."""
from __future__ import annotations

import json

import fsspec
import numpy as np
import pytest
import torch

from selfment_dist.model.artifact import FORMAT_VERSION, META_NAME, WEIGHTS_NAME, load_artifact, save_artifact
from selfment_dist.model.head import PatchHead


def _assert_close(actual, expected, *, rtol=1e-5, atol=1e-6):
    # Not torch.testing.assert_close: its first call imports torch.distributed (seconds).
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert torch.allclose(actual, expected, rtol=rtol, atol=atol), (actual, expected)

META = {
    "backbone": "vit_small_patch16_dinov3.lvd1689m",
    "weights": "random",
    "image_size": 768,
    "feature_dim": 24,
    "training": {"epochs": 2, "final_loss": np.float32(0.25), "history": np.array([1.0, 0.5])},
}


def _head(in_dim=24, embed_dim=16, seed=0):
    torch.manual_seed(seed)
    return PatchHead(in_dim, embed_dim)


def _assert_same_head(a, b):
    assert (a.in_dim, a.embed_dim) == (b.in_dim, b.embed_dim)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        _assert_close(sa[k], sb[k], rtol=0, atol=0)
    feats = torch.randn(5, a.in_dim)
    _assert_close(a.saliency(feats), b.saliency(feats))


def test_round_trip_local(tmp_path):
    head = _head()
    uri = str(tmp_path / "runs" / "r1" / "model")  # parents are created
    written = save_artifact(uri, head, META)
    assert sorted(p.name for p in (tmp_path / "runs" / "r1" / "model").iterdir()) == sorted([META_NAME, WEIGHTS_NAME])

    loaded, meta = load_artifact(uri)
    _assert_same_head(head, loaded)
    assert not loaded.training
    assert meta == written
    assert meta["backbone"] == META["backbone"] and meta["image_size"] == 768
    assert (meta["in_dim"], meta["embed_dim"], meta["format_version"]) == (24, 16, FORMAT_VERSION)
    assert meta["training"] == {"epochs": 2, "final_loss": 0.25, "history": [1.0, 0.5]}


def test_round_trip_file_url_and_device(tmp_path):
    head = _head(8, 4)
    save_artifact(f"file://{tmp_path}/m", head, {"backbone": "x"})
    loaded, _ = load_artifact(f"file://{tmp_path}/m", device="cpu")
    _assert_same_head(head, loaded)
    assert next(loaded.parameters()).device.type == "cpu"


def test_overwrite_replaces_previous_artifact(tmp_path):
    save_artifact(str(tmp_path), _head(seed=1), {"run": 1})
    head2 = _head(seed=2)
    save_artifact(str(tmp_path), head2, {"run": 2})
    loaded, meta = load_artifact(str(tmp_path))
    _assert_same_head(head2, loaded)
    assert meta["run"] == 2


def test_round_trip_s3(s3_bucket):
    bucket, storage_options = s3_bucket
    head = _head()
    uri = f"s3://{bucket}/models/run1"
    save_artifact(uri, head, META, storage_options=storage_options)
    fs = fsspec.filesystem("s3", **storage_options)
    assert sorted(fs.ls(f"{bucket}/models/run1", detail=False)) == sorted(
        [f"{bucket}/models/run1/{META_NAME}", f"{bucket}/models/run1/{WEIGHTS_NAME}"]
    )
    loaded, meta = load_artifact(uri, storage_options=storage_options)
    _assert_same_head(head, loaded)
    assert meta["feature_dim"] == 24
    with pytest.raises(FileNotFoundError, match=META_NAME):
        load_artifact(f"s3://{bucket}/models/nothing", storage_options=storage_options)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=META_NAME):
        load_artifact(str(tmp_path / "absent"))
    save_artifact(str(tmp_path / "m"), _head(), {})
    (tmp_path / "m" / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=WEIGHTS_NAME):
        load_artifact(str(tmp_path / "m"))


def _edit_meta(path, **changes):
    meta = json.loads((path / META_NAME).read_text())
    meta.update(changes)
    (path / META_NAME).write_text(json.dumps(meta))


@pytest.mark.parametrize("changes", [{"in_dim": 32}, {"embed_dim": 8}])
def test_weights_not_matching_meta(tmp_path, changes):
    save_artifact(str(tmp_path), _head(24, 16), {})
    _edit_meta(tmp_path, **changes)
    with pytest.raises(ValueError, match="does not match"):
        load_artifact(str(tmp_path))


def test_malformed_meta_and_weights(tmp_path):
    save_artifact(str(tmp_path), _head(), {})
    _edit_meta(tmp_path, format_version=99)
    with pytest.raises(ValueError, match="format_version"):
        load_artifact(str(tmp_path))
    _edit_meta(tmp_path, format_version=FORMAT_VERSION, in_dim=None)
    with pytest.raises(ValueError, match="in_dim"):
        load_artifact(str(tmp_path))
    (tmp_path / META_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_artifact(str(tmp_path))
    save_artifact(str(tmp_path), _head(), {})
    (tmp_path / WEIGHTS_NAME).write_bytes(b"garbage")
    with pytest.raises(ValueError, match="safetensors"):
        load_artifact(str(tmp_path))


def test_save_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="in_dim"):
        save_artifact(str(tmp_path), _head(24, 16), {"in_dim": 32})
    with pytest.raises(TypeError, match="JSON"):
        save_artifact(str(tmp_path), _head(), {"bad": object()})
    with pytest.raises(TypeError, match="PatchHead"):
        save_artifact(str(tmp_path), torch.nn.Linear(2, 2), {})
    assert not any(tmp_path.iterdir())  # nothing half-written
