"""Over-segment, then merge: average-linkage agglomeration of watershed regions over their adjacency graph.

As PlantSeg's DT-watershed + GASP (average linkage) does: the seeded watershed gives superpixels, the
region adjacency graph weighs each pair of touching regions by the mean boundary probability over the
faces they share, and the pair with the weakest boundary is merged while that mean stays under
``threshold`` (the merged region's faces are pooled, so a merge recomputes the averages exactly). Regions
smaller than ``min_size`` voxels (slivers) are then merged into the neighbour with the weakest boundary,
whatever its strength.

:class:`EdgeTable` collects the graph from labelled pieces (a z-slab at a time: faces inside a piece and
between a piece and the plane before it), keyed by whatever ids the caller uses; :func:`agglomerate` runs
on it and returns the merges. Per-face work is numpy; the merge loop is per edge (a heap), not per voxel.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

__all__ = ["EdgeTable", "agglomerate"]


def _faces(a: NDArray[np.integer], b: NDArray[np.integer], pa: NDArray[np.floating], pb: NDArray[np.floating]):  # noqa: ANN202
    """Pairs of different, non-zero ids facing each other, with the mean boundary of the two voxels."""
    touch = (a != b) & (a > 0) & (b > 0)
    u, v = a[touch].astype(np.int64), b[touch].astype(np.int64)
    value = (pa[touch].astype(np.float64) + pb[touch]) * 0.5
    return np.minimum(u, v), np.maximum(u, v), value


@dataclass
class EdgeTable:
    """Sum and count of face boundary values per region pair ``(u < v)``, merged over the pieces added."""

    sums: dict[tuple[int, int], float] = field(default_factory=dict)
    counts: dict[tuple[int, int], int] = field(default_factory=dict)

    def add_faces(self, u: NDArray[np.int64], v: NDArray[np.int64], value: NDArray[np.float64]) -> None:
        if not len(u):
            return
        key = u * (int(max(u.max(), v.max())) + 1) + v
        uniq, first, inverse = np.unique(key, return_index=True, return_inverse=True)
        sums = np.bincount(inverse, weights=value, minlength=len(uniq))
        counts = np.bincount(inverse, minlength=len(uniq))
        for a, b, s, c in zip(u[first].tolist(), v[first].tolist(), sums.tolist(), counts.tolist()):
            self.sums[(a, b)] = self.sums.get((a, b), 0.0) + s
            self.counts[(a, b)] = self.counts.get((a, b), 0) + c

    def add_piece(self, labels: NDArray[np.integer], boundary: NDArray[np.floating], /) -> None:
        """Every face inside ``labels`` (``(Z, Y, X)`` ids, ``boundary`` the same shape)."""
        for axis in range(labels.ndim):
            lo = [slice(None)] * labels.ndim
            hi = [slice(None)] * labels.ndim
            lo[axis], hi[axis] = slice(0, -1), slice(1, None)
            self.add_faces(*_faces(labels[tuple(lo)], labels[tuple(hi)], boundary[tuple(lo)], boundary[tuple(hi)]))

    def add_between(self, below: NDArray[np.integer], below_p: NDArray[np.floating], above: NDArray[np.integer],
                    above_p: NDArray[np.floating]) -> None:
        """The faces between the last plane of one piece and the first plane of the next (``(Y, X)`` each)."""
        self.add_faces(*_faces(below, above, below_p, above_p))

    def remapped(self, root: Callable[[NDArray[np.int64]], NDArray[np.int64]]) -> EdgeTable:
        """The table with every id replaced by ``root(id)`` (pairs that become one id are dropped)."""
        out = EdgeTable()
        if not self.sums:
            return out
        pairs = np.array(list(self.sums), dtype=np.int64)
        sums = np.array(list(self.sums.values()))
        counts = np.array([self.counts[k] for k in self.sums], dtype=np.int64)
        u, v = root(pairs[:, 0]), root(pairs[:, 1])
        keep = u != v
        lo, hi = np.minimum(u, v)[keep], np.maximum(u, v)[keep]
        for a, b, s, c in zip(lo.tolist(), hi.tolist(), sums[keep].tolist(), counts[keep].tolist()):
            out.sums[(a, b)] = out.sums.get((a, b), 0.0) + s
            out.counts[(a, b)] = out.counts.get((a, b), 0) + c
        return out


def agglomerate(edges: EdgeTable, sizes: dict[int, int], /, *, threshold: float, min_size: int) -> list[tuple[int, int]]:
    """The merges ``(kept, absorbed)`` of average-linkage agglomeration (see the module docstring).

    Args:
        edges: the region adjacency graph.
        sizes: voxels per region id (ids missing count as 0).
        threshold: merge while the weakest mean boundary between two regions is below this.
        min_size: afterwards, regions under this many voxels join their weakest-boundary neighbour.
    """
    adjacency: dict[int, dict[int, list[float]]] = {}
    for (u, v), s in edges.sums.items():
        shared = [s, float(edges.counts[(u, v)])]  # one list for both directions: pooling updates both
        adjacency.setdefault(u, {})[v] = shared
        adjacency.setdefault(v, {})[u] = shared
    size = {n: sizes.get(n, 0) for n in adjacency}
    heap = [(s / c, u, v) for u, nbrs in adjacency.items() for v, (s, c) in nbrs.items() if u < v]
    heapq.heapify(heap)
    merges: list[tuple[int, int]] = []

    def merge(keep: int, gone: int) -> None:
        for w, (s, c) in adjacency.pop(gone).items():
            del adjacency[w][gone]
            if w == keep:
                continue
            entry = adjacency[keep].setdefault(w, [0.0, 0.0])
            entry[0] += s
            entry[1] += c
            adjacency[w][keep] = entry
            heapq.heappush(heap, (entry[0] / entry[1], min(keep, w), max(keep, w)))
        size[keep] += size.pop(gone)
        merges.append((keep, gone))

    while heap and heap[0][0] < threshold:
        mean, u, v = heapq.heappop(heap)
        entry = adjacency.get(u, {}).get(v)
        if entry is None or abs(entry[0] / entry[1] - mean) > 1e-12:
            continue  # stale: one side was merged, or the pair's faces were pooled since
        keep, gone = (u, v) if size[u] >= size[v] else (v, u)
        merge(keep, gone)
    for node in sorted((n for n in size if size[n] < min_size), key=lambda n: size.get(n, 0)):
        if node not in adjacency or size[node] >= min_size or not adjacency[node]:
            continue
        weakest = min(adjacency[node], key=lambda w: adjacency[node][w][0] / adjacency[node][w][1])
        merge(weakest, node)
    return merges
