"""Reading TIFF stacks by z-slabs (memory-mapped or page by page) and writing them page by page."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import tifffile

from engine.atomic import temp_beside
from engine.errors import InputError
from engine.io import open_volume, read_volume, write_labels
from engine.tiff_stream import ProbabilityWriter, write_labels_stream

RNG = np.random.default_rng(0)
STACK = RNG.integers(0, 4000, (7, 3, 10, 12), dtype=np.uint16)  # Z, C, Y, X

LAYOUTS = {
    "zyx": (lambda p, c: tifffile.imwrite(p, STACK[:, 0], compression=c), {}),
    "imagej-zcyx": (lambda p, c: tifffile.imwrite(p, STACK, imagej=True, metadata={"axes": "ZCYX"}, compression=c), {"channel": 2}),
    "ome-czyx": (lambda p, c: tifffile.imwrite(p, STACK.transpose(1, 0, 2, 3).copy(), ome=True, metadata={"axes": "CZYX"}, compression=c), {"channel": 1}),
    "ome-3-channels": (lambda p, c: tifffile.imwrite(p, STACK.transpose(1, 0, 2, 3).copy(), ome=True, metadata={"axes": "CZYX"}, compression=c), {"channels": 3}),
    "rgb": (lambda p, c: tifffile.imwrite(p, RNG.integers(0, 255, (5, 8, 8, 3), dtype=np.uint8), photometric="rgb", compression=c), {"channel": 1}),
    "tiled": (lambda p, c: tifffile.imwrite(p, STACK[:, 0], tile=(16, 16), compression=c), {}),
    "volumetric-tiles": (lambda p, c: tifffile.imwrite(p, STACK[:, 0], tile=(2, 16, 16), compression=c), {}),
    "bigtiff-big-endian": (lambda p, c: tifffile.imwrite(p, STACK[:, 0], bigtiff=True, byteorder=">", compression=c), {}),
    "float32": (lambda p, c: tifffile.imwrite(p, STACK[:, 0].astype(np.float32), compression=c), {}),
}


@pytest.mark.parametrize("compression", [None, "zlib"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_slabs_equal_the_whole_read(tmp_path: Path, layout: str, compression: str | None) -> None:
    write, kwargs = LAYOUTS[layout]
    path = tmp_path / "s.tif"
    write(path, compression)
    whole = read_volume(path, **kwargs)
    with open_volume(path, **kwargs) as reader:
        expected_mode = "whole" if layout == "volumetric-tiles" else ("memmap" if compression is None and layout != "tiled" else "pages")
        assert reader.mode == expected_mode
        assert reader.shape == whole.data.shape and reader.dtype == whole.data.dtype
        z = reader.shape[1]
        slabs = [reader.read(a, min(z, a + 3)) for a in range(0, z, 3)]
    got = np.concatenate(slabs, axis=1)
    assert got.flags.c_contiguous and got.dtype == whole.data.dtype
    np.testing.assert_array_equal(got, whole.data)


def test_header_errors_match_read_volume(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "ij.tif", STACK, imagej=True, metadata={"axes": "ZCYX"})
    with pytest.raises(InputError, match="has 3 channels.*--channel"):
        open_volume(tmp_path / "ij.tif")
    with pytest.raises(InputError, match="channel 5 out of range"):
        open_volume(tmp_path / "ij.tif", channel=5)
    tifffile.imwrite(tmp_path / "flat.tif", STACK[0, 0])
    with pytest.raises(InputError, match="2D image"):
        open_volume(tmp_path / "flat.tif")
    with pytest.raises(InputError, match="no such file"):
        open_volume(tmp_path / "missing.tif")
    (tmp_path / "junk.tif").write_bytes(b"not a tiff at all")
    with pytest.raises(InputError, match="not a readable TIFF"):
        open_volume(tmp_path / "junk.tif")


def test_truncated_contiguous_file_is_caught_at_open(tmp_path: Path) -> None:
    path = tmp_path / "t.tif"
    tifffile.imwrite(path, STACK[:, 0])  # header and first IFD, then the 1680 data bytes from offset 256
    path.write_bytes(path.read_bytes()[:1200])
    with pytest.raises(InputError, match="truncated"):
        open_volume(path)


def test_voxel_size_is_read_from_the_header(tmp_path: Path) -> None:
    path = tmp_path / "v.tif"
    tifffile.imwrite(path, STACK[:, 0], imagej=True, metadata={"axes": "ZYX", "spacing": 2.0, "unit": "um"}, resolution=(4.0, 2.0))
    with open_volume(path) as reader:
        assert reader.voxel_size_um == pytest.approx((2.0, 0.5, 0.25))


@pytest.mark.parametrize("top", [1000, 70000])
def test_streamed_labels_match_write_labels(tmp_path: Path, top: int) -> None:
    labels = RNG.integers(0, top, (9, 16, 20)).astype(np.uint32)
    labels[0, 0, 0] = top
    a = write_labels(tmp_path / "a.tif", labels, voxel_size_um=(2.0, 0.5, 0.5))
    b = write_labels_stream(tmp_path / "b.tif", iter([labels[:4], labels[4:5], labels[5:]]), shape=labels.shape, max_label=top,
                            voxel_size_um=(2.0, 0.5, 0.5))
    for path in (a, b):
        back = read_volume(path)
        np.testing.assert_array_equal(back.data[0], labels)
        assert back.voxel_size_um == pytest.approx((2.0, 0.5, 0.5))
    with tifffile.TiffFile(a) as ta, tifffile.TiffFile(b) as tb:
        assert (ta.is_imagej, ta.is_ome, ta.series[0].dtype) == (tb.is_imagej, tb.is_ome, tb.series[0].dtype)


def test_probability_writer_commits_or_leaves_nothing(tmp_path: Path) -> None:
    probs = RNG.random((2, 6, 8, 9), dtype=np.float32)
    writer = ProbabilityWriter(tmp_path / "p.tif", shape=probs.shape, voxel_size_um=(1.0, 0.5, 0.5))
    writer.write(probs[:, :2])
    writer.write(probs[:, 2:])
    assert not (tmp_path / "p.tif").exists()
    writer.commit()
    back = read_volume(tmp_path / "p.tif", channels=2)
    np.testing.assert_array_equal(back.data, probs)
    assert back.voxel_size_um == pytest.approx((1.0, 0.5, 0.5))

    aborted = ProbabilityWriter(tmp_path / "q.tif", shape=probs.shape, voxel_size_um=None)
    aborted.write(probs[:, :2])
    aborted.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.tif"]

    short = ProbabilityWriter(tmp_path / "r.tif", shape=probs.shape, voxel_size_um=None)
    short.write(probs[:, :2])
    with pytest.raises(Exception):  # fewer planes than announced: tifffile's error surfaces here
        short.commit()
    short.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.tif"]


class _SignalOnStart(threading.Thread):
    """A thread whose start() is where a signal lands (the writer's thread start waits on an event: a Python wait)."""

    def start(self) -> None:
        raise KeyboardInterrupt


def test_probability_writer_interrupted_while_starting_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # CI once kept `.p.tif.XXXX.tmp` after a SIGTERM: the signal landed while the writer was being made, before
    # the caller held a writer to abort
    monkeypatch.setattr("engine.tiff_stream.threading.Thread", _SignalOnStart)
    with pytest.raises(KeyboardInterrupt):
        ProbabilityWriter(tmp_path / "p.tif", shape=(1, 2, 3, 4), voxel_size_um=None)
    assert list(tmp_path.iterdir()) == []


def test_temp_beside_interrupted_after_creating_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*_args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("engine.atomic.os.chmod", interrupted)
    with pytest.raises(KeyboardInterrupt):
        temp_beside(tmp_path / "p.tif")
    assert list(tmp_path.iterdir()) == []
