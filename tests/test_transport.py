"""Precision modes, the light transport (uint8 at decoded size, resized on the model's device),
the training shuffle and the OOM memory: library-level tests, no Ray."""
from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch

from selfment_dist.defaults import PRECISIONS, resolve_precision


# ---------------------------------------------------------------------------------------------
# Precision (issue 27, item 5)

def test_precisions_and_aliases():
    assert PRECISIONS == ("fp32", "tf32", "bf16", "auto")
    assert resolve_precision("auto", "cuda") == "fp32"  # old configs and resumed outputs
    assert resolve_precision("tf32", "cuda") == "tf32"
    assert resolve_precision("tf32", "cuda:1") == "tf32"
    assert resolve_precision("tf32", torch.device("cpu")) == "fp32"  # no TF32 on a CPU
    assert resolve_precision("tf32") == "tf32"  # device not known yet
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp16")


def test_settings_default_is_fp32_and_auto_still_parses():
    from selfment_dist.settings import PseudoLabelSettings

    assert PseudoLabelSettings(inputs=["x"], output="y").precision == "fp32"
    assert PseudoLabelSettings(inputs=["x"], output="y", precision="auto").precision == "auto"
    assert PseudoLabelSettings(inputs=["x"], output="y", precision="tf32").precision == "tf32"


def _flags():
    """torch's per-backend fp32 modes (torch 2.9+'s API, the only one the project uses)."""
    return (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision,
            torch.backends.mkldnn.matmul.fp32_precision)


def test_float32_matmuls_sets_and_restores():
    from selfment_dist.model.numerics import float32_matmuls

    before = _flags()
    with float32_matmuls(tf32=True):
        assert _flags()[:2] == ("tf32", "tf32")
    assert _flags() == before
    with pytest.raises(RuntimeError):
        with float32_matmuls(tf32=False):
            assert _flags() == ("ieee", "ieee", "ieee")
            raise RuntimeError("restored on errors too")
    assert _flags() == before
    # A legacy TF32 switch set by the caller does not break the regions (torch refuses to
    # report a mix of its two APIs through the legacy getter; the project reads only the new).
    legacy = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        with float32_matmuls(tf32=False):
            assert _flags()[0] == "ieee"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = legacy


def test_exact_math_forces_tf32_off_inside_and_restores():
    from selfment_dist.algorithm._tensors import exact_math

    seen = []

    @exact_math
    def inner():
        seen.append((_flags(), torch.is_autocast_enabled("cpu")))

    from selfment_dist.model.numerics import float32_matmuls
    with float32_matmuls(tf32=True):  # a caller (the backbone's tf32 mode) with TF32 on
        with torch.autocast("cpu", dtype=torch.bfloat16):
            inner()
        assert seen == [(("ieee", "ieee", "ieee"), False)]
        assert _flags()[:2] == ("tf32", "tf32")  # the caller's TF32 is back


def test_backbone_tf32_on_cpu_is_fp32():
    from selfment_dist.model.backbone import Backbone, build_backbone

    fp32 = build_backbone("vit_small_patch16_224.dino", weights="random", image_size=32,
                          device="cpu")
    tf32 = Backbone(fp32.model, name=fp32.name, weights="random", image_size=32, device="cpu",
                    precision="tf32")
    assert tf32.precision == "fp32"
    x = np.random.default_rng(0).random((2, 32, 32, 3), dtype=np.float32)
    before = _flags()
    assert torch.equal(fp32(x), tf32(x))
    assert _flags() == before


def test_assumed_rates_scale_with_size_backbone_and_stage():
    from selfment_dist.pipeline._internal.rates import speed_factor

    def factor(backbone=None, size=None, **kw):
        return speed_factor(backbone, size, **kw)

    assert factor() == 1.0 == factor("vit_small_patch16_dinov3.lvd1689m", 768)
    for gpu in (True, False):
        assert factor(size=1536, gpu=gpu) < 1 / 8  # attention and NCut: quadratic in patches
        assert factor(size=384, gpu=gpu) > 2
        assert factor("vit_base_patch16_dinov3.lvd1689m", gpu=gpu) < 1 / 2
        assert factor("vit_small_patch8_224.dino", gpu=gpu) < 1 / 8  # 4x the patches
        assert factor(ncut=False, gpu=gpu) > 1  # segment: no NCut
    # On a GPU NCut + IPO is half of a bf16 image (fp32 NCut, whatever the backbone's
    # precision), so skipping it gains more in bf16 than in fp32.
    assert factor(ncut=False, precision="bf16") > factor(ncut=False, precision="fp32") > 1


