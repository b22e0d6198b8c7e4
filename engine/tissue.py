"""A second, structurally different tissue simulator, for stress tests (not for training).

:mod:`engine.synthetic` builds convex Voronoi cells of a jittered lattice. This one builds curved,
non-convex cells of mixed sizes: an additively weighted Voronoi diagram (power-like: nearest seed by
``distance - weight``) computed in smoothly warped coordinates, so walls bend and cells interlock. On top
it varies what a microscope and a tissue change: the z step (the tissue is simulated on an isotropic grid,
blurred by an anisotropic PSF, then sampled every ``z_step`` planes), membrane thickness (1 voxel, one
side of each wall, up to 2 or 4), patchy staining, the photon budget, depth attenuation and a lateral
gradient, and a meristem-like dome with dark background around it.

Labels follow :mod:`engine.synthetic`: ``uint32``, cells ``1..n``, 0 only outside the tissue (the dome's
background); each membrane voxel belongs to the cell it is drawn in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage as ndi
from scipy.spatial import cKDTree
from skimage.measure import label as label_components
from skimage.segmentation import relabel_sequential

from .errors import InputError

__all__ = ["TissueSettings", "TissueVolume", "make_tissue_volume"]


@dataclass(frozen=True)
class TissueSettings:
    """What varies (defaults: a plain isotropic tissue of 12-voxel cells, 2-voxel walls, 100 photons).

    Attributes:
        cell_diameter: mean cell diameter in xy voxels.
        size_spread: relative spread of the cells' sizes (0: all alike).
        warp: wall bending, as a fraction of the cell diameter.
        z_step: the z step in xy pixels (cells are ``cell_diameter / z_step`` planes deep).
        membrane: ``thin`` (1 voxel, one side of each wall), ``double`` (2, one per cell) or ``thick`` (4).
        patchiness: 0..1, how uneven the membrane staining is.
        photons: photons at the brightest signal.
        dome: tissue inside a dome with dark background around it, instead of filling the volume.
    """

    cell_diameter: float = 12.0
    size_spread: float = 0.25
    warp: float = 0.25
    z_step: int = 1
    membrane: Literal["thin", "double", "thick"] = "double"
    patchiness: float = 0.4
    photons: float = 100.0
    dome: bool = False


@dataclass(frozen=True, eq=False)
class TissueVolume:
    """``image`` ZYX uint16 and ``labels`` ZYX uint32 on the sampled (z-stepped) grid."""

    image: NDArray[np.uint16]
    labels: NDArray[np.uint32]
    settings: TissueSettings
    seed: int


def _smooth_noise(shape: tuple[int, ...], rng: np.random.Generator, period: float) -> NDArray[np.float32]:
    """Zero-mean noise of unit std varying over about ``period`` voxels."""
    coarse = tuple(max(2, math.ceil(s / period) + 1) for s in shape)
    field = ndi.zoom(rng.standard_normal(coarse).astype(np.float32), [s / c for s, c in zip(shape, coarse)], order=3,
                     mode="nearest", grid_mode=True)
    field -= field.mean()
    return field / max(float(field.std()), 1e-6)


def _cells(shape: tuple[int, int, int], s: TissueSettings, rng: np.random.Generator) -> NDArray[np.uint32]:
    """Weighted Voronoi labels in warped coordinates, ``1..n`` (uint32), on the isotropic grid."""
    d = s.cell_diameter
    spacing = d * (math.pi / 6.0) ** (1.0 / 3.0)
    axes = [np.arange(-spacing, n + spacing, spacing) for n in shape]
    seeds = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    seeds += rng.uniform(-0.45 * spacing, 0.45 * spacing, seeds.shape)
    weight = rng.normal(0.0, s.size_spread * spacing / 2.0, len(seeds))
    grid = np.indices(shape, dtype=np.float32).reshape(3, -1).T
    for axis in range(3):
        grid[:, axis] += s.warp * d * _smooth_noise(shape, rng, period=2.5 * d).ravel()
    dist, idx = cKDTree(seeds).query(grid, k=6, workers=-1)
    best = np.argmin(dist - weight[idx], axis=1)
    nearest = idx[np.arange(len(idx)), best].reshape(shape)
    present = np.unique(nearest)
    lut = np.zeros(len(seeds), dtype=np.uint32)
    lut[present] = np.arange(1, len(present) + 1, dtype=np.uint32)
    return _merge_fragments(lut[nearest])


def _merge_fragments(labels: NDArray[np.uint32]) -> NDArray[np.uint32]:
    """Warping and cropping leave loose bits of a cell apart from its main piece (down to single voxels); each
    such voxel goes to the nearest voxel that is in its own cell's largest piece (or the background)."""
    pieces = label_components(labels, connectivity=1, background=0)
    piece_label = np.zeros(int(pieces.max()) + 1, dtype=labels.dtype)
    piece_label[pieces.ravel()] = labels.ravel()
    size = np.bincount(pieces.ravel())
    order = np.lexsort((-size, piece_label))  # by label, each label's largest piece first
    first = np.ones(len(order), dtype=bool)
    first[1:] = piece_label[order[1:]] != piece_label[order[:-1]]
    keep = np.zeros(len(order), dtype=bool)
    keep[order[first]] = True
    keep[0] = True  # the background
    loose = ~keep[pieces]
    if loose.any():
        nearest = ndi.distance_transform_edt(loose, return_distances=False, return_indices=True)
        labels = labels[tuple(nearest)]
    out, _, _ = relabel_sequential(labels)
    return out.astype(np.uint32)


