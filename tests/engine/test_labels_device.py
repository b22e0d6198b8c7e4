"""The torch labelling primitives (engine.labels.device) equal the numpy ones they mirror.

Each check runs the numpy function and the torch one on the same input and compares exactly (the face
sums, float64 additions in another order on a GPU, to rtol 1e-12): on a membrane probability map made from
synthetic cells, on random masks of several densities, and on edge cases (empty, full, one voxel, axes of
length 1 and 2, plateaus). The CUDA test repeats them on a GPU where there is one.
"""

from __future__ import annotations

from functools import lru_cache
from itertools import pairwise

import cc3d
import numpy as np
import pytest
import torch
from scipy import ndimage

from engine.labels import distance_transform, find_seeds
from engine.labels.device import (
    MAX_BOUND,
    LabelConvergenceError,
    bounded_distance,
    connected_components,
    descend,
    faces,
    path_maximum,
    peaks,
)
from engine.labels.distance import bounded_distance as np_bounded_distance
from engine.labels.flood import descend as np_descend
from engine.labels.flood import resolve_components
from engine.labels.graph import EdgeTable
from engine.labels.seeds import path_maximum as np_path_maximum
from engine.labels.seeds import seed_radius
from engine.synthetic import boundary_probability, make_membrane_volume

CPU = torch.device("cpu")
SHAPE = (32, 96, 96)
THRESHOLD = 0.8  # interior = 1 - boundary > 0.8, as SlabLabeler._mask for a boundary model


