"""Training data for the default boundary model: synthetic membrane volumes, targets and augmentation.

Every volume comes from ``engine.synthetic.make_membrane_volume`` with settings drawn from its own seed
(cell diameter, voxel scale, dtype), so a seed reproduces a training volume exactly. The target is the
cell boundary: every voxel with a 6-neighbour of another cell, i.e. a ridge 2 voxels wide centred on the
true interface, which the seeded watershed splits down the middle. It is exactly the generator's membrane
mask (each cell's outermost voxel layer is drawn bright, one membrane per cell on both sides of a wall),
so the target ridge lies on the image ridge, and flips and rotations map a volume to an equally valid
one. Intensities are normalized as the engine does (whole-volume percentiles, ``engine.normalize``), then
crops are flipped, rotated in xy and given random contrast, gamma and noise.

Seed ranges (kept apart so nothing held out is ever trained on):

- training volumes: ``TRAIN_SEED_BASE + i`` (1_000_000 and up);
- post-processing validation: ``VALIDATION_SEEDS``;
- evaluation (``training/evaluate.py``): ``EVAL_SEEDS`` and ``EVAL_SCALE_SEEDS``;
- the unit test ``tests/engine/test_default_model.py``: 4242.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray

from engine.bundle import Normalization
from engine.normalize import normalize
from engine.scale import SCALE_TOLERANCE, resample
from engine.synthetic import boundary_mask, make_membrane_volume
from engine.tissue import TissueSettings, make_tissue_volume

__all__ = [
    "TRAIN_SEED_BASE",
    "VALIDATION_SEEDS",
    "EVAL_SEEDS",
    "EVAL_SCALE_SEEDS",
    "DataSettings",
    "TrainVolume",
    "boundary_target",
    "make_train_volume",
    "sample_crop",
]

TRAIN_SEED_BASE = 1_000_000
VALIDATION_SEEDS = (500, 501, 502)
EVAL_SEEDS = (700, 701, 702)
EVAL_SCALE_SEEDS = (710, 711)
NORMALIZATION = Normalization(kind="percentile", low=1.0, high=99.8)
MODEL_DIAMETER = (9.0, 24.0)  # the shipped bundle's cell_diameter_voxels: the range the engine zooms cells into


@dataclass(frozen=True)
class DataSettings:
    """Ranges the training volumes and augmentations are drawn from (recorded in bundle.json)."""

    volume_shape: tuple[int, int, int] = (48, 128, 128)
    crop_shape: tuple[int, int, int] = (32, 64, 64)
    diameter: tuple[float, float] = (11.0, 17.0)
    voxel_scale: tuple[float, float] = (0.7, 1.6)
    p_uint8: float = 0.3
    gain: tuple[float, float] = (0.7, 1.3)
    offset: tuple[float, float] = (-0.15, 0.15)
    gamma: tuple[float, float] = (0.6, 1.6)
    noise_sigma: tuple[float, float] = (0.0, 0.08)
    p_tissue: float = 0.0
    tissue_diameter: tuple[float, float] = (8.0, 24.0)
    tissue_size_spread: tuple[float, float] = (0.0, 0.4)
    tissue_warp: tuple[float, float] = (0.0, 0.35)
    tissue_patchiness: tuple[float, float] = (0.0, 0.8)
    tissue_photons: tuple[float, float] = (10.0, 500.0)
    tissue_z_steps: tuple[int, ...] = (1, 1, 2, 3, 4)
    p_dome: float = 0.3
    p_engine_zoom: float = 0.0
    p_empty: float = 0.0


@dataclass(frozen=True)
class TrainVolume:
    """A normalized image ``(Z, Y, X)`` float32 and its boundary target ``(Z, Y, X)`` uint8."""

    image: NDArray[np.float32]
    target: NDArray[np.uint8]
    seed: int


def boundary_target(labels: NDArray[np.integer], /) -> NDArray[np.uint8]:
    """1 where a voxel has a 6-neighbour with another label (both sides of every interface), else 0."""
    return boundary_mask(labels).astype(np.uint8)


def _engine_zoom(diameter: float, model_range: tuple[float, float]) -> float:
    """The zoom that brings cells ``diameter`` voxels across into the model's diameter range; 1 when that is
    within the engine's tolerance (``engine.scale``: such stacks run as they are)."""
    zoom = min(model_range[1], max(model_range[0], diameter)) / diameter
    return 1.0 if abs(zoom - 1.0) <= SCALE_TOLERANCE else zoom


