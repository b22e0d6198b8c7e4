"""Where a run's results go: arrays in memory (``segment``) or TIFF files (``segment_file``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .labels import FileLabelStore, MemoryLabelStore
from .tiff_stream import ProbabilityWriter

__all__ = ["RunOutputs"]


class RunOutputs:
    """Where a run's results go: arrays in memory (``segment``) or TIFF files (``segment_file``)."""

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

    def open(self, shape: tuple[int, int, int, int], *, streamed: bool) -> tuple[MemoryLabelStore | FileLabelStore, Any]:
        """The label store and the probability sink ``write(z0, chunk)`` (or None) for a ``(K, Z, Y, X)`` map."""
        in_memory = self.output_path is None or not streamed
        if in_memory:
            self.probs = np.empty(shape, dtype=np.float32)
        if self.prob_path is not None and self.output_path is not None:
            self.prob_writer = ProbabilityWriter(self.prob_path, shape=shape, voxel_size_um=self.voxel)
        folder = Path(self.output_path).parent if self.output_path is not None else None
        store = MemoryLabelStore(shape[1:]) if in_memory else FileLabelStore(shape[1:], folder=folder)

        def sink(z0: int, chunk: np.ndarray) -> None:
            if self.probs is not None:
                self.probs[:, z0 : z0 + chunk.shape[1]] = chunk
            if self.prob_writer is not None:
                self.prob_writer.write(chunk)

        return store, (sink if self.probs is not None or self.prob_writer is not None else None)

    def abort(self) -> None:
        if self.prob_writer is not None:
            self.prob_writer.abort()
