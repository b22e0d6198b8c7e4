"""Where the provisional labels of finished cores wait for their final ids: in memory, or in an unnamed
temporary file when the volume is streamed (``depth`` planes in memory at a time).

Final ids are mapped in place by seung-lab's ``fastremap`` (``remap_from_array``): 0.070 s against numpy's
``lut[labels]`` 0.164 s on 48x1024x1024 uint32 labels of 160k ids, with no temporary array
(benchmarks/PERFORMANCE.md)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import fastremap
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
            _remap(part, lut)
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
        out = np.empty((z1 - z0, *self.shape[1:]), dtype=np.uint32)
        if os.preadv(self._file.fileno(), [out], z0 * self._plane) != out.nbytes:
            raise OSError(f"label store: short read of planes {z0}..{z1} from its temporary file")
        return out

    def relabel(self, lut: NDArray[np.uint32], /, *, chunk: int) -> Iterator[NDArray[np.uint32]]:
        """Map every id through ``lut`` (rewriting the file), yielding the final planes ``chunk`` at a time."""
        for z0 in range(0, self.shape[0], chunk):
            part = self._read(z0, min(self.shape[0], z0 + chunk))
            _remap(part, lut)
            self.write(z0, part)
            yield part

    def result(self) -> NDArray[np.uint32]:
        mapped = np.memmap(self._file, dtype=np.uint32, mode="r", shape=self.shape)
        self._file.close()  # the mapping holds its own descriptor
        return mapped

    def close(self) -> None:
        self._file.close()


def _remap(part: NDArray[np.uint32], lut: NDArray[np.uint32]) -> None:
    """``part[...] = lut[part]`` in place (every id in ``part`` is below ``len(lut)``)."""
    if not part.flags.c_contiguous:
        raise ValueError("label store: a relabelled chunk must be contiguous")
    fastremap.remap_from_array(part.reshape(-1), np.ascontiguousarray(lut, dtype=np.uint32))
