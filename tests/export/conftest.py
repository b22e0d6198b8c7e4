"""Exported tiny bundles shared by the export tests (exported once per session; tests that change files copy them)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from tiny_bundles import ARCHITECTURES, make_tiny_bundle

from engine.bundle import Bundle, load_bundle
from export.bundle_export import ExportOptions, export_bundle


@pytest.fixture(scope="session", params=ARCHITECTURES)
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    """A tiny bundle of each architecture with model.onnx and model.fp16.onnx written (no TensorRT)."""
    bundle = make_tiny_bundle(request.param, tmp_path_factory.mktemp(f"tiny-{request.param}"))
    summary = export_bundle(bundle, options=ExportOptions(tensorrt=False))
    assert summary.ok, summary.lines
    return load_bundle(bundle.path)


@pytest.fixture
def exported_copy(exported: Bundle, tmp_path: Path) -> Bundle:
    """A private copy of ``exported`` that a test may damage."""
    target = tmp_path / exported.path.name
    shutil.copytree(exported.path, target)
    return load_bundle(target)