# ---------------------------------------------------------------------------------------------
# Light transport: resize on the model's device (issue 27, item 4)

# (height, width): downscaling, upscaling, odd sides, 1xN and Nx1 strips, already square at S.
SHAPES = [(48, 64), (37, 23), (5, 7), (1, 40), (40, 1), (1, 1), (32, 32), (90, 31), (17, 200)]


def _pixels(shape, seed):
    return np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)


@pytest.mark.parametrize("size", [32, 48])
def test_device_resize_on_cpu_equals_resize_square_exactly(size):
    from selfment_dist.model.preprocess import DeviceResizer
    from selfment_dist.model.resize import resize_square

    # Two images per shape: a batch mixes shapes and groups equal ones into one call.
    images = [_pixels(shape, i) for i, shape in enumerate(SHAPES + SHAPES)]
    out = DeviceResizer(size, "cpu")(images)
    assert out.shape == (len(images), size, size, 3) and out.dtype == torch.float32
    for i, im in enumerate(images):
        assert torch.equal(out[i], torch.from_numpy(resize_square(im, size))), SHAPES[i % 9]


def test_decoded_pixels_match_resize_squares_conversion():
    from PIL import Image

    from selfment_dist.io.pixels import decoded_pixels
    from selfment_dist.model.preprocess import DeviceResizer
    from selfment_dist.model.resize import resize_square

    rgb = Image.fromarray(_pixels((20, 30), 1))
    for image in (rgb, rgb.convert("L"), rgb.convert("P"), rgb.convert("RGBA")):
        px = decoded_pixels(image)
        assert px.dtype == np.uint8 and px.shape == (20, 30, 3) and px.flags.c_contiguous
        assert torch.equal(DeviceResizer(24, "cpu")([px])[0],
                           torch.from_numpy(resize_square(image, 24)))
    with pytest.raises(ValueError, match="uint8"):
        decoded_pixels(np.zeros((4, 4), np.uint8))


def test_ragged_column_round_trip_and_passthrough():
    from selfment_dist.io.pixels import as_image_list, ragged_column
    from selfment_dist.model.preprocess import DeviceResizer

    images = [_pixels((9, 5), 0), None, _pixels((3, 12), 2)]
    col = ragged_column(images)
    assert col.dtype == object and col[1].shape == (1, 1, 3)
    got = as_image_list(col, [0, 2])
    assert got[0] is images[0] and got[1] is images[2]  # no pixel copies
    same = np.stack([_pixels((6, 6), 3), _pixels((6, 6), 4)])  # Ray's all-same-shape form
    assert [g.shape for g in as_image_list(same)] == [(6, 6, 3)] * 2
    resizer = DeviceResizer(8, "cpu")
    floats = [np.random.default_rng(5).random((8, 8, 3), dtype=np.float32)]
    assert torch.equal(resizer(floats)[0], torch.from_numpy(floats[0]))  # old transport
    assert resizer([]).shape == (0, 8, 8, 3)
    with pytest.raises(ValueError, match="uint8"):
        resizer([np.zeros((4, 4, 3), np.float32)])


def test_mixed_float32_and_uint8_rows():
    from selfment_dist.model.preprocess import DeviceResizer
    from selfment_dist.model.resize import resize_square

    ready = np.random.default_rng(1).random((16, 16, 3), dtype=np.float32)
    raw = _pixels((9, 30), 2)
    out = DeviceResizer(16, "cpu")([raw, ready, raw])
    assert torch.equal(out[1], torch.from_numpy(ready))
    assert torch.equal(out[0], torch.from_numpy(resize_square(raw, 16))) and torch.equal(out[0], out[2])


