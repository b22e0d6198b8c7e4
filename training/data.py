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
from numpy.typing import NDArray

from engine.bundle import Normalization
from engine.normalize import normalize
from engine.synthetic import make_membrane_volume

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


@dataclass(frozen=True)
class TrainVolume:
    """A normalized image ``(Z, Y, X)`` float32 and its boundary target ``(Z, Y, X)`` uint8."""

    image: NDArray[np.float32]
    target: NDArray[np.uint8]
    seed: int


def boundary_target(labels: NDArray[np.integer], /) -> NDArray[np.uint8]:
    """1 where a voxel has a 6-neighbour with another label (both sides of every interface), else 0."""
    mask = np.zeros(labels.shape, dtype=bool)
    for axis in range(labels.ndim):
        lo = [slice(None)] * labels.ndim
        hi = [slice(None)] * labels.ndim
        lo[axis] = slice(0, -1)
        hi[axis] = slice(1, None)
        differs = labels[tuple(lo)] != labels[tuple(hi)]
        mask[tuple(lo)] |= differs
        mask[tuple(hi)] |= differs
    return mask.astype(np.uint8)


def make_train_volume(seed: int, settings: DataSettings, /) -> TrainVolume:
    """The training volume for ``seed``: generator settings are drawn from the seed itself."""
    rng = np.random.default_rng([seed, 17])
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
