"""Scale: run the network at the cell size and voxel grid it was trained at, whatever the stack's.

A model segments cells within a range of diameters on an isotropic grid (``Bundle.cell_diameter_voxels``,
as :func:`chord_diameters` measures them on the model's own output); real stacks have z steps of 1-4x the xy
pixel and cells from ~6 to ~40 voxels across. Measured on the shipped model: cells of 9-24 voxels on an
isotropic grid segment best as they are (zooming them costs up to 0.08 F1), a 3x z step costs 0.4 F1 unless
z is resampled (training/evaluate.py). :func:`plan_scale` finds
the zoom per axis (model voxels per input voxel) from what is known, in this order:

- the cell diameter option (µm with a voxel size, else xy voxels) and the voxel size (file or option): the
  diameter in input voxels per axis follows directly; the option without a voxel size gives the xy size,
  and the depth follows the z/xy ratio the estimate below finds;
- otherwise the diameter is estimated from the data (:func:`estimate_cell_diameter`): the network runs on
  a central crop (first at the guess, then at the zoom that brings the measured cells to the centre of the model's range,
  until it settles: see ``_refine``), and the mean chord of the cell interiors along each axis gives the diameter per axis
  (for cells of any convex-ish shape the mean chord along a random line is ``4 V / S``, 2/3 of a sphere's
  diameter); a known voxel size fixes the z/xy ratio and only the overall size is estimated.

Where the model's grid is finer (a z step of 2-4x the xy pixel zooms z up), the run reads the input
resampled to it, blends and labels there and samples the results back (:mod:`engine.model_grid`).
Otherwise the engine resamples each patch to the model's grid on the device (:class:`ScaledRun`: linear
where an axis grows, area-averaged where it shrinks), runs the network there and resamples the
probabilities back to the patch's own grid, so tiling, blending and slabs stay on the input grid, and
post-processing gets the input voxel's extent in model voxels as its distance sampling, so its parameters,
in model voxels, stay relative to the cell size. The output shape equals the input's, always.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray

from .bundle import Bundle, PostprocessSpec
from .errors import InputError
from .labels import BACKGROUND_WIDTH, distance_transform, interior_probability
from .streaming import Source, normalize_with
from .tiling import TilingConfig, fit_patch_shape, sliding_window

__all__ = [
    "SCALE_TOLERANCE", "ScalePlan", "ScaledRun", "plan_scale", "chord_diameters", "estimate_cell_diameter",
    "plan_for_source", "resample",
]

SCALE_TOLERANCE = 0.15  # zooms within 15% of 1 run on the input grid as it is
CHORD_TO_DIAMETER = 1.5  # mean chord of a sphere is 2/3 of its diameter (Cauchy: mean chord = 4 V / S)
MIN_CHORDS = 30  # fewer interior chords along an axis than this: no estimate on that axis
ESTIMATE_CROP = (48, 160, 160)  # model voxels of the estimation crop (one network pass on the CPU: ~1-2 s)
ZOOM_RANGE = (1 / 8, 8.0)
MAX_PASSES = 4  # network passes of the cell-size estimate at most

Diameters = tuple[float, float, float]


@dataclass(frozen=True)
class ScalePlan:
    """How the input grid maps to the model's.

    Attributes:
        zoom: ``(z, y, x)`` model voxels per input voxel (2.0 on z: each input plane becomes two).
        cell_diameter_voxels: the cells' diameter in input voxels along ``(z, y, x)``.
        source: how the diameter was found, for the run report (e.g. ``estimated``, ``option``).
        voxel_size_um: the input voxel size used, or None when unknown.
    """

    zoom: tuple[float, float, float]
    cell_diameter_voxels: Diameters
    source: str
    voxel_size_um: tuple[float, float, float] | None = None

    @classmethod
    def unscaled(cls, source: str, voxel_size_um: tuple[float, float, float] | None = None, /) -> ScalePlan:
        """The input grid as it is (cell size unknown), for ``source``'s reason."""
        return cls((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), source, voxel_size_um)

    @property
    def identity(self) -> bool:
        """True when every axis is within :data:`SCALE_TOLERANCE` of the model's scale (no resampling)."""
        return all(abs(z - 1.0) <= SCALE_TOLERANCE for z in self.zoom)

    @property
    def sampling(self) -> tuple[float, float, float] | None:
        """An input voxel's extent in model voxels ``(z, y, x)`` (distance-transform sampling), or None."""
        return None if self.identity else (1 / self.zoom[0], 1 / self.zoom[1], 1 / self.zoom[2])

    def input_patch(self, model_patch: tuple[int, int, int], volume_shape: tuple[int, int, int], /) -> tuple[int, int, int]:
        """The patch on the input grid that covers ``model_patch`` model voxels (at most the volume)."""
        if self.identity:
            return model_patch
        sides = [max(1, min(v, round(p / z))) for p, z, v in zip(model_patch, self.zoom, volume_shape)]
        return (sides[0], sides[1], sides[2])

    def model_shape(self, shape: tuple[int, int, int], /) -> tuple[int, int, int]:
        """``shape`` on the model's grid."""
        if self.identity:
            return shape
        sides = [max(1, round(s * z)) for s, z in zip(shape, self.zoom)]
        return (sides[0], sides[1], sides[2])

    def postprocess(self, spec: PostprocessSpec, /, *, on_model_grid: bool = False) -> PostprocessSpec:
        """``spec`` (in model voxels) for the grid the run labels on.

        On the input grid, with :attr:`sampling`: ``min_dist`` stays in model voxels (the labeller measures it
        with the sampling), ``label_threshd`` and ``merge_min_size`` are counted in input voxels.

        On the model's grid (``on_model_grid``, :mod:`engine.model_grid`): counts stay in model voxels, and the
        interior threshold drops by ``spec.threshold_per_upsampling`` per unit of z zoom beyond 1, to no lower
        than 0.5 (or the threshold, when that is lower). Planes interpolated between input planes carry a
        lower interior probability, so at a 3-4x z step a cell's interior broke at 0.8 into pieces in z that
        each got a seed (the shipped bundle's value: README, "The shipped default model"). Only z: a zoom up
        in y and x (small cells of a given size) was not measured, so it keeps the threshold.
        """
        if on_model_grid:
            up = self.zoom[0] - 1.0
            if up <= 0 or not spec.threshold_per_upsampling:
                return spec
            lowered = spec.threshold - spec.threshold_per_upsampling * up
            return replace(spec, threshold=round(max(min(spec.threshold, 0.5), lowered), 4))
        if self.identity:
            return spec
        per_voxel = self.zoom[0] * self.zoom[1] * self.zoom[2]
        return replace(spec, label_threshd=max(1, round(spec.label_threshd / per_voxel)),
                       merge_min_size=round(spec.merge_min_size / per_voxel))

    def describe(self) -> str:
        """``scale=z2.00,y0.71,x0.71 (cells 7x20x20 vox, estimated)`` for the summary line."""
        zoom = ",".join(f"{a}{z:.2f}" for a, z in zip("zyx", self.zoom))
        cells = "x".join(f"{d:.0f}" for d in self.cell_diameter_voxels)
        known = f"cells {cells} vox, " if any(self.cell_diameter_voxels) else ""
        return f"scale={'none' if self.identity else zoom} ({known}{self.source})"


