"""Synthetic scenes: determinism, masks, camouflage statistics, speed and the on-disk layout."""
from __future__ import annotations

import io

import fsspec
import numpy as np
import pytest
from PIL import Image

from selfment_dist.data.synthetic import MAX_FG_FRACTION, MIN_FG_FRACTION, make_scene, scene_keys, write_scenes


def _colour_gap(image, mask):
    """Distance between the mean RGB colours of the foreground and the background."""
    return float(np.linalg.norm(image[mask].mean(0) - image[~mask].mean(0)))


def test_deterministic_and_seed_dependent():
    for seed in (0, 7, (3, 1)):
        for camouflage in (False, True):
            a = make_scene(seed, camouflage=camouflage)
            b = make_scene(seed, camouflage=camouflage)
            np.testing.assert_array_equal(a[0], b[0])
            np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(make_scene(0)[0], make_scene(1)[0])
    assert not np.array_equal(make_scene((0, 1))[0], make_scene((1, 0))[0])


@pytest.mark.parametrize("size", [(96, 128), (128, 128), (64, 200), (16, 16)])
@pytest.mark.parametrize("camouflage", [False, True])
def test_shapes_and_mask_coverage(size, camouflage):
    for seed in range(40):
        image, mask = make_scene(seed, size=size, camouflage=camouflage)
        assert image.shape == (*size, 3) and image.dtype == np.uint8
        assert mask.shape == size and mask.dtype == bool
        assert MIN_FG_FRACTION <= mask.mean() <= MAX_FG_FRACTION


def test_variety():
    masks = [make_scene(seed)[1] for seed in range(60)]
    fractions = np.array([m.mean() for m in masks])
    assert fractions.min() < 0.1 and fractions.max() > 0.3
    assert len({m.tobytes() for m in masks}) == 60


def test_camouflage_has_close_colour_statistics():
    plain = [_colour_gap(*make_scene(seed)) for seed in range(60)]
    camo = [_colour_gap(*make_scene(seed, camouflage=True)) for seed in range(60)]
    assert max(camo) < 35
    assert np.median(camo) < 20
    assert np.median(plain) > 80
    assert np.median(plain) > 4 * np.median(camo)


def test_many_scenes_are_valid_and_repeatable():
    # No wall-clock bound (a loaded machine makes any bound flaky); speed is in the docstring's
    # "a few milliseconds" and the benchmarks.
    for seed in range(50):
        image, mask = make_scene(seed, size=(128, 128), camouflage=seed % 2 == 0)
        again, mask_again = make_scene(seed, size=(128, 128), camouflage=seed % 2 == 0)
        assert np.array_equal(image, again) and np.array_equal(mask, mask_again)
        assert 0 < mask.mean() < 1


def test_scene_keys():
    assert scene_keys(0) == []
    assert scene_keys(3) == ["scene_00000", "scene_00001", "scene_00002"]


def _read_png(fs, path):
    with fs.open(path, "rb") as f:
        return Image.open(io.BytesIO(f.read()))


def test_write_scenes_local_layout(tmp_path):
    keys = write_scenes(str(tmp_path / "data"), 8, seed=3, image_format="png", camouflage_fraction=0.25)
    assert keys == scene_keys(8)
    root = tmp_path / "data"
    assert sorted(p.name for p in (root / "images").iterdir()) == [f"{k}.png" for k in keys]
    assert sorted(p.name for p in (root / "masks").iterdir()) == [f"{k}.png" for k in keys]
    fs = fsspec.filesystem("file")
    for i, key in enumerate(keys):
        mask_img = _read_png(fs, str(root / "masks" / f"{key}.png"))
        assert mask_img.mode == "L"
        mask = np.asarray(mask_img)
        assert set(np.unique(mask)) == {0, 255}
        # Scene i is make_scene((seed, i)); with f = 0.25, scenes 3 and 7 are camouflaged.
        image, expected_mask = make_scene((3, i), camouflage=i in (3, 7))
        np.testing.assert_array_equal(mask == 255, expected_mask)
        np.testing.assert_array_equal(np.asarray(_read_png(fs, str(root / "images" / f"{key}.png"))), image)


def test_write_scenes_jpeg_and_prefix_stability(tmp_path):
    keys = write_scenes(str(tmp_path), 3, camouflage_fraction=0.0)
    for i, key in enumerate(keys):
        img = Image.open(tmp_path / "images" / f"{key}.jpg")
        assert img.format == "JPEG" and img.size == (128, 96) and img.mode == "RGB"
        # Lossy, but close to the scene.
        diff = np.abs(np.asarray(img, dtype=np.int16) - make_scene((0, i))[0].astype(np.int16))
        assert diff.mean() < 8
    # Scene i does not depend on n.
    write_scenes(str(tmp_path / "more"), 5, camouflage_fraction=0.0, image_format="png")
    np.testing.assert_array_equal(
        np.asarray(Image.open(tmp_path / "more" / "masks" / "scene_00002.png")),
        np.asarray(Image.open(tmp_path / "masks" / "scene_00002.png")),
    )


def test_write_scenes_s3(s3_bucket):
    bucket, storage_options = s3_bucket
    keys = write_scenes(f"s3://{bucket}/synth", 3, size=(32, 48), storage_options=storage_options)
    fs = fsspec.filesystem("s3", **storage_options)
    assert sorted(fs.ls(f"{bucket}/synth/images", detail=False)) == [f"{bucket}/synth/images/{k}.jpg" for k in keys]
    assert sorted(fs.ls(f"{bucket}/synth/masks", detail=False)) == [f"{bucket}/synth/masks/{k}.png" for k in keys]
    mask = np.asarray(_read_png(fs, f"{bucket}/synth/masks/{keys[1]}.png"))
    np.testing.assert_array_equal(mask == 255, make_scene((0, 1), size=(32, 48))[1])


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="image_format"):
        write_scenes(str(tmp_path), 1, image_format="gif")
    with pytest.raises(ValueError, match="camouflage_fraction"):
        write_scenes(str(tmp_path), 1, camouflage_fraction=1.5)
    with pytest.raises(ValueError, match="16x16"):
        make_scene(0, size=(8, 64))
