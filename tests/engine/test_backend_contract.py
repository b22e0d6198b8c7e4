"""The backend contract: Backend.run checks what every backend needs and calls the backend's forward; auto
skips a backend whose constructor finds the bundle unusable; TensorRT's plan is checked against the bundle's
output shape and prepared before streaming (the TensorRT parts run without a GPU on plan stand-ins)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from api_names import load_snapshot, snapshot_enum
from tiny_bundles import make_tiny_bundle

from engine.backends import Backend, BackendOptions, select_backend
from engine.backends.engine_key import EngineKey, PlanRecord, Profile
from engine.backends.ort_backend import OrtGPUBackend
from engine.backends.trt_backend import TensorRTBackend
from engine.backends.trt_runtime import TrtEngine, check_io
from engine.bundle import Bundle, load_bundle
from engine.errors import BundleError, InputError
from export.bundle_export import ExportOptions, export_bundle


class Scaled(Backend):
    """``2 * x`` on the CPU, or a wrong output shape when ``channels`` is not the bundle's."""

    name: ClassVar[str] = "scaled"
    precisions: ClassVar[tuple[str, ...]] = ("fp32",)

    def __init__(self, bundle: Bundle, /, *, channels: int = 1) -> None:
        super().__init__(bundle, options=BackendOptions())
        self.channels, self.seen = channels, []

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return None

    def forward(self, batch: torch.Tensor, /) -> torch.Tensor:
        self.seen.append(batch.is_contiguous())
        return 2 * batch[:, :1].expand(-1, self.channels, -1, -1, -1).contiguous()


@pytest.fixture
def bundle(tmp_path: Path) -> Bundle:
    return make_tiny_bundle("UNet3D", tmp_path / "tiny")


def test_run_checks_the_batch_and_makes_it_contiguous(bundle: Bundle) -> None:
    backend = Scaled(bundle)
    x = torch.randn((2, 1, 8, 8, 8)).transpose(2, 4)
    assert torch.equal(backend.run(x), 2 * x) and backend.seen == [True]
    for bad, what in ((x.double(), "float64"), (x[:, :, :, :, :1].squeeze(4), r"\(2, 1, 8, 8\)"), (torch.zeros((1, 2, 4, 4, 4)), r"\(1, 2, 4")):
        with pytest.raises(InputError, match=rf"backend scaled takes \(N, 1, Z, Y, X\) float32 on cpu, got .*{what}"):
            backend.run(bad)


def test_run_refuses_an_output_that_does_not_fit_the_bundle(bundle: Bundle) -> None:
    with pytest.raises(RuntimeError, match=r"returned \(1, 3, 4, 4, 4\).*expected \(1, 1, 4, 4, 4\)"):
        Scaled(bundle, channels=3).run(torch.zeros((1, 1, 4, 4, 4)))


def test_prepare_checks_its_arguments(bundle: Bundle) -> None:
    backend = Scaled(bundle)
    backend.prepare((16, 32, 32), 4)
    assert backend.prepared == ((16, 32, 32), 4)
    with pytest.raises(InputError, match="prepare needs 3 positive patch sides"):
        backend.prepare((16, 32), 4)


def test_auto_skips_a_backend_whose_bundle_files_are_bad_and_an_explicit_choice_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    bundle = make_tiny_bundle("UNet3D", tmp_path / "tiny")
    export_bundle(bundle, options=ExportOptions(tensorrt=False))
    (bundle.path / "model.onnx").write_bytes(b"stale")  # not the file bundle.json records: a BundleError
    bundle = load_bundle(bundle.path)
    monkeypatch.setattr("engine.backends.BACKEND_ORDER", ("ort-cpu", "torch-cpu"))
    with select_backend("auto", bundle) as backend:
        assert backend.name == "torch-cpu"
    assert "backend ort-cpu skipped" in caplog.text and "not the file bundle.json records" in caplog.text
    with pytest.raises(BundleError, match=r"model\.onnx: not the file bundle\.json records"):
        select_backend("ort-cpu", bundle)


# --- TensorRT: the plan's shapes against the bundle, and prepare before streaming -------------------------

_DATA_TYPE = snapshot_enum(load_snapshot()["tensorrt_lean"], "DataType")
PROFILE = Profile(channels=1, patch_shape=(16, 32, 32), min_spatial=(4, 4, 4), opt_batch=2, max_batch=4)


