"""Page-by-page TIFF writing: label and probability volumes written from z-slabs, never held whole.

The files are those of :func:`engine.io.write_labels` and :func:`engine.io.write_probabilities` (ImageJ
hyperstacks, zlib, voxel size kept), except that data that would pass 4 GiB uncompressed go to an OME
BigTIFF, since ImageJ files cannot be BigTIFF. Both are written under a temporary name and renamed into
place only when complete.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from numpy.typing import NDArray

from .atomic import atomic_write, temp_beside
from .io import imagej_write_kwargs

__all__ = ["BIGTIFF_BYTES", "write_labels_stream", "ProbabilityWriter"]

# Uncompressed data above this go to BigTIFF (and so OME, since ImageJ files cannot be BigTIFF); the margin
# leaves room for the IFDs of many pages.
BIGTIFF_BYTES = 2**32 - 2**25


def _stream_kwargs(
    dtype: np.dtype, nbytes: int, axes: str, voxel: tuple[float, float, float] | None, *, imagej: bool
) -> dict[str, Any]:
    """tifffile writer and page arguments: ImageJ when allowed and small enough, else OME (BigTIFF if large)."""
    big = nbytes > BIGTIFF_BYTES
    if imagej and not big:
        kwargs = imagej_write_kwargs(voxel, axes)
        return {"writer": {"imagej": True}, "page": {k: v for k, v in kwargs.items() if k != "imagej"}}
    meta: dict[str, Any] = {"axes": axes}
    if voxel:
        meta.update(PhysicalSizeZ=voxel[0], PhysicalSizeY=voxel[1], PhysicalSizeX=voxel[2])
    return {"writer": {"ome": True, "bigtiff": big}, "page": {"metadata": meta}}


def write_labels_stream(
    path: str | os.PathLike[str],
    chunks: Iterator[NDArray[np.integer]],
    /,
    *,
    shape: tuple[int, int, int],
    max_label: int,
    voxel_size_um: tuple[float, float, float] | None = None,
) -> Path:
    """Write a ``(Z, Y, X)`` label volume from z-chunks, page by page, in the format of :func:`write_labels`.

    Args:
        path: the label TIFF; written to a temporary name and renamed when complete.
        chunks: ``(n, Y, X)`` arrays in z order that together hold ``shape[0]`` planes.
        shape: ``(Z, Y, X)``.
        max_label: the largest id, which picks uint16 or uint32 before any chunk is seen.
        voxel_size_um: ``(z, y, x)``, stored as :func:`write_labels` does.
    """
    dtype = np.dtype(np.uint16 if max_label < 2**16 else np.uint32)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    kwargs = _stream_kwargs(dtype, nbytes, "ZYX", voxel_size_um, imagej=dtype == np.uint16)

    def pages() -> Iterator[np.ndarray]:
        for chunk in chunks:
            for plane in chunk:
                yield plane.astype(dtype, copy=False)

    def write(tmp: str) -> None:
        with tifffile.TiffWriter(tmp, **kwargs["writer"]) as tif:
            tif.write(pages(), shape=shape, dtype=dtype, compression="zlib", **kwargs["page"])

    return atomic_write(path, write)


class ProbabilityWriter:
    """Writes a ``(K, Z, Y, X)`` float32 probability map slab by slab, on its own thread.

    The file is the same ImageJ hyperstack (stored ZCYX) as :func:`write_probabilities`, or an OME BigTIFF
    when it would pass 4 GiB. It is written under a temporary name: :meth:`commit` renames it into place
    once the run succeeded, :meth:`abort` deletes it.

    Args:
        path: where the map goes.
        shape: ``(K, Z, Y, X)``.
        voxel_size_um: ``(z, y, x)``, or None.
    """

    def __init__(
        self, path: str | os.PathLike[str], /, *, shape: tuple[int, int, int, int], voxel_size_um: tuple[float, float, float] | None
    ) -> None:
        self.path = Path(path)
        self._shape = shape
        self._queue: queue.Queue[np.ndarray | None] = queue.Queue(maxsize=2)
        self._error: BaseException | None = None
        self._eof = False
        k, z, y, x = shape
        self._kwargs = _stream_kwargs(np.dtype(np.float32), 4 * k * z * y * x, "ZCYX", voxel_size_um, imagej=True)
        self._thread = threading.Thread(target=self._run, name="prob-writer", daemon=True)
        self._tmp = temp_beside(self.path)
        try:  # the caller holds no writer to abort until this returns: a signal here must not leave the file
            self._thread.start()
        except BaseException:
            self._tmp.unlink(missing_ok=True)
            raise

    def _pages(self) -> Iterator[np.ndarray]:
        while (chunk := self._queue.get()) is not None:
            for z in range(chunk.shape[1]):
                for k in range(chunk.shape[0]):
                    yield chunk[k, z]
        self._eof = True

    def _run(self) -> None:
        k, z, y, x = self._shape
        try:
            with tifffile.TiffWriter(self._tmp, **self._kwargs["writer"]) as tif:
                tif.write(self._pages(), shape=(z, k, y, x), dtype=np.float32, compression="zlib", **self._kwargs["page"])
        except BaseException as exc:  # reported to the caller by write()/finish()
            self._error = exc
            while not self._eof and self._queue.get() is not None:  # drain so a blocked producer can finish
                pass

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def write(self, chunk: NDArray[np.float32], /) -> None:
        """Append ``(K, n, Y, X)`` float32 planes (in z order)."""
        self._check()
        self._queue.put(np.asarray(chunk, dtype=np.float32))

    def finish(self) -> None:
        """Wait until every plane is on disk; raises what the writer thread hit."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._check()

    def commit(self) -> Path:
        """Finish and rename the file into place."""
        self.finish()
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Stop and delete the temporary file."""
        if self._thread.is_alive():
            try:
                self._queue.put(None, timeout=60)
            except queue.Full:  # the writer is stuck; it is a daemon thread and holds only the temp file
                pass
            self._thread.join(timeout=60)
        self._tmp.unlink(missing_ok=True)
