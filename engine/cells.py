"""A per-cell table from a label volume: size, centroid, bounding box and neighbours of every cell.

``cell_table(labels)`` measures every nonzero label of a ``(Z, Y, X)`` volume with NumPy/SciPy reductions
(``bincount`` over z-slabs, ``ndimage.find_objects``), so memory stays bounded by a slab, not the volume,
and there is no per-voxel Python loop. ``write_cell_table_csv`` writes it as one CSV row per cell.

Quick use::

    from engine.cells import cell_table, write_cell_table_csv
    table = cell_table(result.labels, voxel_size_um=(2.0, 0.5, 0.5))
    write_cell_table_csv("cells.csv", table)
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from .errors import InputError
from .io import atomic_write

__all__ = ["CellTable", "CSV_COLUMNS", "cell_table", "write_cell_table_csv"]

_SLAB_VOXELS = 1 << 22  # about 4 M voxels per slab: a few tens of MB of temporaries

CSV_COLUMNS = (
    "id", "volume_voxels", "volume_um3",
    "centroid_z", "centroid_y", "centroid_x", "centroid_z_um", "centroid_y_um", "centroid_x_um",
    "bbox_z0", "bbox_y0", "bbox_x0", "bbox_z1", "bbox_y1", "bbox_x1",
    "touches_border", "n_neighbours", "neighbours",
)


@dataclass(frozen=True)
class CellTable:
    """Measurements of ``n`` cells, row ``i`` describing cell ``ids[i]``.

    Attributes:
        ids: ``(n,)`` int64 label ids, ascending.
        volume_voxels: ``(n,)`` int64 voxel counts.
        centroid: ``(n, 3)`` float64 ``(z, y, x)`` centroids in voxel coordinates.
        bbox: ``(n, 6)`` int64 ``(z0, y0, x0, z1, y1, x1)``, end exclusive (``labels[z0:z1, y0:y1, x0:x1]``).
        touches_border: ``(n,)`` bool, True when the cell reaches a face of the volume.
        neighbour_offsets: ``(n + 1,)`` int64; the neighbours of row ``i`` are
            ``neighbour_ids[neighbour_offsets[i]:neighbour_offsets[i + 1]]`` (face-adjacent cells, ascending).
        neighbour_ids: int64 label ids.
        shape: the label volume's ``(Z, Y, X)``.
        voxel_size_um: ``(z, y, x)`` in micrometres, or None when unknown.
    """

    ids: NDArray[np.int64]
    volume_voxels: NDArray[np.int64]
    centroid: NDArray[np.float64]
    bbox: NDArray[np.int64]
    touches_border: NDArray[np.bool_]
    neighbour_offsets: NDArray[np.int64]
    neighbour_ids: NDArray[np.int64]
    shape: tuple[int, int, int]
    voxel_size_um: tuple[float, float, float] | None = None

    def __len__(self) -> int:
        return int(self.ids.size)

    @property
    def volume_um3(self) -> NDArray[np.float64] | None:
        """``(n,)`` volumes in cubic micrometres, or None without a voxel size."""
        if self.voxel_size_um is None:
            return None
        return self.volume_voxels * np.float64(np.prod(self.voxel_size_um))

    @property
    def centroid_um(self) -> NDArray[np.float64] | None:
        """``(n, 3)`` ``(z, y, x)`` centroids in micrometres, or None without a voxel size."""
        if self.voxel_size_um is None:
            return None
        return self.centroid * np.asarray(self.voxel_size_um, dtype=np.float64)

    def neighbours(self, row: int, /) -> NDArray[np.int64]:
        """Ids of the cells touching the cell in row ``row``."""
        return self.neighbour_ids[self.neighbour_offsets[row] : self.neighbour_offsets[row + 1]]


def _check_labels(labels: np.ndarray, voxel_size_um: tuple[float, float, float] | None) -> None:
    if labels.ndim != 3:
        raise InputError(f"labels must be a (Z, Y, X) volume, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"labels must be integers, got dtype {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise InputError(f"labels must be >= 0, got a minimum of {labels.min()}")
    if voxel_size_um is not None and (len(voxel_size_um) != 3 or min(voxel_size_um) <= 0):
        raise InputError(f"voxel_size_um must be 3 positive numbers (z, y, x), got {voxel_size_um!r}")


def _slabs(depth: int, plane: int) -> list[slice]:
    step = max(1, _SLAB_VOXELS // max(plane, 1))
    return [slice(z, min(z + step, depth)) for z in range(0, depth, step)]


def _moments(labels: np.ndarray, n: int) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
    """Voxel counts ``(n + 1,)`` and coordinate sums ``(n + 1, 3)`` per label, slab by slab."""
    _, height, width = labels.shape
    counts = np.zeros(n + 1, dtype=np.int64)
    sums = np.zeros((n + 1, 3), dtype=np.float64)
    for zs in _slabs(labels.shape[0], height * width):
        slab = labels[zs].astype(np.intp, copy=False)
        flat = slab.ravel()
        per_plane = np.bincount(flat, minlength=n + 1)
        counts += per_plane
        # z sum: count per (plane, label), weighted by the plane's z; y/x sums: weights broadcast per slab
        for axis, coords in ((1, np.arange(height, dtype=np.float64)), (2, np.arange(width, dtype=np.float64))):
            shape = [1, 1, 1]
            shape[axis] = coords.size
            weights = np.broadcast_to(coords.reshape(shape), slab.shape).ravel()
            sums[:, axis] += np.bincount(flat, weights=weights, minlength=n + 1)
        z_weights = np.repeat(np.arange(zs.start, zs.stop, dtype=np.float64), height * width)
        sums[:, 0] += np.bincount(flat, weights=z_weights, minlength=n + 1)
    return counts, sums


def _pairs(a: np.ndarray, b: np.ndarray) -> NDArray[np.int64]:
    """``(m, 2)`` (low, high) id pairs of differing nonzero labels at the same positions of ``a`` and ``b``."""
    touching = (a != b) & (a > 0) & (b > 0)
    first, second = a[touching].astype(np.int64), b[touching].astype(np.int64)
    return np.stack([np.minimum(first, second), np.maximum(first, second)], axis=1)


def _adjacency(labels: np.ndarray, n: int) -> NDArray[np.int64]:
    """Unique face-adjacent ``(low, high)`` id pairs, each listed once, sorted."""
    found = []
    depth, height, width = labels.shape
    for zs in _slabs(depth, height * width):
        slab = labels[zs]
        found += [_pairs(slab[:, :-1], slab[:, 1:]), _pairs(slab[:, :, :-1], slab[:, :, 1:])]
        found.append(_pairs(slab[:-1], slab[1:]))
        if zs.stop < depth:  # the face between this slab and the next
            found.append(_pairs(labels[zs.stop - 1], labels[zs.stop]))
    pairs = np.concatenate(found) if found else np.zeros((0, 2), np.int64)
    keys = np.unique(pairs[:, 0] * (n + 1) + pairs[:, 1])
    return np.stack([keys // (n + 1), keys % (n + 1)], axis=1)


def cell_table(
    labels: NDArray[np.integer], /, *, voxel_size_um: tuple[float, float, float] | None = None
) -> CellTable:
    """Measure every cell of a label volume.

    Args:
        labels: ``(Z, Y, X)`` non-negative integer labels on the host, 0 = background; ids need not be
            consecutive.
        voxel_size_um: ``(z, y, x)`` in micrometres; adds volumes and centroids in µm.

    Returns:
        The table, one row per label present, ascending id.

    Raises:
        InputError: not a 3D non-negative integer volume, or a bad voxel size.
    """
    labels = np.asarray(labels)
    _check_labels(labels, voxel_size_um)
    n = int(labels.max()) if labels.size else 0
    counts, sums = _moments(labels, n)
    present = np.flatnonzero(counts[1:]) + 1
    boxes = ndimage.find_objects(labels, max_label=n) if n else []
    bbox = np.array(
        [[s.start for s in boxes[i - 1]] + [s.stop for s in boxes[i - 1]] for i in present], dtype=np.int64
    ).reshape(-1, 6)
    shape = tuple(int(s) for s in labels.shape)
    touches = (bbox[:, :3] == 0).any(axis=1) | (bbox[:, 3:] == np.asarray(shape)).any(axis=1)
    pairs = _adjacency(labels, n)
    both = np.concatenate([pairs, pairs[:, ::-1]])  # each pair seen from both cells
    both = both[np.lexsort((both[:, 1], both[:, 0]))]
    offsets = np.searchsorted(both[:, 0], np.append(present, n + 1)).astype(np.int64)
    offsets -= offsets[0]
    return CellTable(
        ids=present.astype(np.int64),
        volume_voxels=counts[present],
        centroid=sums[present] / counts[present, None],
        bbox=bbox,
        touches_border=touches,
        neighbour_offsets=offsets,
        neighbour_ids=both[:, 1].copy(),
        shape=shape,  # type: ignore[arg-type]
        voxel_size_um=tuple(float(v) for v in voxel_size_um) if voxel_size_um else None,  # type: ignore[arg-type]
    )


def _rows(table: CellTable) -> list[list[object]]:
    um3, c_um = table.volume_um3, table.centroid_um
    rows = []
    for i in range(len(table)):  # one row per cell (not per voxel)
        rows.append([
            int(table.ids[i]), int(table.volume_voxels[i]), "" if um3 is None else f"{um3[i]:.6g}",
            *(f"{v:.4f}" for v in table.centroid[i]),
            *(("", "", "") if c_um is None else (f"{v:.4f}" for v in c_um[i])),
            *(int(v) for v in table.bbox[i]),
            int(table.touches_border[i]), int(table.neighbour_offsets[i + 1] - table.neighbour_offsets[i]),
            " ".join(str(int(v)) for v in table.neighbours(i)),
        ])
    return rows


def write_cell_table_csv(path: str | os.PathLike[str], table: CellTable, /) -> Path:
    """Write ``table`` as CSV (columns :data:`CSV_COLUMNS`; neighbours space-separated), atomically.

    µm columns are empty when the voxel size is unknown; ``bbox_*1`` are exclusive ends.
    """

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(CSV_COLUMNS)
            writer.writerows(_rows(table))

    return atomic_write(path, write)
