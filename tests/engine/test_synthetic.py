from __future__ import annotations

import math
import os

import numpy as np
import pytest
import tifffile
from scipy import ndimage as ndi
from skimage.measure import label as label_components

import engine.synthetic as synthetic
from engine.errors import InputError
from engine.synthetic import SyntheticVolume, make_membrane_volume, make_nuclei_volume, write_sample

SMALL = (16, 40, 48)


def _boundary(labels: np.ndarray) -> np.ndarray:
    """Voxels with a face neighbour of another label (either side)."""
    mask = np.zeros(labels.shape, dtype=bool)
    for axis in range(labels.ndim):
        differs = np.diff(labels, axis=axis) != 0
        lo = [slice(None)] * labels.ndim
        hi = [slice(None)] * labels.ndim
        lo[axis], hi[axis] = slice(0, -1), slice(1, None)
        mask[tuple(lo)] |= differs
        mask[tuple(hi)] |= differs
    return mask


@pytest.mark.parametrize("make", [make_membrane_volume, make_nuclei_volume])
def test_same_seed_same_volume_other_seed_differs(make) -> None:
    a = make(SMALL, seed=3)
    b = make(SMALL, seed=3)
    c = make(SMALL, seed=4)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not np.array_equal(a.image, c.image)
    assert not np.array_equal(a.labels, c.labels)
    assert a.seed == 3


@pytest.mark.parametrize("dtype", ["uint8", "uint16", np.uint16])
@pytest.mark.parametrize(("make", "kind"), [(make_membrane_volume, "membrane"), (make_nuclei_volume, "nuclei")])
def test_shape_and_dtypes(make, kind, dtype) -> None:
    shape = (9, 33, 20)
    vol = make(shape, seed=0, dtype=dtype)
    assert isinstance(vol, SyntheticVolume)
    assert vol.kind == kind
    assert vol.image.shape == shape and vol.labels.shape == shape
    assert vol.image.dtype == np.dtype(dtype)
    assert vol.labels.dtype == np.uint32
    assert vol.image.max() > vol.image.min()
    if np.dtype(dtype) == np.uint8:
        assert vol.image.max() <= 255


def test_membrane_labels_are_space_filling_consecutive_and_connected() -> None:
    labels = make_membrane_volume((24, 64, 64), seed=1).labels
    n = int(labels.max())
    np.testing.assert_array_equal(np.unique(labels), np.arange(1, n + 1))
    # one 6-connected piece per cell
    assert label_components(labels, connectivity=1, background=0).max() == n


@pytest.mark.parametrize("seed", [0, 7])
def test_cell_size_matches_requested_diameter(seed: int) -> None:
    diameter = 14.0
    labels = make_membrane_volume((32, 96, 96), seed=seed, mean_cell_diameter=diameter).labels
    sizes = np.bincount(labels.ravel())[1:]
    inner = np.array(
        [all(s.start > 0 and s.stop < n for s, n in zip(obj, labels.shape)) for obj in ndi.find_objects(labels)]
    )
    assert inner.sum() >= 30
    expected = math.pi / 6.0 * diameter**3
    assert 0.7 < sizes[inner].mean() / expected < 1.3
    assert sizes[inner].std() / sizes[inner].mean() > 0.15  # sizes vary


def test_membranes_brighter_than_cell_interiors() -> None:
    vol = make_membrane_volume((24, 64, 64), seed=2)
    border = _boundary(vol.labels)
    interior = ndi.distance_transform_edt(~border) > 3
    image = vol.image.astype(np.float64)
    assert image[border].mean() > 1.8 * image[interior].mean()


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_membranes_drawn_on_both_sides_of_each_interface(axis: int) -> None:
    # each cell's outermost layer is membrane (one plasma membrane per cell), so across every interface the
    # voxel on the low side and the one on the high side are equally bright (measured within 3 %; a membrane
    # drawn on one side only makes that side 9 % brighter along z and 20 % along y and x, after the blur),
    # and both are brighter than cell interiors
    vol = make_membrane_volume((24, 64, 64), seed=2)
    image = vol.image.astype(np.float64)
    lo = [slice(None)] * 3
    hi = [slice(None)] * 3
    lo[axis], hi[axis] = slice(0, -1), slice(1, None)
    interface = np.diff(vol.labels.astype(np.int64), axis=axis) != 0
    low_side, high_side = image[tuple(lo)][interface].mean(), image[tuple(hi)][interface].mean()
    assert 0.95 < low_side / high_side < 1.05, (low_side, high_side)
    interior = ndi.distance_transform_edt(~_boundary(vol.labels)) > 3
    assert min(low_side, high_side) > 1.8 * image[interior].mean()


