"""Seeded synthetic 3D microscopy volumes with exact ground truth, for tests and benchmarks.

Two kinds of volume, both ZYX and reproducible from an integer seed:

- ``membrane``: space-filling cells like a plant meristem imaged with a membrane stain. Cells are the
  Voronoi cells of a jittered lattice of seeds, some seeds dropped (larger cells) and some split in two
  (small, recently divided pairs), so sizes vary. The image shows thin bright membranes at the cell
  borders over a dim cytoplasm. As in a plant cell wall, which carries one plasma membrane per cell,
  every interface is drawn on both sides: each cell's own outermost voxel layer (its voxels with a face
  neighbour in another cell) is membrane, with that cell's membrane brightness, so a wall is a ridge two
  voxels wide (before the blur) centred on the true interface.
- ``nuclei``: separate, randomly oriented ellipsoids on a dark background.

Both images go through the same acquisition model: anisotropic gaussian blur (z wider than y and x),
a smooth low-frequency illumination field with depth attenuation along z, Poisson shot noise, gaussian
read noise, an offset and a gain, then rounding to ``uint8`` or ``uint16``.

Label convention: ``labels`` is ``uint32`` with cells numbered ``1..n`` consecutively. For ``membrane``
volumes every voxel belongs to a cell (there is no 0): membranes are visible only in the image, and
each membrane voxel carries the label of its own cell (the two layers of a wall belong to the two cells
it separates, so the interface between labels runs down the middle of the bright ridge). For ``nuclei``
volumes 0 is background. Cells cut by the volume border keep whatever part lies inside.

Example::

    vol = make_membrane_volume((32, 64, 64), seed=1)
    vol.image.dtype, vol.labels.max()   # uint16, number of cells
"""

from __future__ import annotations

import math
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import tifffile
from numpy.typing import DTypeLike, NDArray
from scipy import ndimage as ndi
from skimage.measure import label as label_components

from engine.errors import InputError

__all__ = [
    "SyntheticVolume",
    "boundary_mask",
    "boundary_probability",
    "make_membrane_volume",
    "make_nuclei_volume",
    "write_sample",
    "KINDS",
    "DTYPES",
]

KINDS: tuple[str, ...] = ("membrane", "nuclei")
DTYPES: tuple[str, ...] = ("uint8", "uint16")
_MIN_EDGE = 8
_MIN_DIAMETER = 4.0  # voxels, after voxel_scale
_P_DROP = 0.10  # fraction of lattice seeds removed (their neighbours grow)
_P_SPLIT = 0.15  # fraction of lattice seeds split into two daughter cells
_NUCLEUS_FRACTION = 0.12  # fraction of the volume inside nuclei, before border cuts and rejections
# (offset, gain, read noise sigma in photo-electrons, peak photons) per output dtype
_CAMERA = {"uint8": (4.0, 1.6, 1.5, 100.0), "uint16": (100.0, 16.0, 1.5, 100.0)}


@dataclass(frozen=True, eq=False)
class SyntheticVolume:
    """A synthetic image and its ground truth.

    Attributes:
        image: ZYX, ``uint8`` or ``uint16``, the simulated microscope image.
        labels: ZYX ``uint32``, cells ``1..n`` (see the module docstring for the convention of each kind).
        kind: ``"membrane"`` or ``"nuclei"``.
        seed: the seed that reproduces this volume.
    """

    image: NDArray[np.uint8] | NDArray[np.uint16]
    labels: NDArray[np.uint32]
    kind: Literal["membrane", "nuclei"]
    seed: int


