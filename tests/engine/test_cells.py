"""The per-cell table: exact against a brute-force reference, slab-independent, CSV round trip, errors."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from engine import cells
from engine.cells import CSV_COLUMNS, cell_table, write_cell_table_csv
from engine.errors import InputError


def _blobs(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """Touching random cells with gaps in the id range (so ids are not consecutive)."""
    rng = np.random.default_rng(seed)
    seeds = np.zeros(shape, np.int32)
    points = rng.integers(0, shape, size=(12, 3))
    seeds[tuple(points.T)] = np.arange(1, 13)
    _, nearest = ndimage.distance_transform_edt(seeds == 0, return_indices=True)
    labels = seeds[tuple(nearest)].astype(np.uint32)
    labels[rng.random(shape) < 0.05] = 0  # some background
    labels[labels == 5] = 0  # a missing id
    return labels * 3  # ids 3, 6, 9, ...


def _reference(labels: np.ndarray) -> dict[int, dict]:
    ref: dict[int, dict] = {}
    for i in np.unique(labels[labels > 0]):
        where = np.argwhere(labels == i)
        ref[int(i)] = {"volume": len(where), "centroid": where.mean(axis=0),
                       "bbox": np.concatenate([where.min(axis=0), where.max(axis=0) + 1]), "neighbours": set()}
    for axis in range(3):
        a = np.moveaxis(labels, axis, 0)
        first, second = a[:-1].ravel(), a[1:].ravel()
        keep = (first != second) & (first > 0) & (second > 0)
        for p, q in set(zip(first[keep].tolist(), second[keep].tolist())):
            ref[p]["neighbours"].add(q)
            ref[q]["neighbours"].add(p)
    return ref


@pytest.mark.parametrize("slab_voxels", [1 << 22, 17 * 13, 1])  # one slab, one plane per slab, tiny slabs
def test_matches_brute_force(monkeypatch: pytest.MonkeyPatch, slab_voxels: int) -> None:
    monkeypatch.setattr(cells, "_SLAB_VOXELS", slab_voxels)
    labels = _blobs((9, 17, 13))
    table = cell_table(labels)
    ref = _reference(labels)
    assert table.ids.tolist() == sorted(ref)
    for row, cell in enumerate(table.ids.tolist()):
        assert table.volume_voxels[row] == ref[cell]["volume"]
        np.testing.assert_allclose(table.centroid[row], ref[cell]["centroid"], rtol=0, atol=1e-9)
        assert table.bbox[row].tolist() == ref[cell]["bbox"].tolist()
        assert table.neighbours(row).tolist() == sorted(ref[cell]["neighbours"])
    assert table.volume_um3 is None and table.centroid_um is None


def test_small_hand_made_volume() -> None:
    labels = np.zeros((4, 6, 5), np.uint16)
    labels[1:3, 1:3, 1:3] = 7  # interior cube, 8 voxels
    labels[1:3, 3:5, 1:3] = 2  # touches 7 along y
    labels[0, 0, 4] = 9  # a corner voxel, alone
    table = cell_table(labels, voxel_size_um=(2.0, 0.5, 0.5))
    assert table.ids.tolist() == [2, 7, 9] and len(table) == 3
    assert table.volume_voxels.tolist() == [8, 8, 1]
    assert table.volume_um3.tolist() == [4.0, 4.0, 0.5]
    np.testing.assert_allclose(table.centroid[1], [1.5, 1.5, 1.5])
    np.testing.assert_allclose(table.centroid_um[1], [3.0, 0.75, 0.75])
    assert table.bbox[1].tolist() == [1, 1, 1, 3, 3, 3]
    assert table.touches_border.tolist() == [False, False, True]
    assert [table.neighbours(i).tolist() for i in range(3)] == [[7], [2], []]


def test_empty_volume() -> None:
    table = cell_table(np.zeros((3, 4, 5), np.uint32))
    assert len(table) == 0 and table.bbox.shape == (0, 6) and table.neighbour_offsets.tolist() == [0]


def test_csv(tmp_path: Path) -> None:
    labels = _blobs((6, 11, 10), seed=3)
    table = cell_table(labels, voxel_size_um=(1.0, 0.25, 0.25))
    path = write_cell_table_csv(tmp_path / "cells.csv", table)
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0]) == CSV_COLUMNS and len(rows) == len(table)
    assert [int(r["id"]) for r in rows] == table.ids.tolist()
    assert [int(r["volume_voxels"]) for r in rows] == table.volume_voxels.tolist()
    np.testing.assert_allclose([float(r["volume_um3"]) for r in rows], table.volume_um3, rtol=1e-5)
    assert rows[0]["neighbours"].split() == [str(v) for v in table.neighbours(0)]
    assert int(rows[0]["n_neighbours"]) == len(table.neighbours(0))
    no_voxel = write_cell_table_csv(tmp_path / "plain.csv", cell_table(labels))
    assert next(csv.DictReader(open(no_voxel, newline="")))["volume_um3"] == ""


@pytest.mark.parametrize(("labels", "voxel", "match"), [
    (np.zeros((4, 4), np.uint16), None, "shape"),
    (np.zeros((2, 4, 4), np.float32), None, "integers"),
    (np.full((2, 4, 4), -1, np.int32), None, ">= 0"),
    (np.zeros((2, 4, 4), np.uint16), (1.0, 0.0, 1.0), "voxel_size_um"),
])
def test_errors(labels: np.ndarray, voxel: tuple | None, match: str) -> None:
    with pytest.raises(InputError, match=match):
        cell_table(labels, voxel_size_um=voxel)
