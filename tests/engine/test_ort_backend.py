"""ONNX Runtime backends: ort-cpu against torch-cpu, refusal of missing/corrupt/stale ONNX, selection order.

The ort-gpu tests need onnxruntime-gpu and a CUDA device; they skip with the reason elsewhere.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_bundles import make_tiny_bundle

from engine.backends import (
    BACKEND_ORDER,
    BackendOptions,
    backend_status,
    select_backend,
)
from engine.backends.ort_backend import OrtCPUBackend, OrtGPUBackend
from engine.bundle import Bundle, load_bundle, write_bundle_json
from engine.errors import BackendUnavailableError, BundleError
from engine.labels import interior_probability
from engine.pipeline import SegmentOptions, segment
from export.bundle_export import ExportOptions, export_bundle

ENGINE_DIR = Path(__file__).resolve().parents[2] / "engine"


def _has_ort_cuda() -> bool:
    import onnxruntime

    return torch.cuda.is_available() and "CUDAExecutionProvider" in onnxruntime.get_available_providers()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    bundle = make_tiny_bundle("UNet3D", tmp_path_factory.mktemp("ort") / "tiny")
    export_bundle(bundle, options=ExportOptions(tensorrt=False))
    return load_bundle(bundle.path)


@pytest.fixture
def copy(exported: Bundle, tmp_path: Path) -> Bundle:
    shutil.copytree(exported.path, tmp_path / "tiny")
    return load_bundle(tmp_path / "tiny")


def _volume() -> np.ndarray:
    from engine.synthetic import make_membrane_volume

    return make_membrane_volume((24, 48, 48), seed=5).image


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float(np.logical_and(a, b).sum()) / max(1, int(a.sum()) + int(b.sum()))


def test_segment_with_ort_cpu_matches_torch_cpu(exported: Bundle) -> None:
    volume = _volume()
    results, seconds = {}, {}
    for name in ("torch-cpu", "ort-cpu"):
        started = time.perf_counter()
        results[name] = segment(volume, bundle=exported, options=SegmentOptions(backend=name, precision="fp32", threads=2))
        seconds[name] = time.perf_counter() - started
    assert results["ort-cpu"].report.backend == "ort-cpu" and results["ort-cpu"].report.precision == "fp32"
    masks = {k: interior_probability(r.probabilities, exported.output) > 0.5 for k, r in results.items()}
    assert _dice(masks["torch-cpu"], masks["ort-cpu"]) >= 0.999
    assert np.abs(results["torch-cpu"].probabilities - results["ort-cpu"].probabilities).max() <= 1e-4
    print(f"ort-cpu vs torch-cpu on {volume.shape}: {seconds}")


def test_ort_cpu_batches_on_cpu_tensors(exported: Bundle) -> None:
    with select_backend("ort-cpu", exported, options=BackendOptions(threads=1)) as backend:
        x = torch.randn((3, 1, *exported.patch_shape))
        y = backend.run(x)
        assert y.dtype == torch.float32 and y.device.type == "cpu" and y.shape == (3, 1, *exported.patch_shape)
        np.testing.assert_allclose(backend.run(x[1:2]).numpy(), y[1:2].numpy(), atol=1e-5, rtol=0)


def test_missing_onnx_names_the_file_and_the_fix(tmp_path: Path) -> None:
    bundle = make_tiny_bundle("UNet3D", tmp_path / "plain")
    with pytest.raises(BackendUnavailableError, match=r"model\.onnx: missing; write it with 'cellseg3d export"):
        select_backend("ort-cpu", bundle)


def test_auto_reports_why_ort_cpu_was_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = make_tiny_bundle("UNet3D", tmp_path / "plain")
    monkeypatch.setattr("engine.backends.BACKEND_ORDER", tuple(n for n in BACKEND_ORDER if n != "torch-cpu"))
    with pytest.raises(BackendUnavailableError, match=r"ort-cpu: .*model\.onnx: missing"):
        select_backend("auto", bundle)


def test_corrupt_onnx_is_refused_with_its_name(copy: Bundle) -> None:
    path = copy.path / "model.onnx"
    path.write_bytes(b"\x08\x07garbage" * 10)
    with pytest.raises(BundleError, match=r"model\.onnx: not the file bundle\.json records"):
        select_backend("ort-cpu", copy)
    unrecorded = dataclasses.replace(copy, export={})
    write_bundle_json(unrecorded)
    with pytest.raises(BundleError, match=r"model\.onnx: ONNX Runtime cannot load it"):
        select_backend("ort-cpu", load_bundle(copy.path))


def test_stale_onnx_after_new_weights_is_refused(copy: Bundle) -> None:
    torch.save({k: v + 1 for k, v in torch.load(copy.weights_path, weights_only=True).items()}, copy.weights_path)
    with pytest.raises(BundleError, match=r"model\.onnx: exported from another model\.pt"):
        select_backend("ort-cpu", copy)


def test_onnx_that_does_not_fit_the_bundle_is_refused(copy: Bundle) -> None:
    doc = json.loads((copy.path / "bundle.json").read_text())
    doc["output"]["names"] = ["a", "b"]
    doc["export"] = {}
    (copy.path / "bundle.json").write_text(json.dumps(doc))
    with pytest.raises(BundleError, match=r"model\.onnx: does not fit bundle"):
        select_backend("ort-cpu", load_bundle(copy.path))


def test_auto_order_and_status() -> None:
    assert BACKEND_ORDER == ("tensorrt", "ort-gpu", "torch-cuda", "torch-cpu", "ort-cpu")
    status = backend_status()
    assert list(status) == list(BACKEND_ORDER)
    assert status["ort-cpu"] is None and status["torch-cpu"] is None


@pytest.mark.skipif(_has_ort_cuda(), reason="checks the reason given where ort-gpu cannot run")
def test_ort_gpu_unavailable_says_why(exported: Bundle) -> None:
    reason = OrtGPUBackend.unavailable_reason()
    assert reason and ("onnxruntime-gpu" in reason or "CUDA" in reason)
    with pytest.raises(BackendUnavailableError, match="backend ort-gpu cannot run here"):
        select_backend("ort-gpu", exported)


def test_missing_onnxruntime_gives_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import now raises ImportError
    assert "pip install onnxruntime" in (OrtCPUBackend.unavailable_reason() or "")
    assert "pip install onnxruntime-gpu" in (OrtGPUBackend.unavailable_reason() or "")


def test_engine_imports_neither_export_nor_optional_runtimes() -> None:
    code = "import sys, engine, engine.cli, engine.backends; bad = [m for m in ('export', 'onnxruntime', 'tensorrt', 'tensorrt_lean', 'onnx') if m in sys.modules]; sys.exit(str(bad) if bad else 0)"
    subprocess.run([sys.executable, "-c", code], check=True)
    for path in ENGINE_DIR.rglob("*.py"):
        text = path.read_text()
        assert "from export" not in text and "import export" not in text, path
        if path.name not in ("trt_backend.py", "trt_build.py"):
            assert "import tensorrt" not in text, path
        if path.name != "ort_backend.py":
            assert "import onnxruntime" not in text, path


@pytest.mark.gpu
@pytest.mark.skipif(not _has_ort_cuda(), reason="needs CUDA and onnxruntime-gpu (CUDAExecutionProvider)")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_ort_gpu_io_binding_matches_torch(exported: Bundle, precision: str) -> None:
    with select_backend("ort-gpu", exported, options=BackendOptions(precision=precision, max_batch=4)) as backend:
        assert backend.device.type == "cuda" and backend.precision == precision
        x = torch.randn((3, 1, *exported.patch_shape), device=backend.device)
        y = backend.run(x)
        assert y.device == x.device and y.dtype == torch.float32
        model = exported.load_model().to(x.device)
        with torch.inference_mode():
            torch.backends.cudnn.allow_tf32 = False
            expected = model(x)
        tolerance = 1e-4 if precision == "fp32" else 2e-2
        assert (y - expected).abs().max().item() <= tolerance


@pytest.mark.gpu
@pytest.mark.skipif(not _has_ort_cuda(), reason="needs CUDA and onnxruntime-gpu (CUDAExecutionProvider)")
def test_ort_gpu_auto_runs_fp32_without_a_passing_fp16_gate(copy: Bundle) -> None:
    doc = json.loads((copy.path / "bundle.json").read_text())
    doc["export"]["fp16"]["gate"]["passed"] = False
    (copy.path / "bundle.json").write_text(json.dumps(doc))
    with select_backend("ort-gpu", load_bundle(copy.path)) as backend:
        assert backend.precision == "fp32" and backend.path.name == "model.onnx"