def _membranes(labels: NDArray[np.uint32], kind: str) -> NDArray[np.bool_]:
    """Voxels drawn as membrane: one side of each wall (``thin``), both (``double``), or both dilated (``thick``)."""
    mask = np.zeros(labels.shape, dtype=bool)
    for axis in range(3):
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis], hi[axis] = slice(0, -1), slice(1, None)
        differs = labels[tuple(lo)] != labels[tuple(hi)]
        mask[tuple(lo)] |= differs
        if kind != "thin":
            mask[tuple(hi)] |= differs
    if kind == "thick":
        mask = ndi.binary_dilation(mask) & (labels > 0)
    return mask


def _dome(shape: tuple[int, int, int]) -> NDArray[np.bool_]:
    """A half-ellipsoid rising from the last plane, apex near the first, filling ~70% of the width."""
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    cz, cy, cx = shape[0] * 1.05, shape[1] / 2, shape[2] / 2
    r = ((z - cz) / (0.95 * shape[0])) ** 2 + ((y - cy) / (0.36 * shape[1])) ** 2 + ((x - cx) / (0.36 * shape[2])) ** 2
    return r <= 1.0


def make_tissue_volume(shape: tuple[int, int, int], /, *, seed: int, settings: TissueSettings = TissueSettings()) -> TissueVolume:
    """Simulate a membrane-stained stack of ``shape`` (ZYX, on the sampled grid) with its ground truth.

    Raises:
        InputError: a shape side under 8, a z step under 1, a diameter under 4 voxels.
    """
    if len(shape) != 3 or min(shape) < 8 or settings.z_step < 1 or settings.cell_diameter < 4:
        raise InputError(f"tissue: need a 3D shape >= 8, z_step >= 1, diameter >= 4; got {shape}, {settings}")
    rng = np.random.default_rng([seed, 23])
    fine = (shape[0] * settings.z_step, shape[1], shape[2])
    labels = _cells(fine, settings, rng)
    if settings.dome:
        labels[~_dome(fine)] = 0
        labels = _merge_fragments(labels)
    n = int(labels.max())
    signal = rng.uniform(0.04, 0.12, n + 1).astype(np.float32)[labels]
    membrane = _membranes(labels, settings.membrane)
    stain = rng.uniform(0.5, 1.0, n + 1).astype(np.float32)[labels]
    stain *= np.clip(1.0 + settings.patchiness * _smooth_noise(fine, rng, period=0.6 * settings.cell_diameter), 0.05, None)
    signal[membrane] = stain[membrane]
    signal[labels == 0] = 0.01
    sigma_xy = float(rng.uniform(0.5, 0.9))
    blurred = ndi.gaussian_filter(signal, (sigma_xy * float(rng.uniform(1.8, 3.0)), sigma_xy, sigma_xy))
    blurred = blurred[:: settings.z_step]
    blurred *= np.exp(-np.arange(shape[0], dtype=np.float32) / np.float32(rng.uniform(1.5, 4.0) * shape[0]))[:, None, None]
    blurred *= np.linspace(1.0, float(rng.uniform(0.5, 1.0)), shape[2], dtype=np.float32)[None, None, :]
    blurred *= np.float32(settings.photons / max(float(np.percentile(blurred, 99.5)), 1e-6))
    counts = rng.poisson(blurred).astype(np.float32) + rng.normal(0.0, 2.0, blurred.shape).astype(np.float32)
    image = np.clip(np.rint(counts * 8.0 + 100.0), 0, 65535).astype(np.uint16)
    return TissueVolume(image=image, labels=_merge_fragments(labels[:: settings.z_step]), settings=settings, seed=seed)
