"""Light transport: decode tasks ship uint8 pixels at their decoded size; the model's device
does ``ToTensor`` + antialiased bilinear resize (and the backbone the ImageNet normalisation).

Why: the old transport resized on the decode CPUs and shipped float32 (S, S, 3) arrays, 7 MB an
image at 768 px through the object store, and the resize was ~80% of a decode task's CPU. A
640x480 JPEG decoded to uint8 is 0.9 MB, and the resize is cheap on a GPU.

Numerics: the same torch ops in the same order as :func:`selfment_dist.model.resize.resize_square`
(uint8 HWC → float32 CHW / 255 → ``F.interpolate(bilinear, antialias=True,
align_corners=False)``), so on a CPU the result is bit-identical to it (tests/test_transport.py
checks many sizes); on CUDA the kernels differ and results agree within 1e-5
(``benchmarks/device_resize_check.py``). Images of one shape in a batch are resized in one call.

The decode side is :mod:`selfment_dist.io.pixels` (no torch: a decode worker that imported it
would pay 1.6 s of CPU per process). Here, the model side, :class:`DeviceResizer`: on CUDA it
stages the batch in one pinned host buffer (torch's caching host allocator reuses it safely),
copies it with ``non_blocking=True`` on its own stream and resizes there, so that with two
calls in flight per actor the copy and resize of one batch overlap the model's compute on
another (the model calls themselves must run one at a time: :attr:`DeviceResizer.model_lock`).
"""
from __future__ import annotations

import threading
import warnings
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["DeviceResizer"]

# Ray Data hands the actor read-only arrays; the resize only reads them, so torch's warning about
# wrapping a read-only array (once per actor, in every run's log) says nothing useful here.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable",
                        category=UserWarning, module=__name__)


class DeviceResizer:
    """uint8 (H, W, 3) images of any sizes → float32 (B, S, S, 3) in [0, 1] on ``device``.

    Float32 (S, S, 3) images in [0, 1] (the old transport) pass through unchanged, alone or
    mixed with uint8 ones, so a model actor accepts both kinds of decode batch.

    Attributes:
        size: the square side S.
        device: where the resize runs and the result lives.
        model_lock: a lock the model actor holds around its model calls: with two calls in
            flight, preparation overlaps compute but two model calls never run at once (torch's
            TF32 flags are per process, and two batches would double the memory).
    """

    def __init__(self, size: int, device: torch.device | str):
        self.size = int(size)
        self.device = torch.device(device)
        self.model_lock = threading.Lock()
        self._cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if self._cuda else None

    def __call__(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Resize ``images`` on the device; the result is ready for the current stream."""
        s = self.size
        if len(images) == 0:
            return torch.empty((0, s, s, 3), dtype=torch.float32, device=self.device)
        for im in images:
            ready = im.dtype == np.float32 and im.shape == (s, s, 3)
            if not ready and (im.dtype != np.uint8 or im.ndim != 3 or im.shape[2] != 3
                              or 0 in im.shape):
                raise ValueError(f"images must be uint8 (H, W, 3) (or float32 ({s}, {s}, 3)), "
                                 f"got {im.dtype} {tuple(im.shape)}")
        if all(im.dtype == np.float32 for im in images):
            host = np.stack(images) if len(images) > 1 else images[0][None]
            return torch.from_numpy(host).to(self.device, non_blocking=self._cuda)
        if not self._cuda:
            return self._resize([torch.from_numpy(np.ascontiguousarray(im)) for im in images])
        pixels = self._to_device(images)
        with torch.cuda.stream(self._stream):
            out = self._resize(pixels)
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(self._stream)  # the caller's kernels start after the resize
        out.record_stream(current)  # its memory is not reused while the caller's stream uses it
        return out

    def _to_device(self, images: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """One pinned staging buffer for the batch, one non-blocking copy on our stream."""
        sizes = [im.nbytes for im in images]
        # Each image starts 16-byte aligned, so a float32 one can be viewed as float32 on the
        # device.
        offsets = np.concatenate([[0], np.cumsum([-(-n // 16) * 16 for n in sizes])])
        staging = torch.empty(int(offsets[-1]), dtype=torch.uint8, pin_memory=True)
        flat = staging.numpy()
        for im, start, n in zip(images, offsets, sizes):
            flat[start:start + n] = np.ascontiguousarray(im).reshape(-1).view(np.uint8)
        with torch.cuda.stream(self._stream):
            # The caching host allocator records this stream's use of ``staging``: the buffer
            # goes back to the pool only after the copy completed.
            on_device = staging.to(self.device, non_blocking=True)
        return [on_device[start:start + n]
                .view(torch.float32 if im.dtype == np.float32 else torch.uint8).view(im.shape)
                for im, start, n in zip(images, offsets, sizes)]

    def _resize(self, pixels: list[torch.Tensor]) -> torch.Tensor:
        """``resize_square``'s ops on uint8 HWC tensors, one interpolate call per shape."""
        s = self.size
        out = torch.empty((len(pixels), 3, s, s), dtype=torch.float32, device=pixels[0].device)
        groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(pixels):
            groups.setdefault((*p.shape, p.dtype), []).append(i)
        for (*shape, dtype), rows in groups.items():
            x = torch.stack([pixels[i] for i in rows]).permute(0, 3, 1, 2)
            if dtype != torch.float32:  # float32 rows are already in [0, 1] at S
                x = x.float().div_(255)
            if tuple(shape[:2]) != (s, s):
                x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False,
                                  antialias=True)
            out[rows] = x
        # (B, S, S, 3) as the backbone takes it: a view, the backbone permutes it back for free.
        return out.permute(0, 2, 3, 1)