def _tissue_volume(seed: int, settings: DataSettings, rng: np.random.Generator) -> TrainVolume:
    """A volume of ``engine.tissue`` with every factor drawn wide, as the engine shows it to the model: a
    z-stepped stack is resampled to an isotropic grid (:func:`engine.scale.resample`, as at run time), and
    with odds ``p_engine_zoom`` a volume whose drawn diameter lies outside the model's range is zoomed into
    it (small cells grown: interpolated membranes and noise, what a zoomed run shows the network). The
    engine zooms by the diameter it measures (mean chord plus wall), which reads larger than the drawn one
    for small cells (10.6 voxels on the 7-voxel stress row's truth), so it zooms fewer stacks than this:
    here it is a scale augmentation as much as a copy of the run. Outside the tissue (dome background) the
    target is 1, so the model marks it as not-cell."""
    z_step = int(rng.choice(settings.tissue_z_steps))
    tissue = TissueSettings(
        cell_diameter=float(rng.uniform(*settings.tissue_diameter)), size_spread=float(rng.uniform(*settings.tissue_size_spread)),
        warp=float(rng.uniform(*settings.tissue_warp)), z_step=z_step, membrane=str(rng.choice(["thin", "double", "double", "thick"])),  # type: ignore[arg-type]
        patchiness=float(rng.uniform(*settings.tissue_patchiness)), dome=bool(rng.random() < settings.p_dome),
        photons=float(np.exp(rng.uniform(np.log(settings.tissue_photons[0]), np.log(settings.tissue_photons[1])))),
    )
    zoom = 1.0
    if settings.p_engine_zoom > 0 and rng.random() < settings.p_engine_zoom:
        zoom = _engine_zoom(tissue.cell_diameter, MODEL_DIAMETER)
    shape = settings.volume_shape
    if zoom == 1.0:  # the volumes drawn before the option existed, unchanged
        drawn = (max(8, -(-shape[0] // z_step)), shape[1], shape[2])
    else:
        drawn = (max(8, round(shape[0] / (z_step * zoom))), max(16, round(shape[1] / zoom)), max(16, round(shape[2] / zoom)))
    vol = make_tissue_volume(drawn, seed=seed, settings=tissue)
    image = normalize(vol.image[np.newaxis].astype(np.float32), NORMALIZATION)
    grown = resample(torch.from_numpy(image)[None], shape)[0, 0].numpy()
    labels = torch.from_numpy(vol.labels.astype(np.int64))[None, None].float()
    labels_up = F.interpolate(labels, size=shape, mode="nearest")[0, 0].numpy().astype(np.uint32)
    target = boundary_target(labels_up)
    target[labels_up == 0] = 1
    return TrainVolume(image=np.ascontiguousarray(grown, dtype=np.float32), target=target, seed=seed)


def _empty_volume(seed: int, settings: DataSettings, rng: np.random.Generator) -> TrainVolume:
    """A field with no tissue: camera noise (read noise, offset) on a dim haze of 0.5-20 photons that varies
    slowly across the field, normalized as the engine normalizes a stack, whose percentiles stretch the noise
    over the whole range; the target is 1 (not cell) everywhere. The network normalizes its features per
    patch, and fields like this came out as cells: a 64x256x256 stack of camera noise gave 51,321 of them."""
    shape = settings.volume_shape
    ramps = np.meshgrid(*(np.linspace(-0.5, 0.5, n, dtype=np.float32) for n in shape), indexing="ij", sparse=True)
    haze = float(np.exp(rng.uniform(np.log(0.5), np.log(20.0))))
    level = haze * (1.0 + sum(np.float32(rng.uniform(-0.8, 0.8)) * ramp for ramp in ramps))
    counts = rng.poisson(np.clip(level, 0.0, None)) + rng.normal(0.0, rng.uniform(1.0, 4.0), shape)
    raw = np.clip(counts + rng.uniform(0.0, 200.0), 0, 65535).astype(np.uint16)
    image = normalize(raw[np.newaxis].astype(np.float32), NORMALIZATION)[0]
    return TrainVolume(image=np.ascontiguousarray(image, dtype=np.float32), target=np.ones(shape, np.uint8), seed=seed)


def make_train_volume(seed: int, settings: DataSettings, /) -> TrainVolume:
    """The training volume for ``seed``: generator and settings are drawn from the seed itself (the odds of
    an empty field are drawn only when ``p_empty`` > 0, so the volumes drawn before that option are unchanged)."""
    rng = np.random.default_rng([seed, 17])
    if settings.p_empty > 0 and rng.random() < settings.p_empty:
        return _empty_volume(seed, settings, rng)
    if settings.p_tissue > 0 and rng.random() < settings.p_tissue:
        return _tissue_volume(seed, settings, rng)
    diameter = float(rng.uniform(*settings.diameter))
    scale = float(np.exp(rng.uniform(np.log(settings.voxel_scale[0]), np.log(settings.voxel_scale[1]))))
    dtype = "uint8" if rng.random() < settings.p_uint8 else "uint16"
    vol = make_membrane_volume(settings.volume_shape, seed=seed, mean_cell_diameter=diameter, dtype=dtype, voxel_scale=scale)
    image = normalize(vol.image[np.newaxis], NORMALIZATION)[0]
    return TrainVolume(image=image, target=boundary_target(vol.labels), seed=seed)


def sample_crop(
    volume: TrainVolume, rng: np.random.Generator, settings: DataSettings, /
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """A random augmented crop: image and target, both ``(Z, Y, X)`` float32 of ``settings.crop_shape``."""
    corner = [int(rng.integers(0, s - c + 1)) for s, c in zip(volume.image.shape, settings.crop_shape)]
    box = tuple(slice(a, a + c) for a, c in zip(corner, settings.crop_shape))
    image, target = volume.image[box], volume.target[box]
    k = int(rng.integers(0, 4))
    image, target = np.rot90(image, k, axes=(1, 2)), np.rot90(target, k, axes=(1, 2))
    for axis in (0, 1, 2):
        if rng.random() < 0.5:
            image, target = np.flip(image, axis), np.flip(target, axis)
    image = np.ascontiguousarray(image, dtype=np.float32)
    if rng.random() < 0.7:
        gamma = float(np.exp(rng.uniform(np.log(settings.gamma[0]), np.log(settings.gamma[1]))))
        positive = image > 0
        image[positive] = image[positive] ** gamma
    image = image * np.float32(rng.uniform(*settings.gain)) + np.float32(rng.uniform(*settings.offset))
    if rng.random() < 0.5:
        sigma = float(rng.uniform(*settings.noise_sigma))
        image += rng.standard_normal(image.shape, dtype=np.float32) * np.float32(sigma)
    return image.astype(np.float32, copy=False), np.ascontiguousarray(target, dtype=np.float32)
