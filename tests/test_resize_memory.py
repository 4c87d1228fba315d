"""Issue 30 #3: the banded resize gives the very numbers of the whole-image resize, with a
bounded peak (no float32 copy of the whole image)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from selfment_dist.model.resize import resize_square


def whole_image_resize(image: np.ndarray, size: int) -> np.ndarray:
    """The code before issue 30: the whole image as float32, then one ``F.interpolate``."""
    x = torch.as_tensor(np.array(image)).permute(2, 0, 1).float().div_(255)
    if tuple(x.shape[1:]) != (size, size):
        x = F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False,
                          antialias=True)[0]
    return x.permute(1, 2, 0).contiguous().numpy()


SHAPES = [(1, 1), (1, 9), (9, 1), (1, 300), (300, 1), (3, 5), (17, 33), (64, 64), (64, 90),
          (90, 64), (241, 319), (500, 37), (37, 500), (8, 2000), (2000, 8)]


@pytest.mark.parametrize("height,width", SHAPES)
def test_banded_resize_is_bit_identical(height, width):
    rng = np.random.default_rng(height * 10007 + width)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    for size in (1, 16, 64, 97):  # down, up, equal sides (64 and 64x90) included
        want = whole_image_resize(image, size)
        for band_pixels in (1, 3 * width + 1, 1 << 20):  # one row, a few rows, one band
            got = resize_square(image, size, band_pixels=band_pixels)
            assert got.dtype == np.float32 and got.shape == (size, size, 3)
            assert np.array_equal(got, want), (height, width, size, band_pixels)


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "CMYK"])
def test_banded_resize_of_pil_images_is_bit_identical(mode):
    rng = np.random.default_rng(1)
    pil = Image.fromarray(rng.integers(0, 256, (123, 77, 3), dtype=np.uint8)).convert(mode)
    want = whole_image_resize(np.array(pil.convert("RGB")), 32)
    for band_pixels in (1, 500, 1 << 20):
        assert np.array_equal(resize_square(pil, 32, band_pixels=band_pixels), want)


PEAK = r"""
import json, sys
import numpy as np
from PIL import Image
from selfment_dist.model.resize import resize_square
pil = Image.new("RGB", (4000, 4000), (10, 200, 30))  # 16 MP: 64 MB in PIL, 192 MB as float32
resize_square(Image.new("RGB", (300, 200)), 224)  # load the kernels before measuring
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current RSS
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
base = rss("VmRSS")
resize_square(pil, 224)
print(json.dumps({"above": rss("VmHWM") - base}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")
def test_resize_never_holds_the_whole_image_as_float32():
    out = subprocess.run([sys.executable, "-c", PEAK], capture_output=True, text=True,
                         timeout=120, env={"OMP_NUM_THREADS": "1", **__import__("os").environ})
    assert out.returncode == 0, out.stderr[-2000:]
    above = json.loads(out.stdout.strip().splitlines()[-1])["above"]
    # The whole image as float32 alone is 192 MB; one band (1 Mpx) with its copies ~30 MB.
    assert above < 80 * 2**20, f"resize peak {above / 2**20:.0f} MB above its baseline"