def _zoom_for(diameter_range: tuple[float, float], diameters: Diameters) -> tuple[float, float, float]:
    """Zoom that makes the cells isotropic, at their own xy size when it lies in ``diameter_range``, else at
    the nearest end of it."""
    lo, hi = ZOOM_RANGE
    xy = math.sqrt(diameters[1] * diameters[2])
    target = min(diameter_range[1], max(diameter_range[0], xy))
    z, y, x = (min(hi, max(lo, target / d)) for d in diameters)
    return (z, y, x)


def plan_scale(
    *,
    diameter_range: tuple[float, float] | None,
    voxel_size_um: tuple[float, float, float] | None,
    cell_diameter: float | None,
    estimate: Callable[[tuple[float, float, float]], Diameters | None],
) -> ScalePlan:
    """Choose the zoom per axis (see the module docstring for the order of the rules).

    Args:
        diameter_range: the cell diameters the model segments as they are, in its voxels
            (``Bundle.cell_diameter_voxels``); None: the bundle does not say, and the input runs as it is.
        voxel_size_um: ``(z, y, x)`` of the input, or None.
        cell_diameter: µm when ``voxel_size_um`` is given, else xy voxels; None: estimate.
        estimate: ``zoom -> (dz, dy, dx)`` cell diameters in input voxels measured with the network run at
            ``zoom``, or None when the crop shows too few cells.

    Raises:
        InputError: a non-positive voxel size or diameter.
    """
    if voxel_size_um is not None and not all(v > 0 and math.isfinite(v) for v in voxel_size_um):
        raise InputError(f"voxel size must be 3 positive numbers (z, y, x) in µm, got {voxel_size_um}")
    if cell_diameter is not None and not (cell_diameter > 0 and math.isfinite(cell_diameter)):
        raise InputError(f"cell diameter must be > 0, got {cell_diameter}")
    if diameter_range is None:
        return ScalePlan.unscaled("bundle has no cell diameter: no rescaling", voxel_size_um)
    ratio = None if voxel_size_um is None else tuple(v / voxel_size_um[2] for v in voxel_size_um)
    if cell_diameter is not None:
        if voxel_size_um is not None:
            diameters: Diameters = tuple(cell_diameter / v for v in voxel_size_um)  # type: ignore[assignment]
            return ScalePlan(_zoom_for(diameter_range, diameters), diameters, "cell diameter option + voxel size", voxel_size_um)
        # the depth from the estimate's z/xy ratio, found as without the option (measured once with z unzoomed,
        # squashed cells read merged in z: a 3x z step as 7 planes for 4.7, and the option scored below none)
        found = _refine(diameter_range, (1.0, 1.0, 1.0), None, estimate)
        dz = None if found is None else cell_diameter * found[0] / math.sqrt(found[1] * found[2])
        diameters = (cell_diameter if dz is None else dz, cell_diameter, cell_diameter)
        return ScalePlan(_zoom_for(diameter_range, diameters), diameters, "cell diameter option, z estimated", voxel_size_um)
    guess: tuple[float, float, float] = (1.0, 1.0, 1.0) if ratio is None else (ratio[0], 1.0, 1.0)
    diameters_or_none = _refine(diameter_range, guess, ratio, estimate)
    if diameters_or_none is None:
        source = "estimate failed (too few cells in the crop): model scale assumed"
        fallback = tuple(math.sqrt(diameter_range[0] * diameter_range[1]) / g for g in guess)
        return ScalePlan(guess, fallback, source, voxel_size_um)  # type: ignore[arg-type]
    source = "estimated, z/xy from the voxel size" if ratio is not None else "estimated"
    return ScalePlan(_zoom_for(diameter_range, diameters_or_none), diameters_or_none, source, voxel_size_um)