def make_membrane_volume(
    shape: tuple[int, int, int],
    /,
    *,
    seed: int,
    mean_cell_diameter: float = 14.0,
    dtype: Literal["uint8", "uint16"] = "uint16",
    voxel_scale: float = 1.0,
) -> SyntheticVolume:
    """Simulate a membrane-stained stack of space-filling cells.

    Args:
        shape: ``(Z, Y, X)`` in voxels, each at least 8.
        seed: non-negative integer; the same arguments give the same volume.
        mean_cell_diameter: mean equivalent-sphere cell diameter in voxels at ``voxel_scale=1``.
        dtype: ``"uint8"`` or ``"uint16"`` for the image.
        voxel_scale: multiplies the cell diameter and the blur width, as if the same tissue were
            sampled with voxels ``1/voxel_scale`` times the size (1.5 gives larger, fewer cells in
            voxels; 0.75 smaller, more). Each cell's membrane is its outermost voxel layer, so a wall
            is 2 voxels thick before the blur (one layer per cell).

    Returns:
        A ``SyntheticVolume`` whose labels are space-filling (no 0) ``uint32`` cells ``1..n``.

    Raises:
        InputError: a bad shape, seed, dtype, diameter or scale; the message shows the value.
    """
    shape_t = _check_shape(shape)
    rng = np.random.default_rng(_check_seed(seed))
    out_dtype = _check_dtype(dtype)
    diameter = _check_diameter(mean_cell_diameter, voxel_scale, name="mean_cell_diameter")
    labels = _voronoi_labels(shape_t, diameter, rng)
    n = int(labels.max())
    cytoplasm = rng.uniform(0.06, 0.16, n + 1).astype(np.float32)
    brightness = rng.uniform(0.55, 1.0, n + 1).astype(np.float32)
    membrane = boundary_mask(labels)
    signal = cytoplasm[labels]
    signal[membrane] = brightness[labels[membrane]]
    signal *= _smooth_field(shape_t, rng, cells=(4, 6, 6), amplitude=0.25)
    sigma = (1.1 * voxel_scale, 0.55 * voxel_scale, 0.55 * voxel_scale)
    image = _acquire(signal, rng, sigma=sigma, dtype=out_dtype)
    return SyntheticVolume(image=image, labels=labels, kind="membrane", seed=int(seed))


def make_nuclei_volume(
    shape: tuple[int, int, int],
    /,
    *,
    seed: int,
    mean_nucleus_diameter: float = 10.0,
    dtype: Literal["uint8", "uint16"] = "uint16",
    voxel_scale: float = 1.0,
) -> SyntheticVolume:
    """Simulate a nuclear-stained stack: separate bright ellipsoids on a dark background.

    Args:
        shape: ``(Z, Y, X)`` in voxels, each at least 8.
        seed: non-negative integer; the same arguments give the same volume.
        mean_nucleus_diameter: mean nucleus diameter in voxels at ``voxel_scale=1``.
        dtype: ``"uint8"`` or ``"uint16"`` for the image.
        voxel_scale: multiplies the nucleus size and the blur width (see ``make_membrane_volume``).

    Returns:
        A ``SyntheticVolume`` whose labels are 0 for background and ``1..n`` for nuclei; nuclei never
        overlap or touch.

    Raises:
        InputError: a bad shape, seed, dtype, diameter or scale; the message shows the value.
    """
    shape_t = _check_shape(shape)
    rng = np.random.default_rng(_check_seed(seed))
    out_dtype = _check_dtype(dtype)
    diameter = _check_diameter(mean_nucleus_diameter, voxel_scale, name="mean_nucleus_diameter")
    labels = np.zeros(shape_t, dtype=np.uint32)
    brightness = _paint_ellipsoids(labels, diameter, rng)
    signal = brightness[labels]
    signal *= _smooth_field(shape_t, rng, cells=(3, 8, 8), amplitude=0.15)
    signal += np.float32(0.02)
    signal *= _smooth_field(shape_t, rng, cells=(3, 4, 4), amplitude=0.25)
    sigma = (1.4 * voxel_scale, 0.7 * voxel_scale, 0.7 * voxel_scale)
    image = _acquire(signal, rng, sigma=sigma, dtype=out_dtype)
    return SyntheticVolume(image=image, labels=labels, kind="nuclei", seed=int(seed))


