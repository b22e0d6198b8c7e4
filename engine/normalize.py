"""Intensity normalization as the bundle prescribes, with statistics over the whole volume.

Per-patch statistics would make the same cell look different in neighbouring patches; whole-volume
statistics keep the network's input consistent across the tiling. Above ``MAX_EXACT_VOXELS`` the
statistics come from a regular strided subsample that still spans the whole volume.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from .bundle import Normalization
from .errors import InputError

__all__ = ["normalize", "normalization_stats"]

MAX_EXACT_VOXELS = 2**25


def _sample(channel: np.ndarray) -> np.ndarray:
    """The voxels statistics are computed on: all of them, or every k-th along each axis."""
    if channel.size <= MAX_EXACT_VOXELS:
        return channel
    step = int(np.ceil((channel.size / MAX_EXACT_VOXELS) ** (1 / 3)))
    return channel[::step, ::step, ::step]


def normalization_stats(volume: np.ndarray, spec: Normalization, /) -> list[tuple[float, float]]:
    """Per channel ``(offset, scale)`` such that ``(x - offset) / scale`` is the network input.

    Args:
        volume: ``(C, Z, Y, X)`` in any real dtype.
        spec: the bundle's normalization.

    Raises:
        InputError: a channel is constant (nothing to segment) or holds NaN/inf.
    """
    stats = []
    for c, channel in enumerate(volume):
        sample = _sample(channel)
        if sample.dtype.kind == "f" and not np.isfinite(sample).all():
            raise InputError(f"channel {c} contains NaN or infinite values; clean the image first")
        if spec.kind == "percentile":
            lo, hi = np.percentile(sample, [spec.low, spec.high])
            offset, scale = float(lo), float(hi - lo)
        else:
            offset, scale = float(sample.mean(dtype=np.float64)), float(sample.std(dtype=np.float64))
        if not scale > 0:
            raise InputError(f"channel {c} is constant (value {offset:g}); there is nothing to segment")
        stats.append((offset, scale))
    return stats


def normalize(volume: np.ndarray, spec: Normalization, /) -> NDArray[np.float32]:
    """``(C, Z, Y, X)`` raw intensities -> float32 network input of the same shape.

    Raises:
        InputError: see :func:`normalization_stats`.
    """
    stats = normalization_stats(volume, spec)
    out = np.empty(volume.shape, dtype=np.float32)
    for c, (offset, scale) in enumerate(stats):
        np.subtract(volume[c], offset, out=out[c], dtype=np.float32)
        out[c] *= np.float32(1.0 / scale)
    return out