def _measure(
    estimate: Callable[[tuple[float, float, float]], Diameters | None], zoom: tuple[float, float, float], ratio: tuple[float, ...] | None
) -> Diameters | None:
    measured = estimate(zoom)
    if measured is None or ratio is None:
        return measured
    # the voxel size fixes the z/xy ratio: one overall size (xy voxels), from all axes
    xy = float(np.exp(np.mean([np.log(d * r) for d, r in zip(measured, ratio)])))
    return (xy / ratio[0], xy / ratio[1], xy / ratio[2])


def _refine(
    diameter_range: tuple[float, float], guess: tuple[float, float, float], ratio: tuple[float, ...] | None,
    estimate: Callable[[tuple[float, float, float]], Diameters | None],
) -> Diameters | None:
    """Measure, zoom so the measured cells would be at the centre of the model's range, measure again,
    until the zoom settles (at most :data:`MAX_PASSES` measurements).

    A network measures cells well only near its own scale: too small, it misses their walls and they look
    larger; too large, it sees walls inside them and they look smaller. Either way the next zoom moves
    toward the true size, so the iteration converges where the measurement is made at the model's scale.
    """
    centre = math.sqrt(diameter_range[0] * diameter_range[1])
    zoom, found = guess, None
    for _ in range(MAX_PASSES):
        measured = _measure(estimate, zoom, ratio)
        if measured is None:
            break
        found = measured
        lo, hi = ZOOM_RANGE
        nxt = tuple(min(hi, max(lo, centre / d)) for d in measured)
        if all(abs(n / z - 1.0) <= SCALE_TOLERANCE for n, z in zip(nxt, zoom)):
            break
        zoom = (nxt[0], nxt[1], nxt[2])
    return found