@lru_cache(maxsize=2)
def _membrane(seed: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """A boundary probability map of synthetic cells (float32) and its true labels (uint32)."""
    labels = make_membrane_volume(SHAPE, seed=seed).labels
    return boundary_probability(labels, seed=seed), labels


def _interior(p: np.ndarray) -> np.ndarray:
    return (1.0 - p) > THRESHOLD


def _random_mask(shape: tuple[int, int, int], density: float, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random(shape) < density


def _masks() -> dict[str, np.ndarray]:
    one = np.zeros((7, 8, 9), bool)
    one[3, 4, 5] = True
    cases = {
        "membrane": _interior(_membrane()[0]),
        "empty": np.zeros((8, 9, 10), bool),
        "full": np.ones((8, 9, 10), bool),
        "one voxel": one,
        "1x1x1": np.ones((1, 1, 1), bool),
        "z of 1": _random_mask((1, 30, 31), 0.7, 1),
        "z of 2": _random_mask((2, 17, 19), 0.6, 2),
        "y, x of 1, 2": _random_mask((25, 1, 2), 0.7, 3),
        "y of 2": _random_mask((9, 2, 40), 0.8, 4),
    }
    for density in (0.1, 0.3, 0.6, 0.9, 0.98):
        cases[f"random {density}"] = _random_mask((20, 33, 35), density, int(density * 100))
    return cases


MASKS = _masks()


def _t(a: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).to(device)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.cpu().numpy()


def _distance(mask: np.ndarray) -> np.ndarray:
    return distance_transform(mask, sampling=None, threads=1)


# --- the comparisons, shared by the CPU and CUDA tests ---


def _check_bounded(mask: np.ndarray, bound: int, device: torch.device) -> bool:
    """Same result; True when it was None (the bound was exceeded)."""
    want = np_bounded_distance(mask, bound)
    got = bounded_distance(_t(mask, device), bound=bound)
    assert (want is None) == (got is None)
    if want is None or got is None:
        return True
    assert got.device.type == device.type and got.dtype == torch.float32
    assert np.array_equal(want.view(np.uint32), _np(got).view(np.uint32))  # bit for bit
    return False


def _check_path_maximum(distance: np.ndarray, mask: np.ndarray, radius: tuple[int, int, int], device: torch.device) -> None:
    want = np_path_maximum(distance, mask, radius)
    got = path_maximum(_t(distance, device), _t(mask, device), radius=radius)
    assert got.device.type == device.type and got.dtype == torch.float32
    assert np.array_equal(want.view(np.uint32), _np(got).view(np.uint32))
    want_peaks = mask & (distance >= want)
    got_peaks = peaks(_t(distance, device), _t(mask, device), radius=radius)
    assert got_peaks.dtype == torch.bool and np.array_equal(want_peaks, _np(got_peaks))


def _check_components(mask: np.ndarray, device: torch.device, max_rounds: int | None = None) -> None:
    want = cc3d.connected_components(mask, connectivity=6)
    got = connected_components(_t(mask, device), max_rounds=max_rounds)
    assert got.device.type == device.type and got.dtype == torch.int32
    assert np.array_equal(want, _np(got))  # the same numbers, not only the same partition


def _check_descend(image: np.ndarray, labels: np.ndarray, device: torch.device) -> None:
    want, want_reached = np_descend(image, labels)
    got, got_reached = descend(_t(image, device), _t(labels, device))
    assert got.dtype == torch.int32 and got_reached.dtype == _t(image, CPU).dtype
    assert np.array_equal(want, _np(got))
    assert np.array_equal(want_reached, _np(got_reached))


def _check_faces(core: np.ndarray, boundary: np.ndarray, device: torch.device) -> int:
    """Same table as EdgeTable.add_piece; returns its number of pairs."""
    table = EdgeTable()
    table.add_piece(core, boundary)
    u, v, sums, counts = faces(_t(core, device), _t(boundary, device))
    assert (u.dtype, v.dtype, sums.dtype, counts.dtype) == (torch.int64, torch.int64, torch.float64, torch.int64)
    assert np.array_equal(table.u, _np(u)) and np.array_equal(table.v, _np(v))
    assert np.array_equal(table.counts, _np(counts))
    np.testing.assert_allclose(_np(sums), table.sums, rtol=1e-12, atol=0)
    return len(table)


def _pre_descent(p: np.ndarray, *, min_dist: int = 4) -> np.ndarray:
    """The labels flood() hands to descend: seeded interior components, as SlabLabeler._watershed makes them."""
    mask = _interior(p)
    components = cc3d.connected_components(mask, connectivity=6).astype(np.int32)
    seeds_at = find_seeds(_distance(mask), components, min_dist=min_dist, sampling=None)
    seeds = np.zeros(mask.shape, bool)
    seeds[tuple(seeds_at.T)] = True
    markers = cc3d.connected_components(seeds, connectivity=6).astype(np.int32)
    return resolve_components(p, markers, components)


def _sparse_labels(shape: tuple[int, ...], fraction: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.where(rng.random(shape) < fraction, rng.integers(1, 30, shape), 0).astype(np.int32)


@lru_cache(maxsize=1)
def _id_pieces() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    p, truth = _membrane()
    rng = np.random.default_rng(7)
    small = (9, 10, 11)
    noise = rng.random(small).astype(np.float32)
    big_ids = np.where(rng.random(small) < 0.2, 0, 2**32 - 1 - rng.integers(0, 4, small)).astype(np.uint32)
    return {
        "membrane truth": (truth, p),
        "membrane descended": (np_descend(p, _pre_descent(p))[0], p),
        "random ids with zeros": (rng.integers(0, 5, small).astype(np.int32), noise),
        "ids near 2**32": (big_ids, noise),
        "ids around 2**31": (np.where(rng.random(small) < 0.5, 2**31 - 1, 2**31).astype(np.int64), noise),
        "all zero": (np.zeros(small, np.int32), noise),
        "one id": (np.full(small, 3, np.int32), noise),
        "z of 1": (rng.integers(0, 4, (1, 12, 13)).astype(np.int32), rng.random((1, 12, 13)).astype(np.float32)),
        "1x1x1": (np.ones((1, 1, 1), np.int32), np.ones((1, 1, 1), np.float32)),
    }


# --- CPU ---


@pytest.mark.parametrize("name", list(MASKS))
@pytest.mark.parametrize("bound", [1, 8, 16])
def test_bounded_distance_is_numpys_bit_for_bit(name: str, bound: int) -> None:
    _check_bounded(MASKS[name], bound, CPU)


def test_bounded_distance_none_when_the_bound_is_exceeded() -> None:
    z, y, x = np.mgrid[:30, :30, :30]
    ball = (z - 15) ** 2 + (y - 15) ** 2 + (x - 15) ** 2 < 12**2  # distances up to 12
    assert _check_bounded(ball, 8, CPU)
    assert not _check_bounded(ball, 16, CPU)
    assert not _check_bounded(ball, 12, CPU)  # exactly at the bound: kept
    assert _check_bounded(ball, 11, CPU)
    assert _check_bounded(MASKS["full"], 16, CPU)  # no background at all: every voxel "far"
    assert _check_bounded(MASKS["membrane"], 1, CPU)


def test_bounded_distance_int16_headroom_and_its_limit() -> None:
    """Sums reach far + bound**2 = 32704 in int16 at the largest bound, as numpy's do; beyond it, refused."""
    big = np.ones((3, 3, 120), bool)
    big[:, :, 0] = False
    assert _check_bounded(big, MAX_BOUND, CPU)  # distances up to 119 along x
    slab = np.ones((2, 2, MAX_BOUND + 1), bool)
    slab[:, :, 0] = False
    assert not _check_bounded(slab, MAX_BOUND, CPU)  # distances up to MAX_BOUND: 30000 + 52**2 summed, kept
    with pytest.raises(ValueError, match="bound must be"):
        bounded_distance(torch.ones((2, 2, 2), dtype=torch.bool), bound=MAX_BOUND + 1)


@pytest.mark.parametrize("name", list(MASKS))
def test_path_maximum_and_peaks_are_numpys(name: str) -> None:
    mask = MASKS[name]
    distance = _distance(mask)
    for radius in (seed_radius(8, None), (1, 2, 3), (0, 0, 1), (3, 0, 5)):
        _check_path_maximum(distance, mask, radius, CPU)


def test_path_maximum_on_continuous_values() -> None:
    """Non-integer distances (no ties) and quantized ones (many plateaus) give the same maxima."""
    mask = MASKS["random 0.6"]
    rng = np.random.default_rng(5)
    values = ndimage.gaussian_filter(rng.random(mask.shape), 1.5).astype(np.float32)
    _check_path_maximum(values, mask, (2, 3, 4), CPU)
    _check_path_maximum(np.round(values, 2), mask, (2, 3, 4), CPU)


@pytest.mark.parametrize("name", list(MASKS))
def test_connected_components_are_cc3ds(name: str) -> None:
    _check_components(MASKS[name], CPU)


def _d2xy(order: int, d: int) -> tuple[int, int]:
    """Point ``d`` of the Hilbert curve filling a ``2**order`` square."""
    x = y = 0
    s = 1
    while s < 2**order:
        rx = 1 & (d // 2)
        ry = 1 & (d ^ rx)
        if ry == 0:
            if rx == 1:
                x, y = s - 1 - x, s - 1 - y
            x, y = y, x
        x, y, d, s = x + s * rx, y + s * ry, d // 4, s * 2
    return x, y


def _hilbert_snake(order: int) -> np.ndarray:
    """One 6-connected path of ``2 * 4**order - 1`` voxels that turns every few steps (a Hilbert curve)."""
    points = [_d2xy(order, d) for d in range(4**order)]
    side = 2 ** (order + 1) - 1
    path = np.zeros((side, side), bool)
    for (x0, y0), (x1, y1) in pairwise(points):
        path[2 * y0, 2 * x0] = path[2 * y1, 2 * x1] = path[y0 + y1, x0 + x1] = True
    return path


def _serpentine(rows: int, width: int) -> np.ndarray:
    path = np.zeros((rows, width), bool)
    path[::2] = True
    for i, y in enumerate(range(1, rows, 2)):
        path[y, width - 1 if i % 2 == 0 else 0] = True
    return path


@pytest.mark.parametrize("plane", [0, 1, 2])
def test_connected_components_converge_fast_on_snakes(plane: int) -> None:
    """Paths of 2047 voxels join in a handful of rounds (pointer jumping), and the cap is enforced."""
    for path in (_hilbert_snake(5), _serpentine(63, 63)):
        assert path.sum() == 2047 and ndimage.label(path)[1] == 1
        snake = np.expand_dims(path, plane)
        _check_components(snake, CPU, max_rounds=8)
    with pytest.raises(LabelConvergenceError, match="max_rounds"):
        connected_components(torch.from_numpy(np.expand_dims(_hilbert_snake(5), plane)), max_rounds=1)


def test_descend_on_the_pipelines_labels() -> None:
    p, _ = _membrane()
    resolved = _pre_descent(p)
    assert (resolved == 0).mean() > 0.3  # membranes left to descend
    _check_descend(p, resolved, CPU)
    _check_descend(np.round(p, 1), resolved, CPU)  # plateaus: ties decided by the z, y, x order
    _check_descend(np.round(p, 1).astype(np.float64), resolved, CPU)


@pytest.mark.parametrize("shape", [(20, 33, 35), (1, 30, 31), (2, 17, 19), (25, 1, 2), (1, 1, 1), (3, 2, 40)])
def test_descend_on_random_images(shape: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    noise = rng.random(shape).astype(np.float32)
    for fraction in (0.0, 0.02, 0.3, 1.0):
        labels = _sparse_labels(shape, fraction, seed=int(fraction * 100))
        _check_descend(noise, labels, CPU)
        _check_descend(np.round(noise, 1), labels, CPU)  # ties and plateaus
        _check_descend(rng.integers(0, 4, shape).astype(np.uint8), labels, CPU)  # integer: padded with 255
        _check_descend(rng.integers(-3, 3, shape).astype(np.int16), labels, CPU)


def test_descend_with_infinite_values() -> None:
    """+inf voxels are never lower than anything (numpy pads with +inf); -inf ones are pits."""
    shape = (6, 7, 8)
    rng = np.random.default_rng(11)
    image = rng.random(shape).astype(np.float32)
    image[rng.random(shape) < 0.1] = np.inf
    image[rng.random(shape) < 0.05] = -np.inf
    _check_descend(image, _sparse_labels(shape, 0.1, seed=3), CPU)


@pytest.mark.parametrize("name", list(_id_pieces()))
def test_faces_are_the_edge_tables(name: str) -> None:
    core, boundary = _id_pieces()[name]
    pairs = _check_faces(core, boundary, CPU)
    assert (pairs == 0) == (name in ("all zero", "one id", "1x1x1"))


def test_inputs_are_checked() -> None:
    with pytest.raises(ValueError, match="bool"):
        bounded_distance(torch.ones((2, 2, 2)), bound=2)
    with pytest.raises(ValueError, match=r"\(Z, Y, X\)"):
        connected_components(torch.ones((2, 2), dtype=torch.bool))
    with pytest.raises(ValueError, match="radius"):
        path_maximum(torch.ones((2, 2, 2)), torch.ones((2, 2, 2), dtype=torch.bool), radius=(1, 1))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="one shape"):
        descend(torch.ones((2, 2, 2)), torch.zeros((2, 2, 3), dtype=torch.int32))
    with pytest.raises(ValueError, match="integer"):
        faces(torch.ones((2, 2, 2)), torch.ones((2, 2, 2)))


# --- CUDA ---


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this host")
def test_everything_equals_numpy_on_cuda() -> None:
    cuda = torch.device("cuda")
    for name in ("membrane", "empty", "full", "one voxel", "z of 2", "y, x of 1, 2", "random 0.3", "random 0.9"):
        mask = MASKS[name]
        for bound in (8, 16):
            _check_bounded(mask, bound, cuda)
        _check_path_maximum(_distance(mask), mask, seed_radius(8, None), cuda)
        _check_components(mask, cuda)
    _check_components(_hilbert_snake(5)[None], cuda, max_rounds=8)
    p, _ = _membrane()
    resolved = _pre_descent(p)
    _check_descend(p, resolved, cuda)
    _check_descend(np.round(p, 1), resolved, cuda)
    _check_descend(np.random.default_rng(0).integers(0, 4, (9, 2, 40)).astype(np.uint8), _sparse_labels((9, 2, 40), 0.1, 1), cuda)
    for core, boundary in _id_pieces().values():
        _check_faces(core, boundary, cuda)
