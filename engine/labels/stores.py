"""Where the provisional labels of finished cores wait for their final ids: in memory, or in an unnamed
temporary file when the volume is streamed (``depth`` planes in memory at a time)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

__all__ = ["FileLabelStore", "MemoryLabelStore"]


class MemoryLabelStore:
    """Provisional labels of a ``(Z, Y, X)`` volume held in memory (uint32)."""

    def __init__(self, shape: tuple[int, int, int], /) -> None:
        self.labels = np.zeros(shape, dtype=np.uint32)

    def write(self, z0: int, core: NDArray[np.uint32], /) -> None:
        self.labels[z0 : z0 + core.shape[0]] = core

    def relabel(self, lut: NDArray[np.uint32], /, *, chunk: int) -> Iterator[NDArray[np.uint32]]:
        """Map every id through ``lut`` in place, yielding the final planes ``chunk`` at a time."""
        for z0 in range(0, self.labels.shape[0], chunk):
            part = self.labels[z0 : z0 + chunk]
            part[...] = lut[part]
            yield part

    def result(self) -> NDArray[np.uint32]:
        return self.labels

    def close(self) -> None:
        """Let the labels go (a model-grid store, once sampled back)."""
        self.labels = np.zeros((0, 0, 0), dtype=np.uint32)


class FileLabelStore:
    """Provisional labels in an unnamed temporary file (``depth`` planes in memory at a time).

    After :meth:`relabel`, :meth:`result` maps the final labels read-only; the file disappears when that
    array is garbage collected.

    Args:
        shape: ``(Z, Y, X)``.
        folder: where the temporary file lives (4 bytes per voxel).
    """

    def __init__(self, shape: tuple[int, int, int], /, *, folder: str | os.PathLike[str] | None = None) -> None:
        self.shape = shape
        self._plane = shape[1] * shape[2] * 4
        self._file = tempfile.TemporaryFile(dir=folder, prefix=".cellseg3d-labels-")
        self._file.truncate(int(np.prod(shape)) * 4)
        self.path = Path(folder or tempfile.gettempdir())

    def write(self, z0: int, core: NDArray[np.uint32], /) -> None:
        os.pwrite(self._file.fileno(), np.ascontiguousarray(core, dtype=np.uint32).tobytes(), z0 * self._plane)

    def _read(self, z0: int, z1: int) -> NDArray[np.uint32]:
        raw = os.pread(self._file.fileno(), (z1 - z0) * self._plane, z0 * self._plane)
        return np.frombuffer(raw, dtype=np.uint32).reshape(z1 - z0, *self.shape[1:])

    def relabel(self, lut: NDArray[np.uint32], /, *, chunk: int) -> Iterator[NDArray[np.uint32]]:
        """Map every id through ``lut`` (rewriting the file), yielding the final planes ``chunk`` at a time."""
        for z0 in range(0, self.shape[0], chunk):
            part = lut[self._read(z0, min(self.shape[0], z0 + chunk))]
            self.write(z0, part)
            yield part

    def result(self) -> NDArray[np.uint32]:
        mapped = np.memmap(self._file, dtype=np.uint32, mode="r", shape=self.shape)
        self._file.close()  # the mapping holds its own descriptor
        return mapped

    def close(self) -> None:
        self._file.close()