def test_cuda_staging_layout_on_cpu(monkeypatch):
    """The CUDA path's one-buffer staging (aligned offsets, per-row dtype views), run on CPU
    tensors: every row comes back as it went in."""
    import contextlib

    from selfment_dist.model import preprocess

    empty = torch.empty
    monkeypatch.setattr(preprocess.torch, "empty",
                        lambda *a, pin_memory=False, **k: empty(*a, **k))
    monkeypatch.setattr(preprocess.torch.cuda, "stream", lambda s: contextlib.nullcontext())
    images = [_pixels((5, 7), 0), np.random.default_rng(1).random((8, 8, 3), dtype=np.float32),
              _pixels((3, 3), 2)]
    views = preprocess.DeviceResizer(8, "cpu")._to_device(images)
    monkeypatch.undo()
    for view, im in zip(views, images):
        assert view.dtype == torch.from_numpy(im).dtype and np.array_equal(view.numpy(), im)


def test_backbone_features_from_device_resize_equal_todays():
    from selfment_dist.model.backbone import build_backbone
    from selfment_dist.model.preprocess import DeviceResizer
    from selfment_dist.model.resize import resize_square

    backbone = build_backbone("vit_small_patch16_224.dino", weights="random", image_size=32,
                              device="cpu")
    images = [_pixels((40, 56), 0), _pixels((21, 33), 1)]
    today = backbone(np.stack([resize_square(im, 32) for im in images]))
    assert torch.equal(backbone(DeviceResizer(32, "cpu")(images)), today)


# ---------------------------------------------------------------------------------------------
# Training: shuffle label rows before images are loaded (issue 27, item 7)

class _RecordingDataset:
    """Stands in for a Ray Dataset: records the calls of build_dataset, runs nothing."""

    def __init__(self, calls):
        self.calls = calls

    def map_batches(self, fn, **kwargs):
        self.calls.append(fn.__name__)
        return self

    def materialize(self):
        self.calls.append("materialize")
        return self

    def random_shuffle(self, **kwargs):
        self.calls.append("random_shuffle")
        return self


def _label_set(feature_dim=None):
    from selfment_dist.pipeline._internal.train_data import LabelSet

    return LabelSet(uri="labels", files=["a.parquet", "b.parquet"], rows=10_000, errors=0,
                    grid=(48, 48), feature_source="stored" if feature_dim else "backbone",
                    feature_dim=feature_dim, backbone="b", weights="random", image_size=768)


@pytest.mark.parametrize("shuffle", ["full", "local"])
def test_backbone_training_shuffles_label_rows_before_loading_images(monkeypatch, shuffle):
    import ray.data

    from selfment_dist.pipeline._internal import train_data

    calls: list[str] = []
    monkeypatch.setattr(ray.data, "from_items", lambda *a, **k: _RecordingDataset(calls))
    train_data.build_dataset(_label_set(), stored=False, storage_options=None, max_pixels=None,
                             shuffle=shuffle)
    expected = ["read_label_parts", "materialize", "random_shuffle", "load_images"]
    assert calls == (expected if shuffle == "full" else
                     [c for c in expected if c != "random_shuffle"])


def test_bytes_shuffled_per_epoch_are_label_rows_only():
    from selfment_dist.pipeline._internal.train_data import shuffled_bytes_per_epoch

    backbone = shuffled_bytes_per_epoch(_label_set(), stored=False)
    images = 10_000 * 768 * 768 * 3 * 4  # what a shuffle after loading moved: ~71 GB
    assert backbone < 10_000 * 600 and backbone * 10_000 < images
    stored = shuffled_bytes_per_epoch(_label_set(384), stored=True)
    assert stored > 10_000 * 48 * 48 * 2 * 384  # the float16 features do move
    assert shuffled_bytes_per_epoch(_label_set(), stored=False, shuffle="local") == 0


# ---------------------------------------------------------------------------------------------
# Smaller faults (issue 27, item 9)

