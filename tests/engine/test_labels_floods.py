"""The split of interior components that hold several seeds, run on several threads in groups of whole
components, each in its own box (:func:`engine.labels.flood.flood_pieces`), gives what one flood gives,
ties included, because its flood queues seeds of equal value in raster order (:mod:`engine.labels.seeded`;
skimage leaves that to its heap's shape) and otherwise is skimage's watershed.

The maps are quantized so that ties are everywhere (the order of the queue decides them).
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
from scipy import ndimage
from skimage.segmentation import watershed

from engine.bundle import OutputSpec, PostprocessSpec
from engine.labels import distance_transform, find_seeds, label_cells
from engine.labels.flood import flood_pieces, seat_components
from engine.labels.seeded import seeded_watershed
from engine.synthetic import make_membrane_volume

flood_module = importlib.import_module("engine.labels.flood")
BOUNDARY = OutputSpec(kind="boundary", channel=0, names=("b",))


def _quantized_membranes(shape: tuple[int, int, int], seed: int, *, step: float) -> np.ndarray:
    labels = make_membrane_volume(shape, seed=seed, mean_cell_diameter=10.0).labels
    edges = np.zeros(shape, bool)
    for axis in range(3):
        lo = [slice(None)] * 3
        lo[axis] = slice(0, -1)
        edges[tuple(lo)] |= np.diff(labels.astype(np.int64), axis=axis) != 0
    rng = np.random.default_rng(seed)
    probs = ndimage.gaussian_filter(edges.astype(np.float32), 1.0) * 2.5 + rng.normal(0, 0.05, shape)
    return (np.round(np.clip(probs, 0, 1) / step) * step).astype(np.float32)


def _window(image: np.ndarray, *, threshold: float, min_dist: int) -> tuple[np.ndarray, np.ndarray]:
    """Markers and interior components of ``image`` (a boundary map), as a labelling window makes them."""
    mask = image < threshold
    components = ndimage.label(mask)[0].astype(np.int32)
    seeds = find_seeds(distance_transform(mask, sampling=None, threads=1), components, min_dist=min_dist, sampling=None)
    markers = np.zeros(image.shape, np.int32)
    markers[tuple(seeds.T)] = np.arange(1, len(seeds) + 1)
    return markers, components


def _count_floods(monkeypatch) -> list[tuple[int, ...]]:  # noqa: ANN001
    """The box shape of every flood ``flood_pieces`` runs from now on, with 1000 voxels a thread enough for
    a group of its own (so the small test windows are split)."""
    floods: list[tuple[int, ...]] = []

    def counted(image, markers, mask):  # noqa: ANN001, ANN202
        floods.append(image.shape)
        return seeded_watershed(image, markers, mask)

    monkeypatch.setattr(flood_module, "seeded_watershed", counted)
    monkeypatch.setattr(flood_module, "FLOOD_VOXELS_PER_THREAD", 1000)
    return floods


def test_seeds_of_equal_value_go_in_raster_order() -> None:
    flat = np.zeros((1, 1, 5), np.float32)
    mask = np.ones(flat.shape, bool)
    for first, second in [(1, 2), (2, 1)]:
        markers = np.array([[[first, 0, 0, 0, second]]], np.int32)
        assert seeded_watershed(flat, markers, mask).tolist() == [[[first, first, first, second, second]]]
    # A lower seed goes first wherever it is (2 takes the voxel beside it), and a seed still goes before the
    # other voxels of its value (1 takes its neighbour before 2's neighbour, queued earlier, is taken).
    lower_later = np.array([[[0.5, 0.5, 0.5, 0.5, 0.25]]], np.float32)
    got = seeded_watershed(lower_later, np.array([[[1, 0, 0, 0, 2]]], np.int32), mask)
    assert got.tolist() == [[[1, 1, 2, 2, 2]]]


def test_seeded_watershed_is_skimages_where_no_seeds_tie() -> None:
    rng = np.random.default_rng(6)
    image = ndimage.gaussian_filter(rng.random((32, 40, 40)), 1.5).astype(np.float32)
    markers = np.zeros(image.shape, np.int32)
    markers.reshape(-1)[rng.choice(image.size, 300, replace=False)] = np.arange(1, 301)
    mask = rng.random(image.shape) < 0.9
    values = image[markers > 0]
    assert len(np.unique(values)) == len(values)  # no two seed voxels share a value
    assert np.array_equal(seeded_watershed(image, markers, mask), watershed(image, markers, mask=mask))


@pytest.mark.parametrize("threads, groups", [(2, 2), (3, 3), (16, 2)])
def test_shared_components_split_on_threads_equal_one_flood(monkeypatch, threads: int, groups: int) -> None:
    """Grouped = one flood; at most FLOOD_GROUPS groups whatever the threads (3 allowed in one case)."""
    image = _quantized_membranes((48, 48, 48), 5, step=0.1)
    markers, components = _window(image, threshold=0.7, min_dist=2)
    at = markers > 0
    _, shared = seat_components(markers[at], components[at], int(components.max()))
    inside = shared[components]
    assert np.count_nonzero(shared) > 10
    one = flood_pieces(image, markers, inside, components, threads=threads)  # one flood: the box is small
    floods = _count_floods(monkeypatch)
    monkeypatch.setattr(flood_module, "FLOOD_GROUPS", 3 if groups == 3 else flood_module.FLOOD_GROUPS)
    grouped = flood_pieces(image, markers, inside, components, threads=threads)
    assert len(floods) == groups and np.array_equal(grouped, one)
    assert np.array_equal(one, np.where(inside, seeded_watershed(image, np.where(inside, markers, 0), inside), 0))


def test_a_piece_over_half_the_voxels_leaves_one_group_and_one_flood(monkeypatch) -> None:
    """Two groups asked for, but the component after a small one holds most of the voxels, so the second
    group is empty: one flood, as on one thread (the stress evaluation's windows raised IndexError here)."""
    image = _quantized_membranes((32, 40, 40), 7, step=0.1)
    region = np.zeros(image.shape, bool)
    region[1:3, 2:6, 2:6] = True
    region[8:30, 5:35, 5:35] = True
    pieces = ndimage.label(region)[0].astype(np.int32)
    seeds = np.zeros(image.shape, np.int32)
    seeds[2, 3, 3], seeds[12, 10, 10], seeds[25, 30, 30] = 1, 2, 3
    floods = _count_floods(monkeypatch)
    got = flood_pieces(image, seeds, region, pieces, threads=2)
    assert floods == [image.shape]
    assert np.array_equal(got, np.where(region, seeded_watershed(image, np.where(region, seeds, 0), region), 0))
    assert set(np.unique(got)) == {0, 1, 2, 3}


def test_labels_on_threads_equal_labels_on_one(monkeypatch) -> None:
    """The whole labelling (threaded split, background found beside the flood, faces on threads)."""
    image = _quantized_membranes((40, 48, 48), 4, step=0.05)
    spec = PostprocessSpec(method="watershed", threshold=0.6, min_dist=3, label_threshd=5, merge_threshold=0.5)
    monkeypatch.setattr(flood_module, "FLOOD_VOXELS_PER_THREAD", 1000)
    one = label_cells(image[None], output=BOUNDARY, spec=spec, threads=1)
    many = label_cells(image[None], output=BOUNDARY, spec=spec, threads=3)
    assert one.max() > 20 and np.array_equal(one, many)
