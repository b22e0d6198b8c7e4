"""End to end on tiny random bundles: segment and segment_file, reports, bad input, nothing written on failure."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from engine import BackendUnavailableError, InputError, SegmentOptions, segment, segment_file
from engine.backends import backend_status
from engine.backends.torch_backend import cpu_has_native_bf16
from engine.metrics import foreground_dice


def test_segment_file_writes_labels_with_shape_and_voxel_size(tiny_bundle, blob_tiff: Path, tmp_path: Path) -> None:
    out, prob = tmp_path / "labels.tif", tmp_path / "prob.tif"
    seen: list[tuple[int, int]] = []
    result = segment_file(blob_tiff, out, bundle=tiny_bundle, prob_path=prob, progress=lambda d, t: seen.append((d, t)))
    with tifffile.TiffFile(out) as tif:
        labels = tif.series[0].asarray()
        assert tif.imagej_metadata["spacing"] == pytest.approx(2.0)
    assert labels.shape == (20, 40, 44) and labels.dtype == np.uint16
    assert int(labels.max()) == result.n_cells
    assert tifffile.imread(prob).shape == (20, 2, 40, 44)
    report = result.report
    assert report.backend == "torch-cpu" and report.patch_shape == (16, 32, 32)
    assert {"read", "normalize", "load", "infer", "postprocess", "write"} <= set(report.timings)
    assert seen and seen[-1][0] == seen[-1][1] == report.n_patches
    assert "torch-cpu" in report.summary()


def test_segment_file_holds_the_probabilities_only_when_it_writes_them(tiny_bundle, blob_tiff: Path, tmp_path: Path) -> None:
    """A file run keeps no float copy of the volume it was not asked for (one slab here); asked for, it
    returns the map it wrote."""
    plain = segment_file(blob_tiff, tmp_path / "a.tif", bundle=tiny_bundle)
    asked = segment_file(blob_tiff, tmp_path / "b.tif", bundle=tiny_bundle, prob_path=tmp_path / "p.tif")
    assert plain.report.n_slabs == asked.report.n_slabs == 1 and plain.probabilities is None
    np.testing.assert_array_equal(asked.probabilities, np.moveaxis(tifffile.imread(tmp_path / "p.tif"), 1, 0))
    np.testing.assert_array_equal(plain.labels, asked.labels)


def test_options_override_bundle(tiny_bundle) -> None:
    volume = np.random.default_rng(0).random((12, 30, 30)).astype(np.float32)
    result = segment(volume, bundle=tiny_bundle, options=SegmentOptions(patch_shape=(8, 16, 16), overlap=0.5, batch_size=3, precision="fp32"))
    assert result.report.patch_shape == (8, 16, 16) and result.report.batch_size == 3
    assert result.report.precision == "fp32"
    assert result.probabilities.shape == (2, 12, 30, 30)


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="CPU has no native bf16")
def test_bf16_matches_fp32_foreground(tiny_bundle) -> None:
    volume = np.random.default_rng(0).random((16, 32, 32)).astype(np.float32)
    fp32 = segment(volume, bundle=tiny_bundle, options=SegmentOptions(precision="fp32"))
    bf16 = segment(volume, bundle=tiny_bundle, options=SegmentOptions(precision="bf16"))
    assert bf16.report.precision == "bf16"
    assert np.abs(fp32.probabilities - bf16.probabilities).max() < 0.05
    assert foreground_dice(fp32.probabilities[0] > 0.5, bf16.probabilities[0] > 0.5) >= 0.95


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: p.write_bytes(b"not a tiff"), "not a readable TIFF"),
        (lambda p: tifffile.imwrite(p, np.zeros((20, 20), np.uint8)), "2D image"),
        (lambda p: tifffile.imwrite(p, np.full((8, 20, 20), 9, np.uint8)), "constant"),
        (lambda p: tifffile.imwrite(p, np.zeros((4, 8, 8, 3), np.uint8), photometric="rgb"), "3 channels"),
        (lambda p: tifffile.imwrite(p, np.full((8, 20, 20), np.nan, np.float32)), "NaN"),
        (lambda p: tifffile.imwrite(p, np.zeros((0, 20, 20), np.uint8)), "empty image"),
    ],
)
def test_bad_input_writes_nothing(tiny_bundle, tmp_path: Path, make, match: str) -> None:
    src = tmp_path / "in.tif"
    make(src)
    with pytest.raises(InputError, match=match):
        segment_file(src, tmp_path / "out.tif", bundle=tiny_bundle)
    assert not (tmp_path / "out.tif").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.tif"]


def test_bad_options(tiny_bundle) -> None:
    volume = np.random.default_rng(0).random((8, 16, 16)).astype(np.float32)
    with pytest.raises(InputError, match="multiples of 4"):
        segment(volume, bundle=tiny_bundle, options=SegmentOptions(patch_shape=(6, 16, 16)))
    with pytest.raises(InputError, match="threshold"):
        segment(volume, bundle=tiny_bundle, options=SegmentOptions(threshold=2.0))
    with pytest.raises(BackendUnavailableError, match="runs"):
        segment(volume, bundle=tiny_bundle, options=SegmentOptions(backend="torch-cpu", precision="fp16"))


@pytest.mark.skipif(backend_status()["torch-cuda"] is None, reason="this machine has CUDA")
def test_explicit_unavailable_backend_says_why(tiny_bundle) -> None:
    with pytest.raises(BackendUnavailableError, match="torch-cuda cannot run here: .*no CUDA"):
        segment(np.random.default_rng(0).random((8, 16, 16)), bundle=tiny_bundle, options=SegmentOptions(backend="torch-cuda"))


@pytest.mark.parametrize("how", ["same path", "symlink", "hard link", "prob onto labels"])
def test_outputs_never_replace_the_input_or_each_other(tiny_bundle, blob_tiff, tmp_path, how) -> None:
    import hashlib
    import os

    before = hashlib.sha256(blob_tiff.read_bytes()).hexdigest()
    out, prob = tmp_path / "out.tif", None
    if how == "same path":
        out = blob_tiff
    elif how == "symlink":
        os.symlink(blob_tiff, out)
    elif how == "hard link":
        os.link(blob_tiff, out)
    else:
        prob = out
    with pytest.raises(InputError, match="input image|also the output"):
        segment_file(blob_tiff, out, bundle=tiny_bundle, prob_path=prob)
    assert hashlib.sha256(blob_tiff.read_bytes()).hexdigest() == before
    assert how in ("symlink", "hard link") or not out.exists() or out == blob_tiff
