"""What every timed run records besides its wall time: network FLOPs, the machine's peak, Dice.

- :func:`flops_per_voxel` counts the network's multiply-adds (``torch.utils.flop_counter``, 2 FLOPs per
  MAC, convolutions and matmuls only) on one patch and divides by its voxels; the network is fully
  convolutional, so a run's FLOPs are that figure times the voxels it pushed through the network.
- :func:`machine_peak` measures the GFLOP/s of one large matmul in a given dtype, in the same process as
  the runs it is compared with, so "fraction of peak" compares like with like on a shared machine.
- :class:`TimedNetwork` wraps a ``batch -> probabilities`` callable and adds up the seconds spent in it and
  the voxels it was given (CUDA work is synchronised before the clock is read).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from engine.backends.torch_backend import cpu_has_native_bf16
from engine.bundle import Bundle
from engine.metrics import foreground_dice
from engine.labels import interior_probability

__all__ = [
    "TimedNetwork", "flops_per_voxel", "machine_peak", "machine_peaks", "native_precisions", "foreground_mask", "mask_dice",
    "synchronize",
]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def synchronize(device: torch.device) -> None:
    """Wait for queued work on ``device`` (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flops_per_voxel(model: nn.Module, /, *, in_channels: int, patch_shape: tuple[int, int, int]) -> float:
    """Network FLOPs per input voxel for patches of ``patch_shape`` (counted on the meta device, no compute).

    Args:
        model: the network (not modified; a copy is moved to the meta device).
        in_channels: input channels.
        patch_shape: ``(z, y, x)`` of one network input.
    """
    meta = copy.deepcopy(model).to("meta").eval()
    x = torch.empty((1, in_channels, *patch_shape), device="meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        meta(x)
    return float(counter.get_total_flops()) / float(np.prod(patch_shape))


def machine_peak(device: torch.device, precision: str, /, *, size: int | None = None, repeats: int = 5) -> float:
    """GFLOP/s of the best of ``repeats`` square matmuls of ``size`` in ``precision`` on ``device``.

    Args:
        device: where to measure.
        precision: ``fp32``, ``bf16`` or ``fp16``.
        size: matrix side; 2048 on the CPU, 8192 on CUDA by default.
        repeats: timed runs after one warm-up.
    """
    n = size or (8192 if device.type == "cuda" else 2048)
    dtype = _DTYPES[precision]
    a = torch.randn((n, n), device=device).to(dtype)
    b = torch.randn((n, n), device=device).to(dtype)
    torch.matmul(a, b)
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best / 1e9


def native_precisions(device: torch.device, /) -> tuple[str, ...]:
    """The precisions ``device`` computes in hardware: on a CPU without AVX512-BF16/AMX, bf16 is emulated (a
    2048 matmul takes ~60 s instead of 0.3 s), so it is neither a peak nor a row worth timing there."""
    if device.type == "cuda":
        return ("fp32", "bf16", "fp16")
    return ("fp32", "bf16") if cpu_has_native_bf16() else ("fp32",)


def machine_peaks(device: torch.device, /) -> dict[str, float]:
    """:func:`machine_peak` for each of :func:`native_precisions`."""
    return {p: machine_peak(device, p) for p in native_precisions(device)}


@dataclass
class TimedNetwork:
    """A ``(N, C, Z, Y, X) -> (N, K, Z, Y, X)`` callable that keeps the seconds and voxels it handled."""

    run: Callable[[torch.Tensor], torch.Tensor]
    device: torch.device
    seconds: float = 0.0
    voxels: int = 0
    calls: int = 0

    def __call__(self, batch: torch.Tensor, /) -> torch.Tensor:
        synchronize(self.device)
        start = time.perf_counter()
        out = self.run(batch)
        synchronize(self.device)
        self.seconds += time.perf_counter() - start
        self.voxels += int(batch.shape[0]) * int(np.prod(batch.shape[2:]))
        self.calls += 1
        return out


def foreground_mask(probs: NDArray[np.float32], bundle: Bundle, /) -> NDArray[np.bool_]:
    """The cell-interior mask post-processing starts from: ``interior > threshold`` (``(Z, Y, X)`` bool)."""
    return np.asarray(interior_probability(probs, bundle.output) > bundle.postprocess.threshold)


def mask_dice(probs: NDArray[np.float32], reference: NDArray[np.bool_], bundle: Bundle, /) -> float:
    """Foreground Dice of ``probs`` (``(K, Z, Y, X)``) against the reference mask."""
    return foreground_dice(foreground_mask(probs, bundle), reference)
