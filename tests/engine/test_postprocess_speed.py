"""The fast post-processing paths give what the straightforward ones give.

Seeds equal ``skimage.feature.peak_local_max(labels=...)``; the slabbed distance transform equals scipy's
(and falls back when a distance exceeds its halo); threads do not change the labels; the membrane
assignment by steepest descent agrees with the plain seeded flood.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from skimage.feature import peak_local_max
from skimage.segmentation import watershed

from engine import postprocess as pp
from engine.bundle import OutputSpec, PostprocessSpec
from engine.synthetic import make_membrane_volume

BOUNDARY = OutputSpec(kind="boundary", channel=0, names=("b",))


def _membrane_probs(shape: tuple[int, int, int] = (48, 64, 64), seed: int = 3) -> np.ndarray:
    labels = make_membrane_volume(shape, seed=seed, mean_cell_diameter=12.0).labels
    edges = np.zeros(shape, bool)
    for axis in range(3):
        diff = np.diff(labels.astype(np.int64), axis=axis) != 0
        lo = [slice(None)] * 3
        lo[axis] = slice(0, -1)
        edges[tuple(lo)] |= diff
    rng = np.random.default_rng(seed)
    probs = ndimage.gaussian_filter(edges.astype(np.float32), 1.0) * 2.5 + rng.normal(0, 0.02, shape).astype(np.float32)
    return np.clip(probs, 0, 1)[None].astype(np.float32)


@pytest.mark.parametrize("min_dist", [1, 3, 6])
def test_peaks_equal_peak_local_max(min_dist: int) -> None:
    mask = _membrane_probs()[0] < 0.5
    distance = ndimage.distance_transform_edt(mask)
    components, _ = ndimage.label(mask)
    expected = peak_local_max(distance, min_distance=min_dist, labels=components, exclude_border=False)
    got = pp._peaks(distance, components.astype(np.int32), min_dist)
    assert set(map(tuple, got)) == set(map(tuple, expected))


@pytest.mark.parametrize("bound", [2, 8])
def test_bounded_distance_is_scipys_or_none(bound: int) -> None:
    mask = _membrane_probs()[0] < 0.5
    expected = ndimage.distance_transform_edt(mask)
    got = pp._bounded_distance(mask, bound)
    if expected.max() <= bound:
        assert got is not None and np.array_equal(got, expected)
    else:
        assert got is None
    assert np.array_equal(pp._distance(mask, (1.0, 1.0, 1.0), 2), expected)


@pytest.mark.parametrize("sampling", [None, (2.0, 1.0, 1.0)])
def test_slab_distance_is_exact(sampling: tuple[float, float, float] | None) -> None:
    mask = _membrane_probs()[0] < 0.5
    assert np.array_equal(pp._scipy_slab_distance(mask, sampling, 3), ndimage.distance_transform_edt(mask, sampling=sampling))
    assert np.array_equal(pp._slab_distance(mask, sampling, 3), ndimage.distance_transform_edt(mask, sampling=sampling))
    deep = np.ones((80, 24, 24), bool)
    deep[:, 12, 12] = False  # distances beyond the halo: the whole-volume fallback
    assert np.array_equal(pp._scipy_slab_distance(deep, None, 2), ndimage.distance_transform_edt(deep))
    assert np.array_equal(pp._slab_distance(deep, None, 2), ndimage.distance_transform_edt(deep))


def test_threads_do_not_change_labels() -> None:
    probs = _membrane_probs((72, 48, 48))
    spec = PostprocessSpec(method="watershed", threshold=0.5, min_dist=3, label_threshd=5)
    one = pp.label_cells(probs, output=BOUNDARY, spec=spec, threads=1)
    many = pp.label_cells(probs, output=BOUNDARY, spec=spec, threads=3)
    assert one.max() > 20 and np.array_equal(one, many)


def test_matches_full_watershed_on_membranes() -> None:
    probs = _membrane_probs()
    mask = probs[0] < 0.5
    markers, components, _ = pp._seeds(mask, 3, None, 1)
    full = watershed(probs[0], markers)
    fast = pp._flood(probs[0], markers, components, confined=False)
    # Equal but where cells tie; this map is a third exact 1.0 plateau (clipped), a network's is not (99.997%
    # on the default model's 64x256x256 output, see benchmarks/PERFORMANCE.md).
    assert (fast == full).mean() > 0.998


def test_descent_follows_the_slope_and_leaves_plateaus() -> None:
    image = np.array([[[0.0, 0.5, 0.9, 0.6, 0.0, 0.7, 0.7]]], dtype=np.float32)
    labels = np.array([[[1, 0, 0, 0, 2, 0, 0]]], dtype=np.int32)
    got, reached = pp._descend(image, labels)
    assert np.allclose(reached, [[[0.0, 0.0, 0.5, 0.0, 0.0, 0.0, 0.7]]])  # the level each voxel is reached at
    # the ridge (0.9) goes down its steeper side (0.5, to cell 1); the last voxel sits on a plateau (left to the flood)
    assert got.tolist() == [[[1, 1, 1, 2, 2, 2, 0]]]
    probs = np.concatenate([image, image], axis=1)[None]  # (1, 1, 2, 7): the plateau is flooded from cell 2
    spec = PostprocessSpec(method="watershed", threshold=0.5, min_dist=1, label_threshd=1)
    assert pp.label_cells(probs, output=BOUNDARY, spec=spec)[0].tolist() == [[1, 1, 1, 2, 2, 2, 2]] * 2