def write_sample(
    path: str | os.PathLike[str],
    /,
    *,
    kind: Literal["membrane", "nuclei"] = "membrane",
    shape: tuple[int, int, int] = (64, 128, 128),
    seed: int = 0,
    dtype: Literal["uint8", "uint16"] = "uint16",
) -> tuple[Path, Path]:
    """Write a synthetic image and its labels as ImageJ ZYX TIFFs with a 1 µm voxel size.

    The image goes to ``path`` and the labels to ``<stem>_labels.tif`` beside it. Labels are written as
    ``uint16`` (ImageJ has no ``uint32``), or as ``float32`` (exact up to 2**24) when there are more than
    65535 cells. Each file is written under a temporary name in the same folder and then renamed, so a
    failure leaves neither a partial file nor a temporary one.

    Args:
        path: the image file to write, ending in ``.tif`` or ``.tiff``; its folder must exist.
        kind: ``"membrane"`` or ``"nuclei"``.
        shape: ``(Z, Y, X)`` in voxels.
        seed: non-negative integer seed.
        dtype: ``"uint8"`` or ``"uint16"`` for the image.

    Returns:
        ``(image_path, labels_path)``.

    Raises:
        InputError: a bad kind, path suffix, missing folder or a bad generator argument.
    """
    if kind not in KINDS:
        raise InputError(f"kind must be one of {KINDS}, got {kind!r}")
    image_path = Path(path)
    if image_path.suffix.lower() not in (".tif", ".tiff"):
        raise InputError(f"{image_path}: the file name must end in '.tif' or '.tiff'")
    if not image_path.parent.is_dir():
        raise InputError(f"{image_path}: folder {str(image_path.parent)!r} does not exist; create it first")
    make = make_membrane_volume if kind == "membrane" else make_nuclei_volume
    volume = make(shape, seed=seed, dtype=dtype)
    labels = volume.labels
    labels_out = labels.astype(np.uint16 if labels.max() <= 0xFFFF else np.float32)
    labels_path = image_path.with_name(f"{image_path.stem}_labels.tif")
    _write_tiffs_atomically({image_path: volume.image, labels_path: labels_out})
    return image_path, labels_path


# --- validation -----------------------------------------------------------------------------------


def _check_shape(shape: object) -> tuple[int, int, int]:
    items: tuple[object, ...] = ()
    if isinstance(shape, (tuple, list)) or (isinstance(shape, np.ndarray) and shape.ndim == 1):
        items = tuple(shape)
    ok = len(items) == 3 and all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= _MIN_EDGE for v in items
    )
    if not ok:
        raise InputError(f"shape must be 3 ints (Z, Y, X), each >= {_MIN_EDGE}, got {shape!r}")
    z, y, x = (int(v) for v in items)  # type: ignore[call-overload]
    return (z, y, x)


def _check_seed(seed: object) -> int:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise InputError(f"seed must be a non-negative int, got {seed!r}")
    return int(seed)


def _check_dtype(dtype: DTypeLike) -> str:
    try:
        name = np.dtype(dtype).name
    except TypeError:
        name = None
    if name not in DTYPES:
        raise InputError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    return name


def _check_diameter(diameter: object, scale: object, *, name: str) -> float:
    effective = _positive(diameter, name) * _positive(scale, "voxel_scale")
    if effective < _MIN_DIAMETER:
        raise InputError(f"{name} * voxel_scale must be >= {_MIN_DIAMETER} voxels, got {diameter!r} * {scale!r}")
    return effective


def _positive(value: object, name: str) -> float:
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        if math.isfinite(value) and value > 0:
            return float(value)
    raise InputError(f"{name} must be a finite number > 0, got {value!r}")


# --- membrane cells -------------------------------------------------------------------------------


def _voronoi_labels(shape: tuple[int, int, int], diameter: float, rng: np.random.Generator) -> NDArray[np.uint32]:
    """Nearest-seed labels (exact Euclidean Voronoi via the EDT), renumbered ``1..n`` over ``shape``."""
    # lattice spacing chosen so the mean cell volume equals a sphere of the requested diameter
    spacing = diameter * ((1.0 - _P_DROP + _P_SPLIT) * math.pi / 6.0) ** (1.0 / 3.0)
    pad = int(math.ceil(spacing))
    padded = tuple(s + 2 * pad for s in shape)
    seeds = _lattice_seeds(padded, spacing, rng)
    markers = np.zeros(padded, dtype=np.uint32)
    markers[tuple(seeds.T)] = np.arange(1, len(seeds) + 1, dtype=np.uint32)
    indices = ndi.distance_transform_edt(markers == 0, return_distances=False, return_indices=True)
    inner = tuple(slice(pad, pad + s) for s in shape)
    nearest = markers[tuple(ix[inner] for ix in indices)]
    nearest = _drop_fragments(nearest)
    present = np.bincount(nearest.ravel(), minlength=len(seeds) + 1) > 0
    present[0] = False
    lut = np.cumsum(present).astype(np.uint32)
    return lut[nearest]


