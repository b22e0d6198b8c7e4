"""TIFF in and out: ZYX, CZYX, ImageJ hyperstacks and OME-TIFF, keeping the voxel size.

Reading returns the volume as ``(C, Z, Y, X)`` in its own dtype plus the voxel size in micrometres.
``open_volume`` reads the same files by z-slabs instead: memory-mapped when the image data are contiguous
and uncompressed, page by page otherwise, so a stack larger than memory can be streamed.
Writing goes to a temporary name in the target folder and is renamed into place, so a failure never leaves
a half-written file behind (:mod:`engine.tiff_stream` writes the same files page by page from slabs).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from numpy.typing import NDArray

from .atomic import atomic_target, atomic_write
from .errors import InputError

__all__ = [
    "Volume",
    "VolumeReader",
    "read_volume",
    "open_volume",
    "write_labels",
    "write_probabilities",
    "imagej_write_kwargs",
    "atomic_write",
    "atomic_target",
]

logger = logging.getLogger(__name__)

_SUPPORTED_DTYPES = (np.uint8, np.uint16, np.int8, np.int16, np.uint32, np.int32, np.float16, np.float32, np.float64)
_UM_PER_UNIT = {"um": 1.0, "micron": 1.0, "\\u00B5m": 1.0, "µm": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4}


@dataclass(frozen=True)
class Volume:
    """An image read from disk.

    Attributes:
        data: ``(C, Z, Y, X)`` array in the file's dtype (C is 1 for a single-channel stack).
        voxel_size_um: ``(z, y, x)`` in micrometres, or None when the file does not say.
        path: where it came from.
    """

    data: np.ndarray
    voxel_size_um: tuple[float, float, float] | None
    path: Path | None = None


def _to_czyx(data: np.ndarray, axes: str, path: Path, channel: int | None) -> np.ndarray:
    """Reorder a tifffile series to CZYX, selecting ``channel`` when given."""
    axes = axes.upper()
    for ax in "T":  # single time points are fine; series are not
        if ax in axes:
            i = axes.index(ax)
            if data.shape[i] != 1:
                raise InputError(f"{path}: has {data.shape[i]} time points; save one time point as its own TIFF")
            data, axes = np.take(data, 0, axis=i), axes.replace(ax, "")
    if "Z" not in axes:
        generic = [a for a in axes if a in "QIP"]
        if len(generic) == 1:
            axes = axes.replace(generic[0], "Z")
    if "S" in axes and "C" in axes:
        raise InputError(f"{path}: has both samples and channels (axes {axes}); not supported")
    axes = axes.replace("S", "C")
    if "C" not in axes:
        data, axes = data[np.newaxis], "C" + axes
    if set(axes) != set("CZYX") or len(axes) != 4:
        if "Z" not in axes:
            raise InputError(f"{path}: a 2D image (axes {axes!r}, shape {data.shape}); a 3D stack is needed")
        raise InputError(f"{path}: unsupported axes {axes!r} with shape {data.shape}; expected ZYX or CZYX")
    data = np.transpose(data, [axes.index(a) for a in "CZYX"])
    if channel is not None:
        if not 0 <= channel < data.shape[0]:
            raise InputError(f"{path}: channel {channel} out of range; the image has {data.shape[0]} channel(s)")
        data = data[channel : channel + 1]
    return data


def _voxel_size(tif: tifffile.TiffFile) -> tuple[float, float, float] | None:
    """Voxel size from OME metadata, or from ImageJ spacing + the resolution tags."""
    if tif.is_ome and tif.ome_metadata:
        found = {ax: re.search(rf'PhysicalSize{ax}="([0-9.eE+-]+)"', tif.ome_metadata) for ax in "ZYX"}
        if all(found.values()):
            return tuple(float(found[ax].group(1)) for ax in "ZYX")  # type: ignore[union-attr,return-value]
    if tif.is_imagej and tif.imagej_metadata:
        meta = tif.imagej_metadata
        scale = _UM_PER_UNIT.get(str(meta.get("unit", "um")), 1.0)
        tags = tif.pages.first.tags
        if "spacing" in meta and "XResolution" in tags and "YResolution" in tags:
            xr, yr = tags["XResolution"].value, tags["YResolution"].value
            y, x = yr[1] / yr[0], xr[1] / xr[0]
            return (float(meta["spacing"]) * scale, y * scale, x * scale)
    return None


def _same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Same path, symlink or hard link to the same file (a path that does not exist yet is compared resolved)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()


def refuse_overwrites(input_path: str | os.PathLike[str], /, *targets: str | os.PathLike[str] | None) -> None:
    """Raise InputError, before anything runs, when an output (None: not asked for) would replace the input
    or another output, is a folder, or is in a folder that does not exist."""
    given = [Path(t) for t in targets if t is not None]
    for i, target in enumerate(given):
        if _same_file(target, input_path):
            raise InputError(f"{target}: is the input image {input_path}; choose another output path")
        if target.is_dir():
            raise InputError(f"{target}: is a folder; give a file name for this output")
        if not target.parent.is_dir():
            raise InputError(f"{target}: folder {target.parent} does not exist")
        for earlier in given[:i]:
            if _same_file(target, earlier):
                raise InputError(f"{target}: is also the output {earlier}; give each output its own path")


class _CaptureLog(logging.Handler):
    """Collects what a library logs (tifffile reports corrupt files by logging, then carries on)."""

    def __init__(self, name: str) -> None:
        super().__init__(logging.WARNING)
        self.library, self.records = logging.getLogger(name), []  # type: ignore[var-annotated]

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> _CaptureLog:
        self._propagate, self.library.propagate = self.library.propagate, False
        self.library.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.library.removeHandler(self)
        self.library.propagate = self._propagate

    def check(self, path: Path) -> None:
        """Errors become one InputError naming ``path``; warnings pass on as one line each."""
        errors = [r.getMessage().split(">", 1)[-1].strip() for r in self.records if r.levelno >= logging.ERROR]
        if errors:
            raise InputError(f"{path}: corrupt or truncated TIFF ({'; '.join(errors)})")
        for record in self.records:
            logger.warning("%s: %s", path, record.getMessage().split(">", 1)[-1].strip())


def _check_file(p: Path) -> None:
    if p.is_dir():
        raise InputError(f"{p}: is a folder, not a TIFF file")
    if not p.is_file():
        raise InputError(f"{p}: no such file")


def _first_series(tif: tifffile.TiffFile, p: Path) -> tifffile.TiffPageSeries:
    if not tif.series:
        raise InputError(f"{p}: not a readable TIFF (no image series)")
    if len(tif.series) > 1:
        logger.warning("%s: holds %d image series; segmenting the first (%s %s), the others are ignored",
                       p, len(tif.series), tif.series[0].axes, "x".join(map(str, tif.series[0].shape)))
    return tif.series[0]


def read_volume(path: str | os.PathLike[str], /, *, channel: int | None = None, channels: int = 1) -> Volume:
    """Read a 3D TIFF stack as ``(C, Z, Y, X)``.

    Args:
        path: the TIFF file.
        channel: which channel to keep, for multi-channel images.
        channels: how many channels the model takes; a multi-channel image with ``channels == 1`` needs
            ``channel``.

    Raises:
        InputError: missing, unreadable or not a TIFF; 2D; time series; wrong channel count; unsupported
            dtype; empty.
    """
    p = Path(path)
    _check_file(p)
    try:
        with _CaptureLog("tifffile") as log, tifffile.TiffFile(p) as tif:
            series = _first_series(tif, p)
            data, axes = series.asarray(), series.axes
            voxel = _voxel_size(tif)
    except (tifffile.TiffFileError, OSError, ValueError, IndexError) as exc:
        raise InputError(f"{p}: not a readable TIFF ({exc})") from exc
    log.check(p)
    if data.dtype.type not in _SUPPORTED_DTYPES:
        raise InputError(f"{p}: unsupported pixel type {data.dtype}; use uint8, uint16 or float32")
    if data.size == 0:
        raise InputError(f"{p}: empty image (shape {data.shape})")
    data = _to_czyx(data, axes, p, channel)
    if data.shape[0] != channels:
        hint = "; choose one with --channel" if channels == 1 else ""
        raise InputError(f"{p}: has {data.shape[0]} channels, the model takes {channels}{hint}")
    return Volume(data=data, voxel_size_um=voxel, path=p)


class VolumeReader:
    """A 3D TIFF stack opened for reading by z-slabs; create it with :func:`open_volume`.

    Attributes:
        path: the file.
        shape: ``(C, Z, Y, X)`` after channel selection.
        dtype: the file's pixel type.
        voxel_size_um: ``(z, y, x)`` in micrometres, or None.
        mode: ``"memmap"`` (contiguous, uncompressed data), ``"pages"`` (one TIFF page per plane) or
            ``"whole"`` (a layout that cannot be read by planes, e.g. volumetric tiles: read at once).
    """

    def __init__(self, path: Path, tif: tifffile.TiffFile, *, channel: int | None, channels: int | None) -> None:
        self.path = path
        self._tif = tif
        series = tif.series[0]
        self._axes, self._shape = series.axes, tuple(series.shape)
        self.dtype = np.dtype(series.dtype)
        if self.dtype.type not in _SUPPORTED_DTYPES:
            raise InputError(f"{path}: unsupported pixel type {self.dtype}; use uint8, uint16 or float32")
        if int(np.prod(self._shape)) == 0:
            raise InputError(f"{path}: empty image (shape {self._shape})")
        # Validate and learn the CZYX shape on a zero-strided stand-in: the same checks and messages as
        # read_volume, without touching the pixels.
        header = _to_czyx(np.broadcast_to(np.zeros((), self.dtype), self._shape), self._axes, path, channel)
        if channels is not None and header.shape[0] != channels:
            hint = "; choose one with --channel" if channels == 1 else ""
            raise InputError(f"{path}: has {header.shape[0]} channels, the model takes {channels}{hint}")
        self.shape: tuple[int, int, int, int] = tuple(header.shape)  # type: ignore[assignment]
        self.voxel_size_um = _voxel_size(tif)
        self._channel = channel
        page_shape = tuple(series.keyframe.shape)
        outer = self._shape[: len(self._shape) - len(page_shape)]
        self._outer_axes = self._axes[: len(outer)]
        self._page_shape = page_shape
        self._offset = series.dataoffset
        if self._offset is not None:
            self.mode = "memmap"
            self._file_dtype = self.dtype.newbyteorder(tif.byteorder)
            if self._offset + int(np.prod(self._shape)) * self.dtype.itemsize > path.stat().st_size:
                raise InputError(f"{path}: truncated file (image data end past the end of the file)")
        elif self._shape[len(outer) :] == page_shape and int(np.prod(outer)) == len(series.pages) and self._z_axis() is not None:
            self.mode = "pages"
        else:
            self.mode = "whole"
            logger.warning("%s: layout %s cannot be read by planes; reading it whole", path, self._axes)
        self._whole: np.ndarray | None = None

    def _z_axis(self) -> int | None:
        """Index of the axis that _to_czyx turns into Z, among the outer (page-index) axes."""
        axes = self._outer_axes.upper()
        if "Z" in axes:
            return axes.index("Z")
        generic = [a for a in self._axes.upper() if a in "QIP"]
        if "Z" not in self._axes.upper() and len(generic) == 1 and generic[0] in axes:
            return axes.index(generic[0])
        return None

    def read(self, z0: int, z1: int, /) -> np.ndarray:
        """Planes ``z0 <= z < z1`` as a new ``(C, z1 - z0, Y, X)`` array in the file's dtype.

        Raises:
            InputError: the pixel data cannot be read (truncated or corrupt file).
        """
        try:
            return self._read(z0, z1)
        except (tifffile.TiffFileError, OSError, ValueError, IndexError) as exc:
            raise InputError(f"{self.path}: cannot read planes {z0}..{z1 - 1} ({exc})") from exc

    def _read(self, z0: int, z1: int) -> np.ndarray:
        if self.mode == "memmap":
            mapped = np.memmap(self.path, dtype=self._file_dtype, mode="r", offset=int(self._offset or 0), shape=self._shape)
            try:  # map, copy the slab, unmap: resident pages stay bounded by the slab
                view = _to_czyx(mapped, self._axes, self.path, self._channel)
                return np.array(view[:, z0:z1], dtype=self.dtype)
            finally:
                del mapped
        if self.mode == "whole":
            if self._whole is None:
                self._whole = _to_czyx(self._tif.series[0].asarray(), self._axes, self.path, self._channel)
            return np.array(self._whole[:, z0:z1])
        return self._read_pages(z0, z1)

    def _read_pages(self, z0: int, z1: int) -> np.ndarray:
        zi = self._z_axis() or 0  # mode "pages" means there is one
        outer = self._shape[: len(self._outer_axes)]
        ranges = [range(n) for n in outer]
        ranges[zi] = range(z0, z1)
        channel = self._channel
        if "C" in self._outer_axes.upper() and channel is not None:
            ci = self._outer_axes.upper().index("C")
            ranges[ci], channel = range(channel, channel + 1), None
        index = np.stack(np.meshgrid(*ranges, indexing="ij"), axis=0).reshape(len(outer), -1) if outer else np.zeros((0, 1), int)
        keys = np.ravel_multi_index(tuple(index), outer).tolist() if outer else [0]
        data = self._tif.asarray(key=keys, series=0).reshape(*[len(r) for r in ranges], *self._page_shape)
        return np.ascontiguousarray(_to_czyx(data, self._axes, self.path, channel))

    def close(self) -> None:
        self._tif.close()
        self._whole = None

    def __enter__(self) -> VolumeReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_volume(path: str | os.PathLike[str], /, *, channel: int | None = None, channels: int | None = 1) -> VolumeReader:
    """Open a 3D TIFF stack for reading by z-slabs (see :class:`VolumeReader`); arguments as :func:`read_volume`
    (``channels=None``: any channel count, for a header check before the model is known).

    Raises:
        InputError: as :func:`read_volume`, from the header alone.
    """
    p = Path(path)
    _check_file(p)
    with _CaptureLog("tifffile") as log:
        try:
            tif = tifffile.TiffFile(p)
        except (tifffile.TiffFileError, OSError, ValueError, IndexError) as exc:
            raise InputError(f"{p}: not a readable TIFF ({exc})") from exc
        try:
            _first_series(tif, p)
            log.check(p)
            return VolumeReader(p, tif, channel=channel, channels=channels)
        except BaseException:
            tif.close()
            raise


def imagej_write_kwargs(voxel: tuple[float, float, float] | None, axes: str) -> dict[str, Any]:
    """tifffile arguments for an ImageJ hyperstack of ``axes`` carrying ``voxel`` (z spacing and xy resolution, µm)."""
    meta: dict[str, Any] = {"axes": axes}
    kwargs: dict[str, Any] = {"imagej": True, "metadata": meta}
    if voxel:
        meta.update(spacing=voxel[0], unit="um")
        kwargs["resolution"] = (1.0 / voxel[2], 1.0 / voxel[1])
    return kwargs


def write_labels(
    path: str | os.PathLike[str], labels: NDArray[np.integer], /, *, voxel_size_um: tuple[float, float, float] | None = None
) -> Path:
    """Write a ``(Z, Y, X)`` label volume, zlib-compressed, as uint16 when the ids fit, else uint32.

    uint16 goes out as an ImageJ hyperstack; uint32 (which ImageJ cannot hold) as OME-TIFF. The voxel size
    travels with either.
    """
    top = int(labels.max()) if labels.size else 0
    if top < 2**16:
        data = labels.astype(np.uint16, copy=False)
        kwargs = imagej_write_kwargs(voxel_size_um, "ZYX")
    else:
        data = labels.astype(np.uint32, copy=False)
        meta: dict[str, Any] = {"axes": "ZYX"}
        if voxel_size_um:
            meta.update(PhysicalSizeZ=voxel_size_um[0], PhysicalSizeY=voxel_size_um[1], PhysicalSizeX=voxel_size_um[2])
        kwargs = {"ome": True, "metadata": meta}
    return atomic_write(path, lambda tmp: tifffile.imwrite(tmp, data, compression="zlib", **kwargs))


def write_probabilities(
    path: str | os.PathLike[str], probs: NDArray[np.float32], /, *, voxel_size_um: tuple[float, float, float] | None = None
) -> Path:
    """Write ``(C, Z, Y, X)`` float32 probabilities as an ImageJ hyperstack (stored ZCYX, as ImageJ wants)."""
    data = np.ascontiguousarray(np.transpose(probs.astype(np.float32, copy=False), (1, 0, 2, 3)))
    kwargs = imagej_write_kwargs(voxel_size_um, "ZCYX")
    return atomic_write(path, lambda tmp: tifffile.imwrite(tmp, data, compression="zlib", **kwargs))
