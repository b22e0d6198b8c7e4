"""Shared fixtures: tiny bundles with random weights, made on the fly (no downloads)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from engine.bundle import Bundle, Normalization, OutputSpec, PostprocessSpec, make_bundle


def tiny_template(path: Path, **overrides: object) -> Bundle:
    """A 3-level UNet3D with 8 features: fast enough for CPU tests on odd shapes."""
    fields = dict(
        path=path,
        name="tiny",
        architecture="UNet3D",
        arch_kwargs={"in_channels": 1, "out_channels": 2, "f_maps": 8, "num_levels": 3},
        in_channels=1,
        normalization=Normalization(kind="percentile", low=1.0, high=99.8),
        output=OutputSpec(kind="boundary", channel=0, names=("boundary", "foreground")),
        patch_shape=(16, 32, 32),
        overlap=0.25,
        postprocess=PostprocessSpec(method="watershed", threshold=0.5, min_dist=3, label_threshd=5),
    )
    fields.update(overrides)
    return Bundle(**fields)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    out = tmp_path_factory.mktemp("tiny_bundle")
    return make_bundle(None, out, template=tiny_template(out))


@pytest.fixture
def blob_tiff(tmp_path: Path) -> Path:
    """A small ZYX uint16 stack with a few bright blobs, written as an ImageJ TIFF with voxel size."""
    rng = np.random.default_rng(1)
    z, y, x = np.mgrid[:20, :40, :44]
    img = np.zeros((20, 40, 44), np.float32)
    for cz, cy, cx in [(6, 10, 10), (12, 28, 30), (10, 12, 32)]:
        img += np.exp(-((z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2) / 20.0)
    img = (img * 3000 + rng.normal(200, 20, img.shape)).clip(0, 65535).astype(np.uint16)
    path = tmp_path / "blobs.tif"
    tifffile.imwrite(path, img, imagej=True, metadata={"axes": "ZYX", "spacing": 2.0, "unit": "um"}, resolution=(1 / 0.5, 1 / 0.5))
    return path
