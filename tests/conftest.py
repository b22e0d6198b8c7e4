"""Shared fixtures: tiny bundles with random weights, made on the fly (no downloads)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from tiny_bundles import tiny_template

from engine.bundle import Bundle, make_bundle


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    out = tmp_path_factory.mktemp("tiny_bundle")
    torch.manual_seed(0)  # the same weights whichever tests ran first (the bf16 test's Dice depended on the order)
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
