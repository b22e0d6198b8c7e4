"""Disjoint sets over provisional label ids: which ids found in different slabs or tiles are one cell."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

__all__ = ["MAX_ID", "UnionFind"]

MAX_ID = 2**32 - 1  # labels are written as uint32


class UnionFind:
    """Disjoint sets over ids ``0..n-1`` that can grow; the smaller id of a set is its root."""

    def __init__(self) -> None:
        self._parent = np.zeros(1024, dtype=np.int64)
        self._n = 1  # id 0 is the background and never joins anything

    def __len__(self) -> int:
        return self._n

    def add(self, count: int, /) -> NDArray[np.int64]:
        """``count`` new singleton ids, consecutive."""
        first, self._n = self._n, self._n + count
        if self._n > MAX_ID:
            raise OverflowError(f"more than {MAX_ID} provisional labels")
        if self._n > len(self._parent):
            grown = np.zeros(max(self._n, 2 * len(self._parent)), dtype=np.int64)
            grown[: len(self._parent)] = self._parent
            self._parent = grown
        ids = np.arange(first, self._n, dtype=np.int64)
        self._parent[first : self._n] = ids
        return ids

    def _find(self, x: int) -> int:
        parent = self._parent
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = int(parent[x])
        return x

    def union(self, a: Sequence[int] | NDArray[np.integer], b: Sequence[int] | NDArray[np.integer], /) -> None:
        """Join ``a[i]`` and ``b[i]`` for every ``i``."""
        for x, y in zip(np.asarray(a).tolist(), np.asarray(b).tolist()):
            rx, ry = self._find(x), self._find(y)
            if rx != ry:
                self._parent[max(rx, ry)] = min(rx, ry)

    def roots(self) -> NDArray[np.int64]:
        """The root of every id ``0..n-1``."""
        parent = self._parent[: self._n].copy()
        while True:
            up = parent[parent]
            if np.array_equal(up, parent):
                return parent
            parent = up