def resample(batch: torch.Tensor, size: tuple[int, int, int], /) -> torch.Tensor:
    """``(N, C, Z, Y, X)`` -> ``(N, C, *size)``: linear on axes that grow, area-averaged on axes that shrink
    (a thin membrane shrunk by sampling would be missed; averaging keeps its share of each voxel)."""
    shape = tuple(batch.shape[2:])
    if shape == size:
        return batch
    grown = tuple(max(s, t) for s, t in zip(shape, size))
    if grown != shape:
        batch = F.interpolate(batch, size=grown, mode="trilinear", align_corners=False)
    if grown != size:
        batch = F.adaptive_avg_pool3d(batch, size)
    return batch


class ScaledRun:
    """A network ``run`` on the model's grid, called with patches on the input grid.

    Args:
        run: ``(N, C, *model_patch) -> (N, K, *model_patch)`` on the backend's device.
        model_patch: the patch the network sees (multiples of its divisor).
    """

    def __init__(self, run: Callable[[torch.Tensor], torch.Tensor], model_patch: tuple[int, int, int]) -> None:
        self.run, self.model_patch = run, model_patch

    def __call__(self, batch: torch.Tensor, /) -> torch.Tensor:
        size = (int(batch.shape[2]), int(batch.shape[3]), int(batch.shape[4]))
        return resample(self.run(resample(batch, self.model_patch)), size).contiguous()


def _runs(mask: NDArray[np.bool_], background: NDArray[np.bool_], axis: int) -> tuple[NDArray[np.intp], NDArray[np.intp], NDArray[np.intp]]:
    """Lengths of the True runs of ``mask`` along ``axis`` that end inside the array at a False run with no
    ``background`` voxel on both sides, the voxels that are not ``background`` on each one's line (the window
    it was seen through), and the lengths of the False runs between two True runs with no ``background``
    voxel (``(interior, window, membrane)`` when ``mask`` is the interior: a run that ends at background,
    the space around a tissue, is cut short there, so it is no chord)."""
    rows = np.moveaxis(mask, axis, -1).reshape(-1, mask.shape[axis]).astype(np.int8)
    n = rows.shape[1]
    outside = np.pad(np.cumsum(np.moveaxis(background, axis, -1).reshape(rows.shape), axis=1, dtype=np.int32), ((0, 0), (1, 0)))
    edges = np.diff(np.pad(rows, ((0, 0), (1, 1))), axis=1)
    r_start, c_start = np.nonzero(edges == 1)
    r_end, c_end = np.nonzero(edges == -1)
    same_row = r_start[1:] == r_end[:-1]
    before = np.where(np.concatenate([[False], same_row]), np.concatenate([[0], c_end[:-1]]), 0)  # where the gap before starts
    after = np.where(np.concatenate([same_row, [False]]), np.concatenate([c_start[1:], [n]]), n)  # where the gap after ends
    clear_before = outside[r_start, c_start] == outside[r_start, before]
    clear_after = outside[r_end, after] == outside[r_end, c_end]
    inside = (c_start > 0) & (c_end < n) & clear_before & clear_after
    gaps = c_start[1:] - c_end[:-1]
    walls = same_row & (gaps > 0) & clear_before[1:]
    window = n - outside[r_start[inside], n]
    return (c_end - c_start)[inside], window, gaps[walls]


def chord_diameters(interior: NDArray[np.bool_], /) -> Diameters | None:
    """Cell diameter along ``(z, y, x)`` in voxels of ``interior`` (``(Z, Y, X)`` bool, the cells' inside).

    Each axis: the mean interior chord (corrected for the chords the array's or the tissue's edges cut off) plus the median
    wall crossing (a cell's chord runs from wall centre to wall centre), times 1.5 (sphere: mean chord =
    2/3 diameter). Chords that end at background (farther than ``BACKGROUND_WIDTH`` voxels from every
    interior: the space around a tissue) are cut short, so they are left out (on a dome the z estimate was
    27% short with them). None when an axis has under :data:`MIN_CHORDS` complete chords.
    """
    background = distance_transform(~interior, sampling=None, threads=1) > BACKGROUND_WIDTH
    out = []
    for axis in range(3):
        chords, window, walls = _runs(interior, background, axis)
        if len(chords) < MIN_CHORDS:
            return None
        wall = float(np.median(walls)) if len(walls) else 0.0
        # Miles-Lantuejoul: a chord of length L lies wholly inside a window W long with odds (W - L) / W, so
        # long chords are under-counted where the crop (or the tissue in it) is short; weigh each by W / (W - L)
        weight = window / np.maximum(window - chords, 1.0)
        out.append(CHORD_TO_DIAMETER * (float(np.sum(chords * weight) / np.sum(weight)) + wall))
    return (out[0], out[1], out[2])


