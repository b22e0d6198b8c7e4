"""Post-processing: components and seeded watershed separate touching cells and drop small objects."""

from __future__ import annotations

import numpy as np

from engine.bundle import OutputSpec, PostprocessSpec
from engine.labels import label_cells

FG = OutputSpec(kind="foreground", channel=0, names=("fg",))


def _balls(centres: list[tuple[int, int, int]], radius: float, shape: tuple[int, int, int] = (30, 40, 60)) -> np.ndarray:
    z, y, x = np.indices(shape)
    mask = np.zeros(shape, bool)
    for c in centres:
        mask |= (z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 <= radius**2
    return mask


def test_components_and_min_size() -> None:
    mask = _balls([(10, 10, 10), (20, 30, 45)], 5)
    mask[2, 2, 2] = True  # a one-voxel speck
    probs = mask[None].astype(np.float32)
    labels = label_cells(probs, output=FG, spec=PostprocessSpec(method="components", threshold=0.5, label_threshd=10))
    assert labels.dtype == np.uint32 and labels.max() == 2
    assert labels[2, 2, 2] == 0
    assert set(np.unique(labels)) == {0, 1, 2}


def test_watershed_splits_touching_cells() -> None:
    mask = _balls([(15, 20, 20), (15, 20, 33)], 8)  # two overlapping balls: one component
    probs = mask[None].astype(np.float32)
    spec = PostprocessSpec(method="watershed", threshold=0.5, min_dist=5, label_threshd=10)
    labels = label_cells(probs, output=FG, spec=spec)
    assert labels.max() == 2
    assert labels[15, 20, 20] != labels[15, 20, 33]
    assert (labels > 0).sum() == mask.sum()
    assert label_cells(probs, output=FG, spec=PostprocessSpec(method="components")).max() == 1


def test_boundary_model_fills_the_tissue() -> None:
    boundary = np.ones((22, 22, 42), np.float32)  # two closed cubic cells sharing the membrane at x = 20..21
    boundary[1:-1, 1:-1, 1:20] = 0.0
    boundary[1:-1, 1:-1, 22:-1] = 0.0
    spec = PostprocessSpec(method="watershed", threshold=0.5, min_dist=4, label_threshd=10)
    labels = label_cells(boundary[None], output=OutputSpec(kind="boundary", channel=0, names=("b",)), spec=spec)
    assert labels.max() == 2 and (labels > 0).all()
    assert labels[10, 10, 5] != labels[10, 10, 35]
