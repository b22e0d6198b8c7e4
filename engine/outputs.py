"""Where a run's results go: arrays in memory (``segment``) or TIFF files (``segment_file``), always on the
input grid (a run labelled on the model's grid has its results sampled back, :mod:`engine.model_grid`)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .labels import FileLabelStore, FinalLabels, MemoryLabelStore
from .model_grid import ModelGrid
from .tiff_stream import ProbabilityWriter

__all__ = ["RunOutputs"]


class RunOutputs:
    """The label stores, the probability sink and the written files of one run (see the module docstring)."""

    def __init__(
        self,
        *,
        output_path: str | os.PathLike[str] | None = None,
        prob_path: str | os.PathLike[str] | None = None,
        voxel_size_um: tuple[float, float, float] | None = None,
    ) -> None:
        self.output_path, self.prob_path, self.voxel = output_path, prob_path, voxel_size_um
        self.probs: np.ndarray | None = None
        self.prob_writer: ProbabilityWriter | None = None
        self._grid: ModelGrid | None = None
        self._store: MemoryLabelStore | FileLabelStore | None = None
        self._input_store: MemoryLabelStore | FileLabelStore | None = None

    def open(
        self, shape: tuple[int, int, int, int], *, streamed: bool, grid: ModelGrid | None = None
    ) -> tuple[MemoryLabelStore | FileLabelStore, Any]:
        """The label store (on the grid the run labels on: ``grid``'s model grid, else the input's) and the
        probability sink ``write(z0, chunk)`` (or None) for a ``(K, Z, Y, X)`` map on the input grid."""
        in_memory = self.output_path is None or not streamed
        if self.output_path is None or (in_memory and self.prob_path is not None):  # asked for: segment(), prob_path
            self.probs = np.empty(shape, dtype=np.float32)
        if self.prob_path is not None and self.output_path is not None:
            self.prob_writer = ProbabilityWriter(self.prob_path, shape=shape, voxel_size_um=self.voxel)
        self._grid = grid
        self._input_store = self._new_store(shape[1:], in_memory)
        self._store = self._input_store if grid is None else self._new_store(grid.model_shape, in_memory)

        def sink(z0: int, chunk: np.ndarray) -> None:
            if self.probs is not None:
                self.probs[:, z0 : z0 + chunk.shape[1]] = chunk
            if self.prob_writer is not None:
                self.prob_writer.write(chunk)

        if self.probs is None and self.prob_writer is None:
            return self._store, None
        return self._store, (sink if grid is None else grid.probabilities_back(sink))

    def _new_store(self, shape: tuple[int, int, int], in_memory: bool) -> MemoryLabelStore | FileLabelStore:
        folder = Path(self.output_path).parent if self.output_path is not None else None
        return MemoryLabelStore(shape) if in_memory else FileLabelStore(shape, folder=folder)

    def labels(self, final: FinalLabels, /, *, chunk: int) -> tuple[int, Iterator[NDArray[np.uint32]]]:
        """The number of cells and the final labels on the input grid, ``chunk`` planes at a time.

        Labelled on the model grid, the labels are first sampled back into the input-grid store; a cell
        thinner than an input plane can vanish there, so the ids left are renumbered 1..n.
        """
        chunks = self._store.relabel(final.lut, chunk=chunk)
        if self._grid is None:
            return final.n_cells, chunks
        seen = np.zeros(final.n_cells + 1, dtype=bool)
        z0 = 0
        for part in self._grid.labels_back(chunks):
            self._input_store.write(z0, part)
            seen[part] = True
            z0 += part.shape[0]
        self._store.close()
        seen[0] = False
        n_cells = int(seen.sum())
        lut = np.zeros(final.n_cells + 1, dtype=np.uint32)
        lut[seen] = np.arange(1, n_cells + 1, dtype=np.uint32)
        return n_cells, self._input_store.relabel(lut, chunk=chunk)

    def result(self) -> NDArray[np.uint32]:
        """The final labels on the input grid (after :meth:`labels` was consumed)."""
        return self._input_store.result()

    def abort(self) -> None:
        if self.prob_writer is not None:
            self.prob_writer.abort()
