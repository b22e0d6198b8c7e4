"""Sliding-window inference: patch plan, gaussian importance map, batched runs, exact blending.

The volume is covered by overlapping patches (the last one along each axis is shifted back to end at the
border, so no padding is needed unless the volume is smaller than a patch). Each prediction is weighted by
a gaussian importance map divided by the summed weights of all patches covering the voxel (known from the
plan before any model runs), and accumulated on the device that ran the model. The blend is exact: an
identity model returns its input to float32 precision.

:func:`sliding_window_slabs` runs the same whole-volume plan a group of patch rows at a time, reading only
the planes a group needs and yielding planes as soon as no later patch touches them: every voxel blends
the same patches in the same order, so given the same per-patch predictions the streamed result is bit for
bit the whole-volume one.
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
    "SlabGrid",
    "sliding_window",
    "sliding_window_slabs",
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
    how: Literal["reflect", "constant", "edge"] = "constant" if mode == "constant" else "reflect"
    if how == "reflect" and min(volume.shape[1:]) < 2:
        how = "edge"  # a single plane has nothing to reflect
    return np.pad(volume, pads, mode=how)


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


@dataclass(frozen=True)
class SlabGrid:
    """The global patch plan cut into groups of consecutive patch rows (same z start), for streaming.

    Every group runs the patches of the whole-volume plan whose z start falls in it, so no patch runs twice
    and each voxel blends the same patches, in the same order, as :func:`sliding_window` on the whole
    volume. After group ``g`` the planes below the next group's first z start are final.

    Args:
        shape: ``(Z, Y, X)`` of the volume (unpadded).
        config: the tiling.
        rows_per_group: patch rows per group; None puts every row in one group.
    """

    shape: tuple[int, int, int]
    config: TilingConfig
    rows_per_group: int | None = None

    @property
    def padded(self) -> tuple[int, int, int]:
        s, p = self.shape, self.config.patch_shape
        return (max(s[0], p[0]), max(s[1], p[1]), max(s[2], p[2]))

    @property
    def z_starts(self) -> list[int]:
        return patch_starts(self.padded[0], self.config.patch_shape[0], self.config.overlap)

    @property
    def groups(self) -> list[tuple[int, int]]:
        """Row index ranges ``[i0, i1)`` of each group."""
        n = len(self.z_starts)
        rows = n if self.rows_per_group is None else max(1, int(self.rows_per_group))
        return [(i, min(i + rows, n)) for i in range(0, n, rows)]

    def input_range(self, group: tuple[int, int], /) -> tuple[int, int]:
        """Planes ``[a, b)`` of the (z-padded) input that the group's patches read."""
        starts = self.z_starts
        return starts[group[0]], starts[group[1] - 1] + self.config.patch_shape[0]

    def final_range(self, group: tuple[int, int], /) -> tuple[int, int]:
        """Planes ``[a, b)`` of the output (unpadded) that are final once the group has run."""
        starts = self.z_starts
        a = 0 if group[0] == 0 else starts[group[0]]
        b = starts[group[1]] if group[1] < len(starts) else self.shape[0]
        return min(a, self.shape[0]), min(b, self.shape[0])

    def core_ends(self, depth: int, halo: int, /) -> tuple[int, ...]:
        """Where labelling cores of at most ``depth`` planes end: ``halo`` planes below where a group's planes
        become final whenever such a place is within reach, so each core is labelled right after that group
        instead of waiting for the next one. On 128 planes in 24-plane groups with depth 48 and halo 12 the
        cores end at 36, 84, 128 instead of 48, 96, 128: the middle one no longer waits for the network's last
        group (it started only when the network had finished, measured on 128x1024x1024)."""
        z = self.shape[0]
        marks = [self.final_range(g)[1] - halo for g in self.groups[:-1]]
        ends, c0 = [], 0
        while z - c0 > depth:
            fits = [e for e in marks if c0 + depth / 2 <= e <= c0 + depth]  # no core under half the depth
            c0 = fits[-1] if fits else c0 + depth
            ends.append(c0)
        return (*ends, z)

    def read_ranges(self) -> list[tuple[int, int]]:
        """New unpadded planes ``[a, b)`` each group needs beyond what the previous group read (maybe empty)."""
        out, done = [], 0
        for group in self.groups:
            b = min(self.input_range(group)[1], self.shape[0])
            out.append((done, max(done, b)))
            done = max(done, b)
        return out

    @property
    def n_patches(self) -> int:
        starts = [patch_starts(s, p, self.config.overlap) for s, p in zip(self.padded[1:], self.config.patch_shape[1:])]
        return len(self.z_starts) * len(starts[0]) * len(starts[1])


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
    grid = SlabGrid(tuple(volume.shape[1:]), config)  # type: ignore[arg-type]
    slabs = sliding_window_slabs(
        lambda a, b: volume[:, a:b], run, grid=grid, out_channels=out_channels, device=device, progress=progress
    )
    (_, out), = list(slabs)
    return out