def test_voxel_scale_changes_cell_count() -> None:
    counts = [int(make_membrane_volume((24, 64, 64), seed=5, voxel_scale=s).labels.max()) for s in (0.75, 1.0, 1.5)]
    assert counts[0] > counts[1] > counts[2]
    assert counts[0] > 2 * counts[2]


def test_nuclei_separate_on_dark_background() -> None:
    vol = make_nuclei_volume((24, 80, 80), seed=0)
    labels = vol.labels
    n = int(labels.max())
    assert n >= 10
    np.testing.assert_array_equal(np.unique(labels), np.arange(0, n + 1))
    assert label_components(labels > 0, connectivity=3).max() == n  # no two nuclei touch
    image = vol.image.astype(np.float64)
    assert image[labels > 0].mean() > 3 * image[labels == 0].mean()


@pytest.mark.parametrize(("kind", "dtype"), [("membrane", "uint16"), ("nuclei", "uint8")])
def test_write_sample_writes_imagej_tiffs(tmp_path, kind, dtype) -> None:
    shape = (10, 24, 32)
    image_path, labels_path = write_sample(tmp_path / "vol.tif", kind=kind, shape=shape, seed=1, dtype=dtype)
    assert image_path == tmp_path / "vol.tif"
    assert labels_path == tmp_path / "vol_labels.tif"
    assert sorted(os.listdir(tmp_path)) == ["vol.tif", "vol_labels.tif"]
    expected = (make_membrane_volume if kind == "membrane" else make_nuclei_volume)(shape, seed=1, dtype=dtype)
    with tifffile.TiffFile(image_path) as tif:
        assert tif.is_imagej
        assert tif.series[0].axes == "ZYX"
        assert tif.imagej_metadata["spacing"] == 1.0
        np.testing.assert_array_equal(tif.asarray(), expected.image)
    with tifffile.TiffFile(labels_path) as tif:
        assert tif.series[0].axes == "ZYX"
        np.testing.assert_array_equal(tif.asarray().astype(np.uint32), expected.labels)


def test_write_sample_failure_leaves_no_file(tmp_path, monkeypatch) -> None:
    real_imwrite = tifffile.imwrite
    calls = []

    def failing_imwrite(path, data, **kwargs):
        calls.append(path)
        if len(calls) == 2:  # the labels file: write part of it, then fail
            with open(path, "wb") as handle:
                handle.write(b"II*\x00partial")
            raise OSError("disk full")
        return real_imwrite(path, data, **kwargs)

    monkeypatch.setattr(synthetic.tifffile, "imwrite", failing_imwrite)
    with pytest.raises(OSError, match="disk full"):
        write_sample(tmp_path / "vol.tif", shape=(8, 16, 16))
    assert len(calls) == 2
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"shape": (8, 16)}, r"shape must be 3 ints.*\(8, 16\)"),
        ({"shape": (4, 64, 64)}, r">= 8, got \(4, 64, 64\)"),
        ({"shape": (8.0, 16, 16)}, r"shape must be 3 ints"),
        ({"shape": 64}, r"got 64"),
        ({"seed": -1}, r"seed must be a non-negative int, got -1"),
        ({"seed": 1.5}, r"got 1.5"),
        ({"dtype": "float32"}, r"dtype must be one of \('uint8', 'uint16'\), got 'float32'"),
        ({"voxel_scale": 0}, r"voxel_scale must be a finite number > 0, got 0"),
        ({"mean_cell_diameter": 2.0}, r"mean_cell_diameter \* voxel_scale must be >= 4"),
    ],
)
def test_bad_generator_arguments(kwargs, match) -> None:
    args = {"shape": (8, 16, 16), "seed": 0} | kwargs
    shape = args.pop("shape")
    with pytest.raises(InputError, match=match):
        make_membrane_volume(shape, **args)


def test_bad_nuclei_diameter() -> None:
    with pytest.raises(InputError, match="mean_nucleus_diameter must be a finite number > 0, got nan"):
        make_nuclei_volume((8, 16, 16), seed=0, mean_nucleus_diameter=float("nan"))


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("vol.tif", {"kind": "cells"}, r"kind must be one of \('membrane', 'nuclei'\), got 'cells'"),
        ("vol.png", {}, r"vol.png: the file name must end in '.tif' or '.tiff'"),
        ("missing/vol.tif", {}, r"does not exist"),
        ("vol.tif", {"shape": (8, 8, 7)}, r"got \(8, 8, 7\)"),
    ],
)
def test_bad_write_sample_arguments(tmp_path, name, kwargs, match) -> None:
    with pytest.raises(InputError, match=match):
        write_sample(tmp_path / name, **kwargs)
    assert os.listdir(tmp_path) == []
