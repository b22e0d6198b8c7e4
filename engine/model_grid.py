"""Labelling on the model's grid: the input read resampled to it plane by plane, results sampled back.

When the model's grid is finer than the input's on some axis (a z step 2-4x the xy pixel zooms z up), the
run blends and labels there rather than on the input grid: a membrane that falls between two coarse planes
is averaged into both by the way back, each below the boundary threshold, and cells stacked in z merge.
Measured on the stress rows' validation stacks (``training.stress``; README, accuracy section): F1 / IoU
0.835 / 0.611 -> 0.898 / 0.719 at a 3x z step, 0.618 / 0.458 -> 0.805 / 0.688 at 4x. Where the model grid is
coarser (large cells) it did not pay, so :func:`labels_on_model_grid` picks the route only for zooms >= 1.

:class:`ModelGrid` does the three resamplings, each slab by slab so a streamed run never holds the volume:
the input to the model grid (linear, :func:`engine.scale.resample`'s arithmetic, so slabs equal one
whole-volume resampling), probabilities back to the input grid (area-averaged where an axis shrinks back)
and labels back by the nearest model voxel centre.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray

from .scale import SCALE_TOLERANCE, ScalePlan, resample
from .streaming import Source

__all__ = ["ModelGrid", "PlaneWeights", "labels_on_model_grid", "plane_weights"]

Shape = tuple[int, int, int]


def labels_on_model_grid(scale: ScalePlan, /) -> bool:
    """True when the run should label on the model's grid: some axis zooms up beyond the tolerance and
    none zooms down beyond it."""
    return not scale.identity and all(z >= 1.0 - SCALE_TOLERANCE for z in scale.zoom)


@dataclass(frozen=True)
class PlaneWeights:
    """Target plane ``t`` = sum of ``weights[t][j]`` times source plane ``first[t] + j``."""

    first: NDArray[np.intp]
    weights: list[NDArray[np.float32]]

    def needs(self, a: int, b: int, /) -> tuple[int, int]:
        """The source planes ``[lo, hi)`` that target planes ``[a, b)`` read."""
        return int(self.first[a]), max(int(self.first[t]) + len(self.weights[t]) for t in range(a, b))


def plane_weights(n_from: int, n_to: int, /) -> PlaneWeights:
    """Weights of ``n_from`` planes resampled to ``n_to`` as :func:`engine.scale.resample` does along one axis:
    linear with PyTorch's ``align_corners=False`` coordinates where it grows, the adaptive average where it
    shrinks."""
    if n_to >= n_from:
        src = np.maximum((np.arange(n_to) + 0.5) * (n_from / n_to) - 0.5, 0.0)
        lo = np.floor(src).astype(np.intp)
        frac = (src - lo).astype(np.float32)
        weights = [np.array([1 - f, f], np.float32) if i < n_from - 1 else np.ones(1, np.float32) for i, f in zip(lo, frac)]
        return PlaneWeights(lo, weights)
    start = np.array([(t * n_from) // n_to for t in range(n_to)], dtype=np.intp)
    stop = [-(-((t + 1) * n_from) // n_to) for t in range(n_to)]
    return PlaneWeights(start, [np.full(e - s, 1.0 / (e - s), np.float32) for s, e in zip(start, stop)])


def _combine(planes: NDArray[np.generic], weights: NDArray[np.float32], *, out: NDArray[np.float32] | None = None) -> NDArray[np.float32]:
    """``sum_j weights[j] * planes[:, j]`` for ``(C, n, Y, X)`` planes of any real type -> ``(C, Y, X)`` float32."""
    out = np.multiply(planes[:, 0], weights[0], out=out, dtype=np.float32)
    for j in range(1, len(weights)):
        out += np.multiply(planes[:, j], weights[j], dtype=np.float32)
    return out


def _nearest(n_from: int, n_to: int) -> NDArray[np.intp]:
    """For each of ``n_to`` planes, the index of the one of ``n_from`` whose centre is nearest its own."""
    return np.minimum(np.floor((np.arange(n_to) + 0.5) * (n_from / n_to)).astype(np.intp), n_from - 1)


class _ResampledSource:
    """``source`` read on ``shape``'s grid, float32 (see :meth:`ModelGrid.source`)."""

    def __init__(self, source: Source, shape: Shape) -> None:
        self._source = source
        self.shape: tuple[int, int, int, int] = (source.shape[0], *shape)
        self._z = plane_weights(source.shape[1], shape[0])

    def read(self, a: int, b: int, /) -> NDArray[np.float32]:
        """Planes ``[a, b)``, each weighed straight from the raw planes into one array (a float32 copy of the
        raw planes and a list of planes to stack measured 0.3 GB more at peak on 1024x1024 planes)."""
        lo, hi = self._z.needs(a, b)
        raw = self._source.read(lo, hi)
        planes = np.empty((raw.shape[0], b - a, *raw.shape[2:]), dtype=np.float32)
        for t in range(a, b):
            _combine(raw[:, self._z.first[t] - lo :], self._z.weights[t], out=planes[:, t - a])
        size = (b - a, self.shape[2], self.shape[3])
        return resample(torch.from_numpy(planes)[None], size)[0].numpy()