def test_collective_timeout_setting_and_trainer_argument():
    import inspect

    from selfment_dist.pipeline import train
    from selfment_dist.settings import SettingsError, TrainSettings, build_settings

    assert TrainSettings(labels="l", output="o").collective_timeout_s == 300
    with pytest.raises((SettingsError, ValueError)):
        build_settings(TrainSettings, ("l", "o"), {"collective_timeout_s": 0})
    assert "TorchConfig(timeout_s=int(s.collective_timeout_s))" in inspect.getsource(train)


# ---------------------------------------------------------------------------------------------
# Light transport, the pipeline side (pipeline/_internal/light_transport.py)

def test_label_on_device_gives_todays_masks_also_from_two_threads():
    import threading

    from selfment_dist.algorithm.labeler import PseudoLabeler
    from selfment_dist.data.synthetic import make_scene
    from selfment_dist.model.backbone import build_backbone
    from selfment_dist.model.preprocess import DeviceResizer
    from selfment_dist.model.resize import resize_square
    from selfment_dist.io.pixels import decoded_pixels, ragged_column
    from selfment_dist.pipeline._internal.light_transport import label_on_device, rows_to_label
    from PIL import Image

    backbone = build_backbone("vit_small_patch16_224.dino", weights="random", image_size=64,
                              device="cpu")
    labeler = PseudoLabeler(backbone)
    pils = [Image.fromarray(make_scene((9, i), size=(s, t))[0])
            for i, (s, t) in enumerate([(48, 64), (70, 50), (48, 64)])]
    today = labeler(np.stack([resize_square(p, 64) for p in pils]))["mask"]

    column = ragged_column([decoded_pixels(p) for p in pils] + [None])  # + an error row
    images = rows_to_label(column, [0, 1, 2])
    resizer = DeviceResizer(64, "cpu")
    got = [None, None]

    def call(slot):
        got[slot] = label_on_device(labeler, resizer, images)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for rows in got:
        assert len(rows) == 3
        assert all(np.array_equal(np.asarray(r["mask"]), np.asarray(m))
                   for r, m in zip(rows, today))


def test_rows_to_label_copies_no_pixels():
    from selfment_dist.io.pixels import ragged_column
    from selfment_dist.pipeline._internal.light_transport import rows_to_label

    column = ragged_column([_pixels((4, 5), 0), _pixels((6, 2), 1)])
    everything = rows_to_label(column, [0, 1])
    assert everything[0] is column[0] and everything[1] is column[1]
    same_shape = np.stack([_pixels((4, 4), 2), _pixels((4, 4), 3)])
    views = rows_to_label(same_shape, [1])
    assert len(views) == 1 and np.shares_memory(views[0], same_shape)


def test_two_calls_in_flight_per_actor():
    import ray.data

    from selfment_dist.pipeline._internal.light_transport import two_calls_in_flight

    args = {"compute": ray.data.ActorPoolStrategy(min_size=1, max_size=None, initial_size=1),
            "num_gpus": 1}
    out = two_calls_in_flight(args)
    pool = out["compute"]
    assert out["num_gpus"] == 1 and pool.max_concurrent_calls_per_actor == 2
    assert pool.enable_true_multi_threading and pool.max_tasks_in_flight_per_actor >= 2
    assert (pool.min_size, pool.initial_size) == (1, 1) and math.isinf(pool.max_size)
    tasks = {"compute": ray.data.TaskPoolStrategy(size=2)}
    assert two_calls_in_flight(tasks) is tasks


