"""The labelling steps give what the straightforward ones give.

Seeds: every interior component gets one, seeds of one component are ``min_dist`` apart, a big neighbour
cannot suppress a small cell's seed (they are not skimage's ``peak_local_max(labels=...)``: on this map
80% of components get the same number of seeds, and the labelling scores higher, see PERFORMANCE.md); the distance
transform equals scipy's (bit for bit on the bounded path, to float32 through ``edt``); threads do not
change the labels; the membrane assignment by steepest descent agrees with the plain seeded flood, on the
CPU or on the backend's device (a GPU that runs out of memory hands the descent back to the CPU).
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage.segmentation import watershed

from engine.bundle import OutputSpec, PostprocessSpec
from engine.labels import distance_transform, find_seeds, flood, label_cells
from engine.labels.distance import bounded_distance
from engine.labels.flood import descend
from engine.synthetic import make_membrane_volume

flood_module = importlib.import_module("engine.labels.flood")  # the module (engine.labels.flood is the function)
window_module = importlib.import_module("engine.labels.window")
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


def _components(mask: np.ndarray) -> np.ndarray:
    return ndimage.label(mask)[0].astype(np.int32)


@pytest.mark.parametrize("min_dist", [1, 3, 6])
def test_seeds_every_cell_spaced_within_a_cell(min_dist: int) -> None:
    mask = _membrane_probs()[0] < 0.5
    components = _components(mask)
    seeds = find_seeds(distance_transform(mask, sampling=None, threads=1), components, min_dist=min_dist, sampling=None)
    owner = components[tuple(seeds.T)]
    assert set(owner.tolist()) == set(range(1, int(components.max()) + 1))  # every component has a seed
    for c in np.unique(owner):
        pts = seeds[owner == c]
        if len(pts) > 1 and min_dist > 1:
            gaps = np.abs(pts[:, None] - pts[None]).max(axis=2)
            assert gaps[np.triu_indices(len(pts), 1)].min() >= min_dist


def test_a_big_neighbour_does_not_suppress_a_small_cells_seed() -> None:
    mask = np.zeros((20, 40, 60), bool)
    mask[2:18, 2:38, 2:40] = True  # a big cell (distance up to 8)
    mask[8:12, 18:22, 42:46] = True  # a small one two voxels away (distance 2)
    components = _components(mask)
    seeds = find_seeds(distance_transform(mask, sampling=None, threads=1), components, min_dist=8, sampling=None)
    assert sorted(set(components[tuple(seeds.T)].tolist())) == [1, 2]


@pytest.mark.parametrize("bound", [2, 8])
def test_distance_is_scipys(bound: int) -> None:
    mask = _membrane_probs()[0] < 0.5
    expected = ndimage.distance_transform_edt(mask).astype(np.float32)
    got = bounded_distance(mask, bound)
    if expected.max() <= bound:
        assert got is not None and np.array_equal(got, expected)
    else:
        assert got is None
    assert np.array_equal(distance_transform(mask, sampling=(1.0, 1.0, 1.0), threads=2), expected)


@pytest.mark.parametrize("sampling", [None, (2.0, 1.0, 1.0)])
def test_distance_far_and_anisotropic_within_float32(sampling: tuple[float, float, float] | None) -> None:
    deep = np.ones((80, 24, 24), bool)
    deep[:, 12, 12] = False  # distances beyond the bounded shifts: seung-lab's edt
    for mask in (_membrane_probs()[0] < 0.5, deep):
        expected = ndimage.distance_transform_edt(mask, sampling=sampling)
        assert np.allclose(distance_transform(mask, sampling=sampling, threads=2), expected, rtol=1e-6, atol=1e-5)


def test_threads_do_not_change_labels() -> None:
    probs = _membrane_probs((72, 48, 48))
    spec = PostprocessSpec(method="watershed", threshold=0.5, min_dist=3, label_threshd=5)
    one = label_cells(probs, output=BOUNDARY, spec=spec, threads=1)
    many = label_cells(probs, output=BOUNDARY, spec=spec, threads=3)
    assert one.max() > 20 and np.array_equal(one, many)


def test_matches_full_watershed_on_membranes() -> None:
    probs = _membrane_probs()
    mask = probs[0] < 0.5
    components = _components(mask)
    seeds = find_seeds(distance_transform(mask, sampling=None, threads=1), components, min_dist=3, sampling=None)
    markers = np.zeros(mask.shape, np.int32)
    markers[tuple(seeds.T)] = np.arange(1, len(seeds) + 1)
    full = watershed(probs[0], markers)
    fast = flood(probs[0], markers, components, confined=False)
    # Equal but where cells tie; this map is a third exact 1.0 plateau (clipped), a network's is not (99.997%
    # on the default model's 64x256x256 output, see benchmarks/PERFORMANCE.md).
    assert (fast == full).mean() > 0.998


@pytest.mark.parametrize("block", [
    (slice(32, 48), slice(0, 64), slice(0, 64)),  # whole planes, the window's top: one side labelled
    (slice(12, 30), slice(0, 64), slice(0, 64)),  # whole planes, halo on both sides
    (slice(32, 48), slice(8, 40), slice(16, 64)),  # an xy tile of the planes
])
def test_plateaus_outside_the_needed_box_are_skipped_and_the_box_is_unchanged(block: tuple[slice, ...]) -> None:
    """A slab window reads only its block: plateaus with no voxel there may stay unlabelled, and the block's
    labels equal those of flooding every plateau (a plateau's flood stays inside it and its rim). Seeds only
    in the upper half, as in a window whose lower halo's cells were seeded below it: its seedless cells
    leave plateaus. Exactly those whose face-connected piece misses the block are skipped."""
    probs = _membrane_probs()
    mask = probs[0] < 0.5
    components = _components(mask)
    seeds = find_seeds(distance_transform(mask, sampling=None, threads=1), components, min_dist=3, sampling=None)
    seeds = seeds[seeds[:, 0] >= 24]
    markers = np.zeros(mask.shape, np.int32)
    markers[tuple(seeds.T)] = np.arange(1, len(seeds) + 1)
    resolved = flood_module.resolve_components(probs[0], markers, components)
    descended, reached = descend(probs[0], resolved)
    every = flood_module.flood_plateaus(probs[0], resolved, descended, reached)
    some = flood_module.flood_plateaus(probs[0], resolved, descended, reached, needed=block)
    assert (some[block] == every[block]).all() and (every > 0).all()
    pieces, n = ndimage.label(descended == 0)  # face connectivity
    missing = np.setdiff1d(np.arange(1, n + 1), pieces[block])
    assert ((some == 0) == np.isin(pieces, missing)).all()
    assert (some == 0).sum() > 100  # 143 voxels for the first block
    assert (flood_module.flood_plateaus(probs[0], resolved, descended, reached, needed=(slice(None),) * 3) == every).all()


def test_descent_follows_the_slope_and_leaves_plateaus() -> None:
    image = np.array([[[0.0, 0.5, 0.9, 0.6, 0.0, 0.7, 0.7]]], dtype=np.float32)
    labels = np.array([[[1, 0, 0, 0, 2, 0, 0]]], dtype=np.int32)
    got, reached = descend(image, labels)
    assert np.allclose(reached, [[[0.0, 0.0, 0.5, 0.0, 0.0, 0.0, 0.7]]])  # the level each voxel is reached at
    # the ridge (0.9) goes down its steeper side (0.5, to cell 1); the last voxel sits on a plateau (left to the flood)
    assert got.tolist() == [[[1, 1, 1, 2, 2, 2, 0]]]
    probs = np.concatenate([image, image], axis=1)[None]  # (1, 1, 2, 7): the plateau is flooded from cell 2
    spec = PostprocessSpec(method="watershed", threshold=0.5, min_dist=1, label_threshd=1)
    assert label_cells(probs, output=BOUNDARY, spec=spec)[0].tolist() == [[1, 1, 1, 2, 2, 2, 2]] * 2


def test_labelling_on_a_device_out_of_memory_equals_the_host_labelling(monkeypatch, caplog) -> None:
    """With a device, each window's array steps and the region graph's faces go there; one that runs out of
    memory (the meta device, made to) hands the window to the host and the faces to the CPU's torch steps:
    the labels equal the host labelling's."""
    probs = _membrane_probs((40, 64, 64))
    spec = PostprocessSpec(method="watershed", threshold=0.5, min_dist=3, label_threshd=5, merge_threshold=0.5)
    want = label_cells(probs, output=BOUNDARY, spec=spec)
    slabs_module = importlib.import_module("engine.labels.slabs")
    device_module = importlib.import_module("engine.labels.device")

    def off_the_cpu_out_of_memory(step):  # noqa: ANN001, ANN202
        def run(*tensors: torch.Tensor, **kwargs):  # noqa: ANN003, ANN202
            if tensors[0].device.type != "cpu":
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")
            return step(*tensors, **kwargs)
        run.__name__ = step.__name__
        return run

    monkeypatch.setattr(device_module, "bounded_distance", off_the_cpu_out_of_memory(device_module.bounded_distance))
    monkeypatch.setattr(slabs_module, "faces", off_the_cpu_out_of_memory(slabs_module.faces))
    got = label_cells(probs, output=BOUNDARY, spec=spec, device=torch.device("meta"))
    assert want.max() > 20 and np.array_equal(got, want)
    assert "labelling it on the host" in caplog.text and "out of memory for faces" in caplog.text


def test_flood_descent_on_a_device_out_of_memory_runs_on_the_cpu(monkeypatch, caplog) -> None:
    """``flood`` with a device whose descent runs out of memory: the CPU's descent, the same labels."""
    probs = _membrane_probs((40, 64, 64))[0]
    mask = probs < 0.5
    components = ndimage.label(mask)[0].astype(np.int32)
    seeds = find_seeds(distance_transform(mask, sampling=None, threads=1), components, min_dist=3, sampling=None)
    markers = np.zeros(mask.shape, np.int32)
    markers[tuple(seeds.T)] = np.arange(1, len(seeds) + 1)
    want = flood(probs, markers, components, confined=False)

    def descend_out_of_memory(image: torch.Tensor, labels: torch.Tensor):  # noqa: ANN202
        if image.device.type != "cpu":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")
        return torch_descend(image, labels)

    torch_descend = flood_module.torch_descend
    descend_out_of_memory.__name__ = "descend"
    monkeypatch.setattr(flood_module, "torch_descend", descend_out_of_memory)
    got = flood(probs, markers, components, confined=False, device=torch.device("meta"))
    assert len(seeds) > 20 and np.array_equal(got, want) and "out of memory for descend" in caplog.text


def _with_device_floods(monkeypatch) -> None:  # noqa: ANN001
    """Device windows on the CPU flood as a GPU's do (``engine.labels.device_flood``; the CPU's default is skimage)."""
    real = window_module.DeviceWindow
    monkeypatch.setattr(window_module, "DeviceWindow", lambda *a, **k: real(*a, **{**k, "floods_on_device": True}))


def test_labelling_with_the_floods_on_the_device_finds_the_host_cells(monkeypatch) -> None:  # noqa: ANN001
    """Planes pushed as tensors, floods as a GPU runs them: as many cells as the host finds; 0.32% of the
    voxels go to another cell (the map ties a lot, clipped at 0 and 1: ties are decided by another rule,
    ``test_device_flood.py``)."""
    probs = _membrane_probs((40, 64, 64))
    spec = PostprocessSpec(method="watershed", threshold=0.5, min_dist=3, label_threshd=5, merge_threshold=0.5)
    want = label_cells(probs, output=BOUNDARY, spec=spec)
    _with_device_floods(monkeypatch)
    got = label_cells(torch.from_numpy(probs), output=BOUNDARY, spec=spec)
    assert want.max() > 20 and got.max() == want.max() and (got != want).mean() < 0.005


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this host")
def test_labelling_on_cuda_equals_the_host_labelling(monkeypatch) -> None:  # noqa: ANN001
    """On CUDA every step but the seed thinning, background clearing and agglomeration runs there: the labels
    of the same torch steps on the CPU, bit for bit."""
    probs = _membrane_probs((40, 64, 64))
    spec = PostprocessSpec(method="watershed", threshold=0.5, min_dist=3, label_threshd=5, merge_threshold=0.5)
    _with_device_floods(monkeypatch)
    want = label_cells(torch.from_numpy(probs), output=BOUNDARY, spec=spec)
    assert np.array_equal(label_cells(probs, output=BOUNDARY, spec=spec, device=torch.device("cuda")), want)
    on_gpu = torch.from_numpy(probs).cuda()  # a GPU run's planes: labelled where they lie
    assert np.array_equal(label_cells(on_gpu, output=BOUNDARY, spec=spec), want)
