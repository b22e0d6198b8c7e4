"""TIFF I/O: layouts, voxel size, channel choice, label dtypes, atomic writes, clear errors."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tifffile

from engine.errors import InputError
from engine.io import atomic_write, read_volume, write_labels, write_probabilities

RNG = np.random.default_rng(0)
STACK = RNG.integers(0, 4000, (6, 3, 10, 12), dtype=np.uint16)  # Z, C, Y, X


def test_plain_zyx(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "a.tif", STACK[:, 0])
    vol = read_volume(tmp_path / "a.tif")
    assert vol.data.shape == (1, 6, 10, 12) and vol.data.dtype == np.uint16
    np.testing.assert_array_equal(vol.data[0], STACK[:, 0])
    assert vol.voxel_size_um is None


def test_imagej_hyperstack_channel_and_voxel_size(tmp_path: Path) -> None:
    path = tmp_path / "ij.tif"
    tifffile.imwrite(path, STACK, imagej=True, metadata={"axes": "ZCYX", "spacing": 2.0, "unit": "um"}, resolution=(1 / 0.25, 1 / 0.5))
    vol = read_volume(path, channel=2)
    np.testing.assert_array_equal(vol.data[0], STACK[:, 2])
    assert vol.voxel_size_um == pytest.approx((2.0, 0.5, 0.25))
    with pytest.raises(InputError, match="has 3 channels.*--channel"):
        read_volume(path)
    with pytest.raises(InputError, match="channel 5 out of range"):
        read_volume(path, channel=5)


def test_ome_czyx_voxel_size(tmp_path: Path) -> None:
    path = tmp_path / "a.ome.tif"
    czyx = np.ascontiguousarray(STACK.transpose(1, 0, 2, 3))
    tifffile.imwrite(path, czyx, ome=True, metadata={"axes": "CZYX", "PhysicalSizeX": 0.3, "PhysicalSizeY": 0.4, "PhysicalSizeZ": 1.5})
    vol = read_volume(path, channel=1)
    np.testing.assert_array_equal(vol.data[0], STACK[:, 1])
    assert vol.voxel_size_um == pytest.approx((1.5, 0.4, 0.3))
    assert read_volume(path, channel=None, channels=3).data.shape == (3, 6, 10, 12)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_dtypes_kept(tmp_path: Path, dtype: type) -> None:
    tifffile.imwrite(tmp_path / "d.tif", STACK[:, 0].astype(dtype))
    assert read_volume(tmp_path / "d.tif").data.dtype == dtype


def test_rgb_needs_a_channel(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "rgb.tif", RNG.integers(0, 255, (5, 8, 8, 3), dtype=np.uint8), photometric="rgb")
    with pytest.raises(InputError, match="has 3 channels"):
        read_volume(tmp_path / "rgb.tif")
    assert read_volume(tmp_path / "rgb.tif", channel=0).data.shape == (1, 5, 8, 8)


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        read_volume(tmp_path / "missing.tif")
    (tmp_path / "junk.tif").write_bytes(b"this is not a tiff")
    with pytest.raises(InputError, match="not a readable TIFF"):
        read_volume(tmp_path / "junk.tif")
    tifffile.imwrite(tmp_path / "flat.tif", STACK[0, 0])
    with pytest.raises(InputError, match="2D image"):
        read_volume(tmp_path / "flat.tif")
    full = tmp_path / "trunc.tif"
    tifffile.imwrite(full, STACK[:, 0])
    full.write_bytes(full.read_bytes()[:300])
    with pytest.raises(InputError, match="trunc.tif"):
        read_volume(full)


@pytest.mark.parametrize("top, dtype", [(1000, np.uint16), (70000, np.uint32)])
def test_labels_round_trip_with_dtype_and_voxel_size(tmp_path: Path, top: int, dtype: type) -> None:
    labels = np.zeros((4, 8, 8), np.uint32)
    labels[1, 2, 3], labels[2, 5, 5] = 7, top
    path = write_labels(tmp_path / "l.tif", labels, voxel_size_um=(2.0, 0.5, 0.5))
    with tifffile.TiffFile(path) as tif:
        assert tif.pages.first.compression != 1  # compressed
        data = tif.series[0].asarray()
    assert data.dtype == dtype
    np.testing.assert_array_equal(data, labels)
    assert read_volume(path).voxel_size_um == pytest.approx((2.0, 0.5, 0.5))
    assert [p.name for p in tmp_path.iterdir()] == ["l.tif"]


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    def half_then_fail(tmp: str) -> None:
        Path(tmp).write_bytes(b"II*\x00 half a tiff")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(tmp_path / "x.tif", half_then_fail)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(InputError, match="does not exist"):
        write_labels(tmp_path / "nope" / "x.tif", np.zeros((2, 3, 3), np.uint32))


def test_probabilities_round_trip(tmp_path: Path) -> None:
    probs = RNG.random((2, 4, 6, 5), dtype=np.float32)
    path = write_probabilities(tmp_path / "p.tif", probs)
    back = read_volume(path, channels=2)
    np.testing.assert_array_equal(back.data, probs)


def test_written_files_get_the_umask_permissions_not_mkstemps_private_ones(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        path = write_labels(tmp_path / "l.tif", np.ones((2, 3, 3), np.uint32))
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
