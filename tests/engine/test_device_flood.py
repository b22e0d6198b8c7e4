"""The seeded flood as whole-array torch steps (``engine.labels.device_flood``) against the host's flood.

Without ties it gives the host's labels exactly (random maps, and the split of interior components and the
plateau flood of a labelling window); with ties both give every voxel a seed that reaches it at its lowest
flood level, along a path of its own label (checked seed by seed), and differ only in which. Run on the
CPU's torch here; the same ops on CUDA: ``test_labels.py::test_labelling_on_cuda_equals_the_host_labelling``.
"""

from __future__ import annotations

import cc3d
import numpy as np
import pytest
import torch
from slab_helpers import membrane_probs, nuclei_probs

from engine.labels.device import LabelConvergenceError
from engine.labels.device_flood import flood_rest, flood_within, rim_of
from engine.labels.flood import flood_plateaus, rim
from engine.labels.seeded import seeded_watershed
from engine.labels.window import DeviceWindow, HostWindow

CPU = torch.device("cpu")


def _case(rng: np.random.Generator, shape: tuple[int, int, int], levels: int | None, n_seeds: int):  # noqa: ANN202
    """A random smooth map (quantized to ``levels`` values when given: ties), a region of a few blobs with
    holes, and seeds in it."""
    from scipy import ndimage

    image = ndimage.gaussian_filter(rng.random(shape), 1.5)
    image = (image - image.min()) / (image.max() - image.min())
    if levels:
        image = np.round(image * (levels - 1)) / (levels - 1)
    region = ndimage.gaussian_filter(rng.random(shape), 2.0) > 0.47
    seeds = np.zeros(shape, np.int32)
    at = np.argwhere(region)
    for k, i in enumerate(rng.choice(len(at), n_seeds, replace=False), start=1):
        seeds[tuple(at[i])] = k
    return image, seeds, region


def _flood(image: np.ndarray, seeds: np.ndarray, region: np.ndarray) -> np.ndarray:
    return flood_within(torch.from_numpy(image), torch.from_numpy(seeds), torch.from_numpy(region)).numpy()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_without_ties_the_flood_equals_the_host_flood(seed: int) -> None:
    image, seeds, region = _case(np.random.default_rng(seed), (20, 32, 36), None, 40)
    want = seeded_watershed(image, seeds, region)
    got = _flood(image, seeds, region)
    assert (want > 0).sum() > 5000 and got.dtype == np.int32 and np.array_equal(got, want)


def _levels(image: np.ndarray, seeds: np.ndarray, region: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
    """The flood level of each voxel from ``seeds`` (over paths inside ``region``; with ``labels``, only
    along voxels of one label): a plain relaxation, independent of the code under test."""
    level = np.where(seeds > 0, image, np.inf)
    while True:
        before = level.copy()
        for axis in range(3):
            for shift in (1, -1):
                theirs = np.roll(level, shift, axis=axis)
                edge = [slice(None)] * 3
                edge[axis] = 0 if shift == 1 else -1
                theirs[tuple(edge)] = np.inf
                if labels is not None:
                    other = np.roll(labels, shift, axis=axis) != labels
                    theirs[other] = np.inf
                level = np.where(region, np.minimum(level, np.maximum(theirs, image)), level)
        if np.array_equal(level, before):
            return level


@pytest.mark.parametrize("seed", [0, 1])
def test_with_ties_every_voxel_gets_a_seed_of_its_lowest_level_along_its_own_label(seed: int) -> None:
    image, seeds, region = _case(np.random.default_rng(seed), (12, 20, 22), 5, 6)
    lowest = _levels(image, seeds, region)
    results = {"device": _flood(image, seeds, region), "host": seeded_watershed(image, seeds, region)}
    for labels in results.values():
        reached = np.isfinite(lowest)
        assert np.array_equal(labels > 0, reached)
        assert np.array_equal(_levels(image, seeds, region, labels)[reached], lowest[reached])
        for k in range(1, 7):  # each seed's voxels are one piece around it
            assert cc3d.connected_components(labels == k, connectivity=6).max() <= 1
    differ = results["device"] != results["host"]
    assert 0 < differ.sum() < 0.2 * reached.sum()  # ties decided otherwise, and only some


def test_rim_and_plateau_flood_equal_the_host() -> None:
    rng = np.random.default_rng(4)
    mask = rng.random((10, 14, 16)) > 0.7
    assert np.array_equal(rim_of(torch.from_numpy(mask)).numpy(), rim(mask))
    image = rng.random((10, 14, 16)).astype(np.float32)
    descended = np.where(mask, 0, rng.integers(1, 9, mask.shape)).astype(np.int32)
    resolved = np.where(rng.random(mask.shape) > 0.5, descended, 0).astype(np.int32)
    reached = (image - 0.01).astype(np.float32)
    want = flood_plateaus(image, resolved, descended, reached)
    got = flood_rest(*(torch.from_numpy(a) for a in (image, resolved, descended, reached))).numpy()
    assert np.array_equal(got, want) and (want[mask] > 0).all()


@pytest.mark.parametrize(
    "probs, kind, min_dist, differ_at_most",
    [
        (membrane_probs((40, 48, 52), seed=1), "boundary", 3, 0),
        (membrane_probs((40, 48, 52), seed=4), "boundary", 3, 0),
        (membrane_probs((40, 48, 52), seed=1, ties=True), "boundary", 3, 0.002),  # saturated: 147 of 99,840 voxels
        (nuclei_probs((40, 48, 52), seed=2), "foreground", 1, 0.003),  # distances tie everywhere: 205 voxels
    ],
    ids=["membranes", "membranes-2", "saturated", "foreground"],
)
def test_window_with_its_floods_on_the_device(probs: np.ndarray, kind: str, min_dist: int, differ_at_most: float) -> None:
    """A device window whose split of shared components and plateau flood run as torch steps: the host
    window's labels, exactly where nothing ties; the same cells where ties are common."""
    image = probs[0]
    host = HostWindow.compute(image, kind=kind, threshold=0.5, sampling=None, threads=1)
    device = DeviceWindow(image, kind=kind, threshold=0.5, sampling=None, threads=1, device=CPU, floods_on_device=True)
    points = host.peaks(min_dist)
    host.place(points), device.place(points)
    want = host.flood(boundary=kind == "boundary", open_background=True)
    got = device.flood(boundary=kind == "boundary", open_background=True)
    assert want.max() > 20 and np.array_equal(np.unique(got), np.unique(want))
    assert (got != want).sum() <= differ_at_most * got.size


def test_a_flood_that_does_not_settle_in_its_rounds_raises() -> None:
    image, seeds, region = _case(np.random.default_rng(0), (20, 32, 36), None, 3)
    with pytest.raises(LabelConvergenceError, match="did not settle after 2 rounds"):
        flood_within(torch.from_numpy(image), torch.from_numpy(seeds), torch.from_numpy(region), max_rounds=2)
