"""Sliding-window inference: patch plan, gaussian importance map, batched runs, exact blending.

The volume is covered by overlapping patches (the last one along each axis is shifted back to end at the
border, so no padding is needed unless the volume is smaller than a patch). Each prediction is weighted by
a gaussian importance map divided by the summed weights of all patches covering the voxel (known from the
plan before any model runs), and accumulated on the device that ran the model. The blend is exact: an
identity model returns its input to float32 precision.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from .errors import InputError

__all__ = [
    "TilingConfig",
    "fit_patch_shape",
    "patch_starts",
    "plan_patches",
    "importance_map",
    "sliding_window",
]

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class TilingConfig:
    """How a volume is cut into patches.

    Args:
        patch_shape: ``(z, y, x)`` patch size in voxels.
        overlap: fraction of a patch shared with its neighbour along each axis, ``0 <= overlap < 1``.
        batch_size: patches per network call.
        padding: how a volume smaller than a patch is extended: ``reflect`` or ``constant`` (zeros).
        sigma_scale: gaussian sigma of the importance map as a fraction of the patch side.
    """

    patch_shape: tuple[int, int, int]
    overlap: float = 0.25
    batch_size: int = 1
    padding: Literal["reflect", "constant"] = "reflect"
    sigma_scale: float = 0.125

    def __post_init__(self) -> None:
        if len(self.patch_shape) != 3 or any(int(p) < 1 for p in self.patch_shape):
            raise InputError(f"patch shape must be 3 positive ints, got {self.patch_shape!r}")
        if not 0 <= self.overlap < 1:
            raise InputError(f"overlap must be >= 0 and < 1, got {self.overlap}")
        if self.batch_size < 1:
            raise InputError(f"batch size must be >= 1, got {self.batch_size}")
        if self.padding not in ("reflect", "constant"):
            raise InputError(f"padding must be 'reflect' or 'constant', got {self.padding!r}")


def fit_patch_shape(volume_shape: Sequence[int], patch_shape: Sequence[int], divisor: int, /) -> tuple[int, int, int]:
    """Shrink each patch side that exceeds the volume to the smallest multiple of ``divisor`` covering it.

    A 33-slice stack with a 64-slice patch and divisor 16 gets 48 slices: less padding, less wasted compute.
    """
    fitted = [min(p, math.ceil(v / divisor) * divisor) for v, p in zip(volume_shape, patch_shape)]
    return (fitted[0], fitted[1], fitted[2])


def patch_starts(size: int, patch: int, overlap: float, /) -> list[int]:
    """Start offsets along one axis of length ``size`` (>= ``patch``); the last patch ends at the border."""
    if size <= patch:
        return [0]
    step = max(1, int(round(patch * (1.0 - overlap))))
    starts = list(range(0, size - patch + 1, step))
    if starts[-1] != size - patch:
        starts.append(size - patch)
    return starts


def plan_patches(shape: Sequence[int], config: TilingConfig, /) -> list[tuple[int, int, int]]:
    """All patch start corners ``(z, y, x)`` covering a (padded) volume of ``shape``."""
    axes = [patch_starts(s, p, config.overlap) for s, p in zip(shape, config.patch_shape)]
    return [(z, y, x) for z in axes[0] for y in axes[1] for x in axes[2]]


def importance_map(patch_shape: Sequence[int], /, *, sigma_scale: float, device: torch.device) -> torch.Tensor:
    """Gaussian weights ``(Z, Y, X)`` float32 on ``device``, peak 1, floored at 1e-3 so every voxel counts."""
    axes = []
    for p in patch_shape:
        centre, sigma = (p - 1) / 2.0, max(p * sigma_scale, 1e-6)
        axes.append(torch.exp(-0.5 * ((torch.arange(p, dtype=torch.float64) - centre) / sigma) ** 2))
    weights = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    weights = (weights / weights.max()).clamp_min(1e-3)
    return weights.to(device=device, dtype=torch.float32)


def _pad(volume: np.ndarray, patch_shape: Sequence[int], mode: str) -> np.ndarray:
    """Extend a ``(C, Z, Y, X)`` volume at the far end of each axis up to the patch size."""
    pads = [(0, 0)] + [(0, max(0, p - s)) for s, p in zip(volume.shape[1:], patch_shape)]
    if not any(after for _, after in pads):
        return volume
    if mode == "reflect" and min(volume.shape[1:]) < 2:
        mode = "edge"  # a single plane has nothing to reflect
    return np.pad(volume, pads, mode=mode)


def _host_batches(
    volume: torch.Tensor, corners: list[tuple[int, int, int]], config: TilingConfig
) -> Iterator[tuple[torch.Tensor, list[tuple[int, int, int]]]]:
    pz, py, px = config.patch_shape
    for i in range(0, len(corners), config.batch_size):
        chunk = corners[i : i + config.batch_size]
        yield torch.stack([volume[:, z : z + pz, y : y + py, x : x + px] for z, y, x in chunk]), chunk


def _device_batches(
    host: Iterator[tuple[torch.Tensor, list[tuple[int, int, int]]]], device: torch.device
) -> Iterator[tuple[torch.Tensor, list[tuple[int, int, int]]]]:
    """Move batches to ``device``; on CUDA the next batch is copied on a side stream during the current compute."""
    if device.type != "cuda":
        for batch, chunk in host:
            yield batch.to(device), chunk
        return
    copy_stream = torch.cuda.Stream(device=device)

    def issue(item: tuple[torch.Tensor, list[tuple[int, int, int]]]) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
        with torch.cuda.stream(copy_stream):
            return item[0].pin_memory().to(device, non_blocking=True), item[1]

    pending = None
    for item in host:
        ready, pending = pending, issue(item)
        if ready is not None:
            yield ready
        torch.cuda.current_stream(device).wait_stream(copy_stream)
        pending[0].record_stream(torch.cuda.current_stream(device))
    if pending is not None:
        yield pending


def sliding_window(
    volume: np.ndarray,
    run: Callable[[torch.Tensor], torch.Tensor],
    /,
    *,
    config: TilingConfig,
    out_channels: int,
    device: torch.device,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Run ``run`` over overlapping patches of ``volume`` and blend the results.

    Args:
        volume: ``(C, Z, Y, X)`` float32 network input on the host.
        run: maps a ``(N, C, pz, py, px)`` float32 batch on ``device`` to ``(N, out_channels, pz, py, px)``
            float32 on ``device``.
        config: patch shape, overlap, batch size, padding.
        out_channels: channels ``run`` returns.
        device: where ``run`` computes and where the blend accumulates.
        progress: called with ``(patches_done, patches_total)`` after each batch.

    Returns:
        ``(out_channels, Z, Y, X)`` float32 on ``device``.
    """
    shape = volume.shape[1:]
    padded = torch.from_numpy(np.ascontiguousarray(_pad(volume, config.patch_shape, config.padding)))
    corners = plan_patches(padded.shape[1:], config)
    weights = importance_map(config.patch_shape, sigma_scale=config.sigma_scale, device=device)
    norm = _weight_sum(padded.shape[1:], corners, weights)
    out = torch.zeros((out_channels, *padded.shape[1:]), dtype=torch.float32, device=device)
    pz, py, px = config.patch_shape
    done = 0
    for batch, chunk in _device_batches(_host_batches(padded, corners, config), device):
        pred = run(batch)
        for i, (z, y, x) in enumerate(chunk):
            region = (slice(z, z + pz), slice(y, y + py), slice(x, x + px))
            out[(slice(None), *region)] += pred[i] * (weights / norm[region])
        done += len(chunk)
        if progress is not None:
            progress(done, len(corners))
    return out[:, : shape[0], : shape[1], : shape[2]]


def _weight_sum(shape: Sequence[int], corners: list[tuple[int, int, int]], weights: torch.Tensor) -> torch.Tensor:
    """Summed importance weights per voxel, added in float64 so the blend's weights sum to 1 within float32."""
    norm = torch.zeros(tuple(shape), dtype=torch.float64, device=weights.device)
    pz, py, px = weights.shape
    for z, y, x in corners:
        norm[z : z + pz, y : y + py, x : x + px] += weights
    return norm.to(torch.float32)