def sliding_window_slabs(
    read: Callable[[int, int], np.ndarray],
    run: Callable[[torch.Tensor], torch.Tensor],
    /,
    *,
    grid: SlabGrid,
    out_channels: int,
    device: torch.device,
    progress: Progress | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """:func:`sliding_window` by z-slabs: yields each run of final planes as soon as it is complete.

    Args:
        read: ``read(a, b)`` returns the ``(C, b - a, Y, X)`` float32 network input of planes ``[a, b)``;
            it is called once per group, with the ranges of ``grid.read_ranges()``, in order.
        run: as for :func:`sliding_window`.
        grid: the patch plan and its grouping.
        out_channels: channels ``run`` returns.
        device: where ``run`` computes and where the blend accumulates (only the active slab lives there).
        progress: called with ``(patches_done, patches_total)`` after each batch.

    Yields:
        ``(z0, probs)``: ``probs`` is ``(out_channels, n, Y, X)`` float32 on ``device``, the final blend of
        planes ``[z0, z0 + n)``; successive slabs tile ``[0, Z)`` in order.
    """
    shape, config = grid.shape, grid.config
    weights = importance_map(config.patch_shape, sigma_scale=config.sigma_scale, device=device)
    yx = [patch_starts(s, p, config.overlap) for s, p in zip(grid.padded[1:], config.patch_shape[1:])]
    yx_corners = [(y, x) for y in yx[0] for x in yx[1]]
    z_starts, total, done = grid.z_starts, grid.n_patches, 0
    carry_in: np.ndarray | None = None  # input planes already read that the next group needs again
    carry_out = torch.zeros((out_channels, 0, *grid.padded[1:]), dtype=torch.float32, device=device)
    for group, (ra, rb) in zip(grid.groups, grid.read_ranges()):
        a, b = grid.input_range(group)
        fresh = np.asarray(read(ra, rb), dtype=np.float32) if rb > ra else None
        parts = [p for p in (carry_in, fresh) if p is not None]
        have = np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]  # planes [a, min(b, Z))
        del parts, fresh
        next_start = z_starts[group[1]] if group[1] < len(z_starts) else b
        carry_in = have[:, max(0, min(next_start, shape[0]) - a) :].copy()
        slab = torch.from_numpy(np.ascontiguousarray(_pad(have, (b - a, *config.patch_shape[1:]), config.padding)))
        del have
        corners = [(z - a, y, x) for z in z_starts[group[0] : group[1]] for y, x in yx_corners]
        norm = _weight_sum_rows(grid, (a, b), weights, yx_corners)
        out = torch.zeros((out_channels, b - a, *grid.padded[1:]), dtype=torch.float32, device=device)
        out[:, : carry_out.shape[1]] = carry_out
        for batch, chunk in _device_batches(_host_batches(slab, corners, config), device):
            pred = run(batch)
            _accumulate(out, pred, chunk, weights, norm)
            done += len(chunk)
            if progress is not None:
                progress(done, total)
        del slab, norm, pred
        f0, f1 = grid.final_range(group)
        carry_out = out[:, f1 - a :].clone() if group[1] < len(z_starts) else out[:, :0]
        final = out[:, f0 - a : f1 - a, : shape[1], : shape[2]]
        del out  # only the final planes (and the small carries) stay alive while the caller uses them
        yield f0, final
        del final


def _accumulate(
    out: torch.Tensor, pred: torch.Tensor, chunk: list[tuple[int, int, int]], weights: torch.Tensor, norm: torch.Tensor
) -> None:
    pz, py, px = weights.shape
    for i, (z, y, x) in enumerate(chunk):
        region = (slice(z, z + pz), slice(y, y + py), slice(x, x + px))
        out[(slice(None), *region)] += pred[i] * (weights / norm[region])


def _weight_sum(shape: Sequence[int], corners: list[tuple[int, int, int]], weights: torch.Tensor) -> torch.Tensor:
    """Summed importance weights per voxel, added in float64 so the blend's weights sum to 1 within float32."""
    norm = torch.zeros(tuple(shape), dtype=torch.float64, device=weights.device)
    pz, py, px = weights.shape
    for z, y, x in corners:
        norm[z : z + pz, y : y + py, x : x + px] += weights
    return norm.to(torch.float32)


def _weight_sum_rows(
    grid: SlabGrid, planes: tuple[int, int], weights: torch.Tensor, yx_corners: list[tuple[int, int]], chunk: int = 8
) -> torch.Tensor:
    """:func:`_weight_sum` of the whole plan, restricted to planes ``[a, b)``; float64 only ``chunk`` planes at a time.

    Each voxel adds the same weights in the same order as the whole-volume sum, so the result is identical.
    """
    a, b = planes
    pz, py, px = weights.shape
    w64 = weights.to(torch.float64)
    norm = torch.empty((b - a, *grid.padded[1:]), dtype=torch.float32, device=weights.device)
    for c0 in range(a, b, chunk):
        c1 = min(b, c0 + chunk)
        acc = torch.zeros((c1 - c0, *grid.padded[1:]), dtype=torch.float64, device=weights.device)
        for z in grid.z_starts:
            lo, hi = max(z, c0), min(z + pz, c1)
            if lo >= hi:
                continue
            for y, x in yx_corners:
                acc[lo - c0 : hi - c0, y : y + py, x : x + px] += w64[lo - z : hi - z]
        norm[c0 - a : c1 - a] = acc.to(torch.float32)
    return norm