class PlanStandIn:
    """What an ICudaEngine and its IExecutionContext answer, for a plan with ``out_channels`` outputs."""

    def __init__(self, out_channels: int) -> None:
        self.k, self.num_io_tensors, self.shape = out_channels, 2, None

    def get_tensor_name(self, index: int) -> str:
        return ("input", "output")[index]

    def get_tensor_dtype(self, name: str) -> Any:
        return _DATA_TYPE.FLOAT

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        if self.shape is None:
            return (-1, 1 if name == "input" else self.k, -1, -1, -1)
        return self.shape if name == "input" else (self.shape[0], self.k, *self.shape[2:])

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        self.shape = shape
        return True


def test_a_plan_with_another_output_shape_is_refused_before_it_can_write(bundle: Bundle) -> None:
    trt = type("trt", (), {"DataType": _DATA_TYPE})
    check_io(trt, PlanStandIn(1), where="p.plan", channels=(1, 1))
    with pytest.raises(BundleError, match=r"p\.plan: plan tensor 'output' has shape \(-1, 2, -1, -1, -1\)"):
        check_io(trt, PlanStandIn(2), where="p.plan", channels=(1, 1))
    engine = object.__new__(TrtEngine)
    engine.context, engine.out_channels, engine.profile = PlanStandIn(3), 1, PROFILE
    with pytest.raises(BundleError, match=r"gives output \(2, 3, 8, 8, 8\) for input \(2, 1, 8, 8, 8\), the bundle needs \(2, 1, 8, 8, 8\)"):
        engine._run_chunk(torch.zeros((2, 1, 8, 8, 8)))


def _prepared_backend(bundle: Bundle) -> TensorRTBackend:
    backend = object.__new__(TensorRTBackend)  # the plan logic only; construction needs a GPU
    backend.bundle, backend.options, backend.prepared = bundle, BackendOptions(max_batch=4), None
    key = EngineKey(compute_capability=(9, 0), tensorrt_version="11.4.0", onnx_sha256="ab" * 32, profile=PROFILE)
    backend.record = PlanRecord(plan_path=Path("p.plan"), json_path=Path("p.json"), key=key, meta={})
    return backend


def test_prepare_keeps_a_plan_that_covers_the_run_and_then_refuses_to_build_mid_run(bundle: Bundle) -> None:
    backend = _prepared_backend(bundle)
    backend.prepare((16, 32, 32), 4)  # covered: no plan is loaded or built
    with pytest.raises(InputError, match=r"p\.plan: prepared for patches up to \(16, 32, 32\), got \(32, 32, 32\)"):
        backend.forward(torch.zeros((1, 1, 32, 32, 32)))


def test_tensorrt_plans_are_fixed_patch_engines(bundle: Bundle) -> None:
    assert not TensorRTBackend.can_grow_patch and select_backend("torch-cpu", bundle).can_grow_patch


def test_install_hints_name_the_cuda_specific_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setitem(sys.modules, "tensorrt_lean", None)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    reason = TensorRTBackend.unavailable_reason() or ""
    assert "pip install tensorrt-cu12" in reason and "tensorrt-lean-cu12" in reason and "pip install tensorrt " not in reason
    assert "pip install onnxruntime-gpu (the build for this machine's CUDA major: 'onnxruntime-gpu<1.27' for CUDA 12" in (OrtGPUBackend.unavailable_reason() or "")


def _full_tensorrt_and_gpu() -> str | None:
    from engine.backends.trt_build import import_tensorrt

    trt, can_build = import_tensorrt()
    if trt is None or not can_build:
        return "needs the full tensorrt package (pip install tensorrt-cu12)"
    return None if torch.cuda.is_available() else "needs a CUDA GPU"


@pytest.mark.tensorrt
@pytest.mark.skipif(_full_tensorrt_and_gpu() is not None, reason=_full_tensorrt_and_gpu() or "")
def test_prepare_builds_the_plan_before_streaming_on_a_gpu(tmp_path: Path) -> None:
    bundle = make_tiny_bundle("UNet3D", tmp_path / "tiny")
    assert export_bundle(bundle, options=ExportOptions(max_batch=2)).ok
    with select_backend("tensorrt", load_bundle(bundle.path), options=BackendOptions(max_batch=2)) as backend:
        first = backend.record.plan_path
        backend.prepare((16, 64, 64), 2)  # larger than the exported plan's patch: a new plan, built now
        assert backend.record.plan_path != first and backend.record.key.profile.covers((16, 64, 64))
        assert backend.run(torch.zeros((2, 1, 16, 64, 64), device=backend.device)).shape == (2, 1, 16, 64, 64)
        with pytest.raises(InputError, match="prepared for patches up to"):
            backend.run(torch.zeros((1, 1, 32, 64, 64), device=backend.device))