def _drop_fragments(labels: NDArray[np.uint32]) -> NDArray[np.uint32]:
    """Give voxels outside the largest 6-connected piece of their cell to a face neighbour, in place.

    A convex cell sampled on the grid can leave a few loose voxels where it is thinner than a voxel.
    """
    pieces = label_components(labels, connectivity=1, background=0)
    piece_label = np.zeros(int(pieces.max()) + 1, dtype=labels.dtype)
    piece_label[pieces.ravel()] = labels.ravel()
    piece_size = np.bincount(pieces.ravel())
    order = np.lexsort((-piece_size, piece_label))  # by label, the largest piece of each label first
    first = np.ones(len(order), dtype=bool)
    first[1:] = piece_label[order[1:]] != piece_label[order[:-1]]
    keep = np.zeros(len(order), dtype=bool)
    keep[order[first]] = True
    loose = ~keep[pieces]
    coords = np.argwhere(loose)
    while len(coords):  # each pass settles at least the loose voxels touching a settled one
        settled = np.zeros(len(coords), dtype=bool)
        for axis in range(3):
            for step in (-1, 1):
                near = coords.copy()
                near[:, axis] += step
                todo = ~settled & (near[:, axis] >= 0) & (near[:, axis] < labels.shape[axis])
                todo[todo] = ~loose[tuple(near[todo].T)]
                here, there = tuple(coords[todo].T), tuple(near[todo].T)
                labels[here] = labels[there]
                loose[here] = False
                settled |= todo
        coords = coords[~settled]
    return labels


def _lattice_seeds(padded: tuple[int, ...], spacing: float, rng: np.random.Generator) -> NDArray[np.intp]:
    """Integer seed positions ``(N, 3)``: a jittered cubic lattice, some seeds dropped, some split."""
    axes = [np.arange(spacing / 2.0, s, spacing) for s in padded]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    grid += rng.uniform(-0.4 * spacing, 0.4 * spacing, grid.shape)
    roll = rng.random(len(grid))
    keep = grid[roll >= _P_DROP + _P_SPLIT]
    parents = grid[roll < _P_SPLIT]
    direction = rng.normal(size=parents.shape)
    direction /= np.linalg.norm(direction, axis=1, keepdims=True) + 1e-12
    offset = 0.22 * spacing * direction
    seeds = np.concatenate([keep, parents + offset, parents - offset])
    seeds = np.rint(seeds).astype(np.intp)
    inside = np.all((seeds >= 0) & (seeds < np.asarray(padded)), axis=1)
    return np.unique(seeds[inside], axis=0)


def boundary_mask(labels: NDArray[np.integer], /) -> NDArray[np.bool_]:
    """Voxels with a face neighbour of another label: both sides of every interface (2 voxels thick)."""
    mask = np.zeros(labels.shape, dtype=bool)
    for axis in range(labels.ndim):
        lo = [slice(None)] * labels.ndim
        hi = [slice(None)] * labels.ndim
        lo[axis] = slice(0, -1)
        hi[axis] = slice(1, None)
        differs = labels[tuple(lo)] != labels[tuple(hi)]
        mask[tuple(lo)] |= differs
        mask[tuple(hi)] |= differs
    return mask


def boundary_probability(labels: NDArray[np.integer], /, *, seed: int) -> NDArray[np.float32]:
    """What a boundary model might say about ``labels``, for labelling tests and benchmarks without a network:
    0.9 on :func:`boundary_mask`, 0.05 inside, Gaussian blur 0.8, noise 0.03, clipped to [0, 1]."""
    p = ndi.gaussian_filter(np.where(boundary_mask(labels), 0.9, 0.05).astype(np.float32), 0.8)
    noise = np.random.default_rng(seed).normal(0.0, 0.03, labels.shape).astype(np.float32)
    return np.clip(p + noise, 0.0, 1.0).astype(np.float32)


# --- nuclei ---------------------------------------------------------------------------------------


