"""Watershed seeds: maxima of the interior's distance transform, at least ``min_dist`` apart within a cell.

A maximum is a voxel whose distance is the largest among the voxels it reaches inside the interior by up
to ``r`` steps along x, then y, then z (``r`` = ``min_dist`` in each axis's units): the max filter is
taken one face step at a time and masked after each step, so it never looks across a membrane into a
neighbouring cell (a bigger neighbour would otherwise suppress a small cell's seed), and it is a handful
of whole-array numpy operations instead of one filter per object. Maxima of the same interior component
closer than ``min_dist`` are thinned greedily, strongest first, with a k-d tree; touching maxima (a
plateau) count as one.
"""

from __future__ import annotations

from collections.abc import Sequence

import cc3d
import numpy as np
from numpy.typing import NDArray
from scipy.spatial import cKDTree

from ..bundle import OutputSpec
from .distance import is_unit

__all__ = [
    "find_seeds", "interior_mask", "interior_of", "interior_probability", "path_maximum", "seed_radius", "seeds_from_peaks",
]


def interior_probability(probs: NDArray[np.float32], output: OutputSpec, /) -> NDArray[np.float32]:
    """The cell-interior probability ``(Z, Y, X)`` from the network's ``(K, Z, Y, X)`` output."""
    return interior_of(probs[output.channel], output.kind)


def interior_of(channel: NDArray[np.float32], kind: str, /) -> NDArray[np.float32]:
    """The cell-interior probability from the one output channel that matters, of ``kind`` boundary or foreground."""
    return (1.0 - channel) if kind == "boundary" else channel


def interior_mask(channel: NDArray[np.float32], kind: str, threshold: float, /) -> NDArray[np.bool_]:
    """Where the interior probability exceeds ``threshold`` (numpy or torch alike: the threshold is compared as
    a Python float, so in float32 on both; numpy 2 would compare a float64 scalar in float64)."""
    return interior_of(channel, kind) > float(threshold)


def seed_radius(min_dist: int, sampling: Sequence[float] | None, /) -> tuple[int, int, int]:
    """Voxels per axis that make ``min_dist`` in ``sampling`` units (voxels when None), at least 1."""
    scale = sampling or (1.0, 1.0, 1.0)
    r = [max(1, round(min_dist / float(s))) for s in scale]
    return (r[0], r[1], r[2])


def path_maximum(distance: NDArray[np.generic], mask: NDArray[np.bool_], radius: tuple[int, int, int]) -> NDArray[np.generic]:
    """The largest ``distance`` each mask voxel reaches by axis steps inside ``mask`` (see the module doc).

    Each step is a 3-wide max along one axis into a preallocated buffer, then a minimum with ``cap`` (the
    type's top inside the mask, below every distance outside): whole-array, unmasked operations only.
    """
    kind = distance.dtype
    fill = kind.type(-1 if kind.kind == "f" else 0)  # below every mask voxel's distance
    top = kind.type(np.inf) if kind.kind == "f" else np.iinfo(kind).max
    cap = np.where(mask, top, fill).astype(kind, copy=False)
    m = np.minimum(distance, cap)
    g = np.empty_like(m)
    for axis in (2, 1, 0):
        if m.shape[axis] < 2:
            continue
        for _ in range(min(radius[axis], m.shape[axis] - 1)):
            mv, gv = np.moveaxis(m, axis, 0), np.moveaxis(g, axis, 0)
            np.maximum(mv[:-2], mv[1:-1], out=gv[1:-1])  # g[i] = max(m[i - 1], m[i], m[i + 1])
            np.maximum(gv[1:-1], mv[2:], out=gv[1:-1])
            np.maximum(mv[0], mv[1], out=gv[0])
            np.maximum(mv[-2], mv[-1], out=gv[-1])
            np.minimum(g, cap, out=g)
            m, g = g, m
    return m


def _order_key(distance: NDArray[np.float32], sampling: Sequence[float] | None) -> NDArray[np.generic]:
    """What the maxima are found on: the same order as ``distance``, in the narrowest type that keeps it.

    Isotropic distances are square roots of integers, so their squares, as uint8 (distances up to 15) or
    uint16 (up to 255), order the voxels exactly as the distances do at a quarter or half of the memory
    traffic of float32; anything else stays float32.
    """
    if not is_unit(sampling):
        return distance
    top = float(distance.max(initial=0.0))
    if top >= 255.0:
        return distance
    squares = np.rint(np.square(distance))
    return squares.astype(np.uint8 if top * top <= 255.0 else np.uint16)


def _thin(points: NDArray[np.intp], component: NDArray[np.integer], spacing: float, scale: NDArray[np.float64]) -> NDArray[np.bool_]:
    """Keep mask for ``points`` (strongest first): a point goes when a kept, stronger point of its component
    lies closer than ``spacing`` (Chebyshev, ``scale`` units per voxel)."""
    keep = np.ones(len(points), dtype=bool)
    if len(points) < 2:
        return keep
    pairs = cKDTree(points * scale).query_pairs(r=spacing - 1e-6, p=np.inf, output_type="ndarray")
    pairs = pairs[component[pairs[:, 0]] == component[pairs[:, 1]]]
    if not len(pairs):
        return keep
    pairs.sort(axis=1)
    pairs = pairs[np.argsort(pairs[:, 0], kind="stable")]
    first = np.searchsorted(pairs[:, 0], np.arange(len(points) + 1))
    for i in np.unique(pairs[:, 0]).tolist():  # one step per point that has a close weaker partner
        if keep[i]:
            keep[pairs[first[i] : first[i + 1], 1]] = False
    return keep


def find_seeds(
    distance: NDArray[np.float32], components: NDArray[np.integer], /, *, min_dist: int, sampling: Sequence[float] | None
) -> NDArray[np.intp]:
    """Seed voxels ``(n, 3)``, strongest first: the distance maxima of each interior component, thinned to
    ``min_dist`` (in ``sampling`` units; voxels when None). Touching maximum voxels (a plateau) give one seed,
    their first voxel in scan order, so a component of equal distances gets exactly one."""
    mask = components > 0
    if not mask.any():
        return np.empty((0, 3), dtype=np.intp)
    key = _order_key(distance, sampling)
    peak = mask & (key >= path_maximum(key, mask, seed_radius(min_dist, sampling)))
    piece = cc3d.connected_components(peak, connectivity=6)[peak]  # face pieces lie within one component
    return seeds_from_peaks(np.argwhere(peak), piece, distance[peak], components[peak], min_dist=min_dist, sampling=sampling)


def seeds_from_peaks(
    points: NDArray[np.integer], piece: NDArray[np.integer], strength: NDArray[np.floating], component: NDArray[np.integer],
    /, *, min_dist: int, sampling: Sequence[float] | None,
) -> NDArray[np.intp]:
    """The seeds of :func:`find_seeds` from its peak voxels: ``points`` ``(n, 3)`` in scan order, with the
    number of the face-connected piece each lies in, its distance and its interior component (what a device
    hands back instead of volumes)."""
    _, first = np.unique(piece, return_index=True)
    order = np.lexsort((first, -strength[first]))  # pieces strongest first, ties in scan order
    heads = np.asarray(points, dtype=np.intp)[first[order]]
    scale = np.asarray(sampling or (1.0, 1.0, 1.0), dtype=np.float64)
    keep = _thin(heads, component[first[order]], float(min_dist), scale) if min_dist > 1 else np.ones(len(heads), bool)
    return heads[keep]