def test_decode_workers_never_import_torch():
    """The light transport's decode side runs without torch (1.6 s of CPU per decode worker
    process, for a resize the model actor does)."""
    import subprocess
    import sys

    code = ("import sys, numpy as np; from PIL import Image; import io\n"
            "from selfment_dist.pipeline._internal.decode import read_and_decode\n"
            "buf = io.BytesIO(); Image.new('RGB', (8, 6)).save(buf, 'PNG')\n"
            "from selfment_dist.io import sources\n"
            "import tempfile, os; d = tempfile.mkdtemp(); p = os.path.join(d, 'a.png')\n"
            "open(p, 'wb').write(buf.getvalue())\n"
            "units = {'kind': np.array([sources.IMAGE], object), 'uri': np.array([p], object),"
            " 'key': np.array(['a.png'], object)}\n"
            "out = list(read_and_decode(units, image_size=16, max_pixels=None,"
            " storage_options=None, skip_ref=None, rows_per_batch=4, device_resize=True))\n"
            "assert out[0]['image'][0].shape == (6, 8, 3), out\n"
            "print('torch' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


# ---------------------------------------------------------------------------------------------
# CPU model workers' malloc settings (pipeline/_internal/cpu_malloc.py)

def test_cpu_model_workers_get_the_malloc_settings_and_gpu_ones_do_not(monkeypatch):
    import inspect

    from selfment_dist.pipeline import train
    from selfment_dist.pipeline._internal import faults
    from selfment_dist.pipeline._internal.cpu_malloc import CPU_MODEL_MALLOC_ENV, model_process_env
    from selfment_dist.pipeline._internal.ray_runtime import MODEL_WORKER_ENV, model_stage_args

    monkeypatch.setattr(faults, "worker_env", lambda: {})
    cpu = {"min_actors": 1, "actors": 1, "initial_actors": 1, "num_cpus": 1.5, "num_gpus": 0.0}
    gpu = {**cpu, "num_cpus": 1.0, "num_gpus": 1.0}
    actors = model_stage_args(object, {}, cpu)
    assert actors["runtime_env"]["env_vars"] == CPU_MODEL_MALLOC_ENV
    tasks = model_stage_args(object, {}, cpu, "tasks")
    assert tasks["runtime_env"]["env_vars"] == {**MODEL_WORKER_ENV["env_vars"],
                                                **CPU_MODEL_MALLOC_ENV}
    assert "runtime_env" not in model_stage_args(object, {}, gpu)
    # A test's fault variables travel beside them.
    monkeypatch.setattr(faults, "worker_env", lambda: {"SELFMENT_TEST_X": "1"})
    both = model_stage_args(object, {}, cpu)["runtime_env"]["env_vars"]
    assert both == {**CPU_MODEL_MALLOC_ENV, "SELFMENT_TEST_X": "1"}
    # CPU training workers get them too (Ray Train's worker_runtime_env), GPU ones only the
    # fault variables.
    assert model_process_env(on_gpu=False) == both
    assert model_process_env(on_gpu=True) == {"SELFMENT_TEST_X": "1"}
    source = inspect.getsource(train)
    assert "worker_env = model_process_env(on_gpu=s.use_gpu)" in source
    assert '"worker_runtime_env": {"env_vars": worker_env}' in source


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc settings")
def test_malloc_settings_stop_a_worker_thread_faulting_in_large_buffers_afresh():
    """What the settings are for: a model on a worker thread (as in a Ray actor) that allocates
    and frees a buffer far above the mmap threshold, again and again, page-faults it in afresh
    each time under glibc's defaults, and only once with the settings."""
    import os
    import subprocess

    from selfment_dist.pipeline._internal.cpu_malloc import CPU_MODEL_MALLOC_ENV

    # Plain malloc + memset + free (numpy would ask for huge pages, torch is slow to import).
    code = ("import ctypes, resource, threading\n"
            "libc = ctypes.CDLL(None); libc.malloc.restype = ctypes.c_void_p\n"
            "libc.free.argtypes = [ctypes.c_void_p]\n"
            "def work():\n"
            "    for _ in range(8):\n"
            "        p = libc.malloc(64 * 2**20); ctypes.memset(p, 1, 64 * 2**20); libc.free(p)\n"
            "r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "t = threading.Thread(target=work); t.start(); t.join()\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    faults_by = {}
    for name, extra in (("default", {}), ("settings", CPU_MODEL_MALLOC_ENV)):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env={**env, **extra}, timeout=120)
        assert done.returncode == 0, done.stderr
        faults_by[name] = int(done.stdout.strip())
    pages = 64 * 2**20 // 4096
    assert faults_by["default"] >= 6 * pages, faults_by  # every round faults it in
    assert faults_by["settings"] <= 2 * pages, faults_by  # the first round only