def _paint_ellipsoids(labels: NDArray[np.uint32], diameter: float, rng: np.random.Generator) -> NDArray[np.float32]:
    """Draw non-touching random ellipsoids into ``labels`` in place; return brightness per label."""
    # semi-axes are at most 0.6 d, so centres 1.2 d + 2 apart leave >= 2 voxels between nuclei
    target = int(_NUCLEUS_FRACTION * labels.size / (math.pi / 6.0 * diameter**3)) + 1
    centres = _spread_points(labels.shape, target, 1.2 * diameter + 2.0, rng)
    n = 0
    for centre in centres:
        semi = 0.5 * diameter * rng.uniform(0.8, 1.2, 3)
        rotation, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        reach = float(semi.max())
        lo = np.maximum(np.floor(centre - reach).astype(int), 0)
        hi = np.minimum(np.ceil(centre + reach).astype(int) + 1, labels.shape)
        if np.any(hi <= lo):
            continue
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        grid = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij"), axis=-1)
        local = (grid - centre) @ rotation
        inside = np.sum((local / semi) ** 2, axis=-1) <= 1.0
        if not inside.any():
            continue
        n += 1
        labels[box][inside] = n
    brightness = np.zeros(n + 1, dtype=np.float32)
    brightness[1:] = rng.uniform(0.5, 1.0, n)
    return brightness


def _spread_points(
    shape: tuple[int, ...], target: int, min_distance: float, rng: np.random.Generator
) -> NDArray[np.float64]:
    """Up to ``target`` uniform random points ``(N, 3)`` in ``shape``, no two closer than ``min_distance``."""
    candidates = rng.uniform(0.0, 1.0, (4 * target, 3)) * np.asarray(shape, dtype=np.float64)
    accepted = np.empty((target, 3))
    n = 0
    for point in candidates:
        if n and np.min(np.sum((accepted[:n] - point) ** 2, axis=1)) < min_distance**2:
            continue
        accepted[n] = point
        n += 1
        if n == target:
            break
    return accepted[:n]


# --- acquisition ----------------------------------------------------------------------------------


def _smooth_field(
    shape: tuple[int, int, int], rng: np.random.Generator, *, cells: tuple[int, int, int], amplitude: float
) -> NDArray[np.float32]:
    """A positive multiplicative field ``1 + amplitude * noise`` varying over about ``cells`` periods."""
    coarse = rng.uniform(-1.0, 1.0, cells).astype(np.float32)
    zoom = [s / c for s, c in zip(shape, cells)]
    field = ndi.zoom(coarse, zoom, order=1, mode="nearest", grid_mode=True)
    field *= np.float32(amplitude)
    field += np.float32(1.0)
    return field


def _acquire(
    signal: NDArray[np.float32], rng: np.random.Generator, *, sigma: tuple[float, float, float], dtype: str
) -> NDArray[np.uint8] | NDArray[np.uint16]:
    """Blur, attenuate with depth, add shot and read noise and digitize ``signal`` (ZYX float32, ~0..1)."""
    blurred = ndi.gaussian_filter(signal, sigma, mode="reflect")
    depth = np.exp(-np.arange(signal.shape[0], dtype=np.float32) / np.float32(2.5 * signal.shape[0]))
    blurred *= depth[:, None, None]
    peak = float(np.percentile(blurred[::2, ::4, ::4], 99.5))
    offset, gain, read_noise, photons = _CAMERA[dtype]
    blurred *= np.float32(photons / max(peak, 1e-6))
    counts = rng.poisson(blurred).astype(np.float32)
    counts += rng.standard_normal(counts.shape, dtype=np.float32) * np.float32(read_noise)
    counts *= np.float32(gain)
    counts += np.float32(offset)
    info = np.iinfo(dtype)
    np.clip(np.rint(counts, out=counts), info.min, info.max, out=counts)
    return counts.astype(dtype)


def _write_tiffs_atomically(files: dict[Path, np.ndarray]) -> None:
    """Write each ZYX array as an ImageJ TIFF under a temporary name beside its target, then rename all.

    On any failure every temporary file is removed and no target is created or changed.
    """
    pending: dict[Path, Path] = {}
    try:
        for final, data in files.items():
            tmp = final.with_name(f".{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
            pending[final] = tmp
            tifffile.imwrite(
                tmp,
                data,
                imagej=True,
                resolution=(1.0, 1.0),
                metadata={"axes": "ZYX", "spacing": 1.0, "unit": "um"},
            )
        for final, tmp in list(pending.items()):
            os.replace(tmp, final)
            del pending[final]
    finally:
        for tmp in pending.values():
            tmp.unlink(missing_ok=True)