def estimate_cell_diameter(
    crop: NDArray[np.float32],
    /,
    *,
    zoom: tuple[float, float, float],
    infer: Callable[[torch.Tensor], torch.Tensor],
    interior: Callable[[torch.Tensor], torch.Tensor],
    threshold: float = 0.5,
) -> Diameters | None:
    """Cell diameters ``(dz, dy, dx)`` in the crop's voxels, measured on the network's output at ``zoom``.

    Args:
        crop: ``(C, Z, Y, X)`` normalized input on the host.
        zoom: model voxels per crop voxel, per axis.
        infer: ``(C, Z, Y, X)`` tensor on the model grid -> ``(K, Z, Y, X)`` probabilities (tiled inference).
        interior: ``(K, Z, Y, X)`` probabilities -> ``(Z, Y, X)`` interior probability.
        threshold: interior probability above which a voxel is inside a cell.
    """
    shape = crop.shape[1:]
    size = tuple(max(1, round(s * z)) for s, z in zip(shape, zoom))
    x = resample(torch.from_numpy(np.ascontiguousarray(crop))[None], size)[0]  # type: ignore[arg-type]
    inside = (interior(infer(x)) > threshold).cpu().numpy()
    found = chord_diameters(inside)
    if found is None:
        return None
    d = tuple(f / z for f, z in zip(found, zoom))
    return (d[0], d[1], d[2])


def _estimation_crop(shape: tuple[int, int, int], zoom: tuple[float, float, float], /) -> tuple[slice, slice, slice]:
    """The central box of ``shape`` that is about :data:`ESTIMATE_CROP` model voxels at ``zoom``."""
    box = []
    for s, z, c in zip(shape, zoom, ESTIMATE_CROP):
        n = min(s, max(1, round(c / z)))
        start = (s - n) // 2
        box.append(slice(start, start + n))
    return (box[0], box[1], box[2])


def plan_for_source(
    source: Source,
    stats: list[tuple[float, float]],
    /,
    *,
    bundle: Bundle,
    run: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device,
    voxel_size_um: tuple[float, float, float] | None,
    cell_diameter: float | None,
) -> ScalePlan:
    """:func:`plan_scale` for ``source``, estimating on central crops through the real network.

    Args:
        source: the ``(C, Z, Y, X)`` volume, read by z-slabs.
        stats: its normalization (:func:`engine.normalize.normalization_stats`).
        bundle: the model (its cell diameter range, patch, divisor, output meaning).
        run: the backend's batch function.
        device: where ``run`` computes.
        voxel_size_um, cell_diameter: see :func:`plan_scale`.
    """
    k = len(bundle.output.names)
    shape = (source.shape[1], source.shape[2], source.shape[3])

    def estimate(zoom: tuple[float, float, float]) -> Diameters | None:
        box = _estimation_crop(shape, zoom)
        crop = normalize_with(source.read(box[0].start, box[0].stop)[:, :, box[1], box[2]], stats)
        model_crop = tuple(max(1, round(s * z)) for s, z in zip(crop.shape[1:], zoom))
        patch = fit_patch_shape(model_crop, bundle.patch_shape, bundle.divisor)
        config = TilingConfig(patch_shape=patch, overlap=bundle.overlap, batch_size=1)

        def infer(x: torch.Tensor) -> torch.Tensor:
            return sliding_window(x.numpy(), run, config=config, out_channels=k, device=device)

        def inside(p: torch.Tensor) -> torch.Tensor:
            return interior_probability(p, bundle.output)  # type: ignore[arg-type,return-value]

        return estimate_cell_diameter(crop, zoom=zoom, infer=infer, interior=inside)

    return plan_scale(
        diameter_range=bundle.cell_diameter_voxels, voxel_size_um=voxel_size_um, cell_diameter=cell_diameter, estimate=estimate,
    )