class _PlanesBack:
    """Model-grid planes arriving in z order, resampled to the input grid once every plane each needs is in."""

    def __init__(self, z: PlaneWeights, shape: Shape, sink: Callable[[int, NDArray[np.float32]], None]) -> None:
        self._z, self._shape, self._sink = z, shape, sink
        self._held: NDArray[np.float32] | None = None  # model planes from ``_held_from`` on, still needed
        self._held_from, self._next = 0, 0

    def __call__(self, z0: int, chunk: NDArray[np.float32], /) -> None:
        held = chunk if self._held is None else np.concatenate([self._held, chunk], axis=1)
        arrived, first, done = z0 + chunk.shape[1], self._next, self._next
        while done < self._shape[0] and self._z.needs(done, done + 1)[1] <= arrived:
            done += 1
        self._held = held
        if done == first:
            return
        base = self._held_from
        rows = np.stack([_combine(held[:, self._z.first[t] - base :], self._z.weights[t]) for t in range(first, done)], axis=1)
        out = resample(torch.from_numpy(rows)[None], (done - first, *self._shape[1:]))[0].numpy()
        keep = int(self._z.first[done]) if done < self._shape[0] else arrived
        self._held, self._held_from, self._next = held[:, keep - base :], keep, done
        self._sink(first, np.ascontiguousarray(out))


class ModelGrid:
    """The input grid ``input_shape`` and the model's ``model_shape`` (both ``(Z, Y, X)``)."""

    def __init__(self, input_shape: Shape, model_shape: Shape) -> None:
        self.input_shape, self.model_shape = input_shape, model_shape

    @classmethod
    def for_scale(cls, shape: Shape, scale: ScalePlan, /) -> ModelGrid:
        """The model grid of ``scale``; an axis within :data:`engine.scale.SCALE_TOLERANCE` of 1 keeps its size
        (as on the input grid, the network sees such an axis as it is)."""
        zoomed = scale.model_shape(shape)
        sides = [n if abs(z - 1.0) <= SCALE_TOLERANCE else m for n, m, z in zip(shape, zoomed, scale.zoom)]
        return cls(shape, (sides[0], sides[1], sides[2]))

    def source(self, source: Source, /) -> Source:
        """``source`` as a :class:`engine.streaming.Source` on the model grid: each read resamples only the
        input planes it needs (linear where an axis grows, averaged where it shrinks)."""
        return _ResampledSource(source, self.model_shape)

    def planes(self, n: int, /) -> int:
        """``n`` input planes in model planes (rounded up), for options given in input planes."""
        return math.ceil(n * self.model_shape[0] / self.input_shape[0])

    def probabilities_back(self, sink: Callable[[int, NDArray[np.float32]], None], /) -> Callable[[int, NDArray[np.float32]], None]:
        """A sink for ``(K, n, Y, X)`` model-grid probability chunks in z order that passes ``sink`` the same
        probabilities on the input grid (:func:`engine.scale.resample` back), in z order, as they complete."""
        return _PlanesBack(plane_weights(self.model_shape[0], self.input_shape[0]), self.input_shape, sink)

    def labels_back(self, chunks: Iterator[NDArray[np.uint32]], /) -> Iterator[NDArray[np.uint32]]:
        """Model-grid label chunks (in z order, from plane 0) as input-grid chunks: each input voxel takes the
        label of the model voxel whose centre is nearest its own."""
        zi, yi, xi = (_nearest(m, n) for m, n in zip(self.model_shape, self.input_shape))
        base, t = 0, 0
        for chunk in chunks:
            end = base + chunk.shape[0]
            stop = int(np.searchsorted(zi, end))
            if stop > t:
                yield chunk[zi[t:stop] - base][:, yi][:, :, xi]
            base, t = end, stop
