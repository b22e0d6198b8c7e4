"""TIFF in and out: ZYX, CZYX, ImageJ hyperstacks and OME-TIFF, keeping the voxel size.

Reading returns the volume as ``(C, Z, Y, X)`` in its own dtype plus the voxel size in micrometres.
Writing goes to a temporary name in the target folder and is renamed into place, so a failure never leaves
a half-written file behind.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from numpy.typing import NDArray

from .errors import InputError

__all__ = ["Volume", "read_volume", "write_labels", "write_probabilities", "atomic_write"]

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
    if not p.is_file():
        raise InputError(f"{p}: no such file")
    try:
        with tifffile.TiffFile(p) as tif:
            series = tif.series[0]
            data, axes = series.asarray(), series.axes
            voxel = _voxel_size(tif)
    except (tifffile.TiffFileError, OSError, ValueError, IndexError) as exc:
        raise InputError(f"{p}: not a readable TIFF ({exc})") from exc
    if data.dtype.type not in _SUPPORTED_DTYPES:
        raise InputError(f"{p}: unsupported pixel type {data.dtype}; use uint8, uint16 or float32")
    if data.size == 0:
        raise InputError(f"{p}: empty image (shape {data.shape})")
    data = _to_czyx(data, axes, p, channel)
    if data.shape[0] != channels:
        hint = "; choose one with --channel" if channels == 1 else ""
        raise InputError(f"{p}: has {data.shape[0]} channels, the model takes {channels}{hint}")
    return Volume(data=data, voxel_size_um=voxel, path=p)


def atomic_write(path: str | os.PathLike[str], write: Any, /) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it to ``path``."""
    target = Path(path)
    if not target.parent.is_dir():
        raise InputError(f"{target}: folder {target.parent} does not exist")
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def _imagej_kwargs(voxel: tuple[float, float, float] | None, axes: str) -> dict[str, Any]:
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
        kwargs = _imagej_kwargs(voxel_size_um, "ZYX")
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
    kwargs = _imagej_kwargs(voxel_size_um, "ZCYX")
    return atomic_write(path, lambda tmp: tifffile.imwrite(tmp, data, compression="zlib", **kwargs))
