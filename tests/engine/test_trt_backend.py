"""TensorRT: plan keys and cache (any machine), the builder's API calls (a stand-in module), and the real
build/run path (marked ``tensorrt``: needs TensorRT and a CUDA GPU, skips with the reason elsewhere).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tiny_bundles import make_tiny_bundle

from engine.backends import BackendOptions, select_backend
from engine.backends.engine_key import (
    ENGINES_ENV,
    EngineKey,
    Host,
    Profile,
    engines_dir,
    find_plan,
    plan_lock,
    read_plan,
    write_plan,
)
from engine.backends.trt_backend import TensorRTBackend
from engine.backends.trt_build import import_tensorrt
from engine.bundle import Bundle, load_bundle
from engine.errors import BackendUnavailableError, BundleError

PROFILE = Profile(channels=1, patch_shape=(16, 32, 32), min_spatial=(4, 4, 4), opt_batch=2, max_batch=4)
SHA = "ab" * 32
HOST = Host(compute_capability=(8, 6), tensorrt_version="10.7.0.23")


def _key(**changes: Any) -> EngineKey:
    base = {"compute_capability": (8, 6), "tensorrt_version": "10.7.0.23", "onnx_sha256": SHA, "profile": PROFILE, "version_compatible": False}
    return EngineKey(**{**base, **changes})


# --- keys ------------------------------------------------------------------------------------------------


def test_key_round_trips_through_json_and_names_its_facts() -> None:
    key = _key(version_compatible=True)
    assert EngineKey.from_json(json.loads(json.dumps(key.to_json())), where=Path("k.json")) == key
    stem = key.stem()
    assert stem.startswith("sm86_trt10.7.0.23_abababab") and "b1-2-4" in stem and "p16x32x32" in stem and stem.endswith("_vc")


@pytest.mark.parametrize(
    ("key", "host", "reason"),
    [
        (_key(), HOST, None),
        (_key(compute_capability=(9, 0)), HOST, "compute capability 9.0, this GPU is 8.6"),
        (_key(tensorrt_version="10.8.0.43"), HOST, "built with TensorRT 10.8.0.43, this is TensorRT 10.7.0.23"),
        (_key(tensorrt_version="10.6.0", version_compatible=True), HOST, None),
        (_key(tensorrt_version="10.9.0", version_compatible=True), HOST, "cannot run on TensorRT 10.7.0.23"),
        (_key(tensorrt_version="10.7.0", version_compatible=True), Host((8, 6), "11.1.0"), None),  # 10 -> 11 is supported
        (_key(tensorrt_version="8.6.1", version_compatible=True), Host((8, 6), "10.7.0"), None),  # and 8 -> 10
        (_key(tensorrt_version="8.6.1", version_compatible=True), Host((8, 6), "11.1.0"), "cannot run on TensorRT 11.1.0"),
        (_key(tensorrt_version="11.4.0", version_compatible=True), Host((8, 6), "12.0.0"), "cannot run on TensorRT 12.0.0"),
        (_key(), Host((8, 6), "10.7.0.23", lean_only=True), "lean runtime (tensorrt_lean) runs only plans exported with --lean"),
        (_key(version_compatible=True), Host((8, 6), "10.7.0.23", lean_only=True), None),
        (_key(tensorrt_version="10.6.0", version_compatible=True), Host((8, 6), "10.7.0.23", lean_only=True), "runs only its own version's"),
        (_key(onnx_sha256="cd" * 32), HOST, "built from another ONNX file"),
    ],
)
def test_key_mismatch_reasons(key: EngineKey, host: Host, reason: str | None) -> None:
    got = key.mismatch(host, onnx_sha256=SHA, patch_shape=(16, 32, 32))
    assert got == reason if reason is None else reason in (got or "")


def test_profile_coverage_and_shapes() -> None:
    assert PROFILE.shapes() == ((1, 1, 4, 4, 4), (2, 1, 16, 32, 32), (4, 1, 16, 32, 32))
    assert PROFILE.covers((8, 32, 16)) and not PROFILE.covers((32, 32, 32)) and not PROFILE.covers((2, 32, 32))
    assert "does not cover patch" in (_key().mismatch(HOST, onnx_sha256=SHA, patch_shape=(32, 32, 32)) or "")
    with pytest.raises(ValueError, match="min <= opt <= max"):
        Profile(channels=1, patch_shape=(16, 16, 16), min_spatial=(4, 4, 4), opt_batch=8, max_batch=4)


def test_malformed_key_is_a_bundle_error_naming_the_file() -> None:
    with pytest.raises(BundleError, match=r"x\.json: not a plan key"):
        EngineKey.from_json({"compute_capability": [8]}, where=Path("x.json"))


# --- the plan cache --------------------------------------------------------------------------------------


def test_find_plan_uses_only_a_plan_for_this_gpu_and_tensorrt(tmp_path: Path) -> None:
    foreign_gpu = write_plan(tmp_path, _key(compute_capability=(7, 5)), b"gpu", meta={})
    foreign_trt = write_plan(tmp_path, _key(tensorrt_version="10.3.0"), b"trt", meta={})
    failed = write_plan(tmp_path, _key(profile=Profile(channels=1, patch_shape=(16, 32, 32), min_spatial=(4, 4, 4), opt_batch=1, max_batch=1)), b"bad", meta={"gate": {"passed": False}})
    record, reasons = find_plan(tmp_path, host=HOST, onnx_sha256=SHA, patch_shape=(16, 32, 32), max_batch=4)
    assert record is None
    text = " | ".join(reasons)
    assert foreign_gpu.plan_path.name in text and "compute capability 7.5" in text
    assert foreign_trt.plan_path.name in text and "TensorRT 10.3.0" in text
    assert failed.plan_path.name in text and "failed its accuracy gate" in text
    vc = write_plan(tmp_path, _key(tensorrt_version="10.5.0", version_compatible=True), b"vc", meta={})
    record, _ = find_plan(tmp_path, host=HOST, onnx_sha256=SHA, patch_shape=(16, 32, 32), max_batch=4)
    assert record is not None and record.plan_path == vc.plan_path
    exact = write_plan(tmp_path, _key(), b"exact", meta={"gate": {"passed": True}})
    record, _ = find_plan(tmp_path, host=HOST, onnx_sha256=SHA, patch_shape=(16, 32, 32), max_batch=4)
    assert record is not None and record.plan_path == exact.plan_path and read_plan(record) == b"exact"
    assert find_plan(tmp_path / "none", host=HOST, onnx_sha256=SHA, patch_shape=(16, 32, 32), max_batch=4) == (None, [])


def test_corrupt_plan_or_json_is_refused_with_the_file_name(tmp_path: Path) -> None:
    record = write_plan(tmp_path, _key(), b"the plan bytes", meta={})
    record.plan_path.write_bytes(b"the plan bytez")
    with pytest.raises(BundleError, match=rf"{record.plan_path.name}: corrupt or replaced plan"):
        read_plan(record)
    record.json_path.write_text("{not json")
    with pytest.raises(BundleError, match=rf"{record.json_path.name}: cannot read plan JSON"):
        find_plan(tmp_path, host=HOST, onnx_sha256=SHA, patch_shape=(16, 32, 32), max_batch=4)


def test_plan_lock_excludes_a_second_process(tmp_path: Path) -> None:
    probe = (
        "import fcntl, sys; fh = open(sys.argv[1], 'a+')\n"
        "try:\n    fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept BlockingIOError:\n    sys.exit(3)\n"
    )
    with plan_lock(tmp_path, "stem"):
        held = subprocess.run([sys.executable, "-c", probe, str(tmp_path / ".stem.lock")], check=False)
    free = subprocess.run([sys.executable, "-c", probe, str(tmp_path / ".stem.lock")], check=False)
    assert held.returncode == 3 and free.returncode == 0


def test_unwritable_engines_folder_says_how_to_fix_it(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(BackendUnavailableError, match=ENGINES_ENV), plan_lock(tmp_path / "file" / "engines", "stem"):
        pass


def test_engines_folder_can_be_moved_out_of_the_bundle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = make_tiny_bundle("UNet3D", tmp_path / "tiny")
    assert engines_dir(bundle) == bundle.path / "engines"
    monkeypatch.setenv(ENGINES_ENV, str(tmp_path / "cache"))
    assert engines_dir(bundle) == tmp_path / "cache" / "tiny"


# --- lookup on a lean-only host ------------------------------------------------------------------------


def test_lean_host_without_a_fitting_plan_is_unavailable_with_the_fix(tmp_path: Path) -> None:
    bundle = make_tiny_bundle("UNet3D", tmp_path / "tiny")
    write_plan(bundle.path / "engines", _key(), b"non-vc", meta={})
    backend = object.__new__(TensorRTBackend)  # the lookup logic only; construction needs a GPU
    backend.bundle, backend.options, backend.can_build = bundle, BackendOptions(), False
    backend.host = Host((8, 6), "10.7.0.23", lean_only=True)
    backend.directory, backend.onnx_sha = bundle.path / "engines", SHA
    with pytest.raises(BackendUnavailableError, match=r"only the lean runtime 10\.7\.0\.23 is installed.*cellseg3d export --lean"):
        backend._load((16, 32, 32), 8)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the reason given without a GPU")
def test_tensorrt_unavailable_without_a_gpu_says_why(tmp_path: Path) -> None:
    assert "sees no CUDA device" in (TensorRTBackend.unavailable_reason() or "")
    with pytest.raises(BackendUnavailableError, match="backend tensorrt cannot run here"):
        select_backend("tensorrt", make_tiny_bundle("UNet3D", tmp_path / "tiny"))


# --- the real thing: TensorRT on a GPU ----------------------------------------------------------------------


def _trt_ready() -> str | None:
    trt, can_build = import_tensorrt()
    if trt is None or not can_build:
        return "needs the full tensorrt package (pip install tensorrt-cu12)"
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    return None


needs_trt = pytest.mark.skipif(_trt_ready() is not None, reason=_trt_ready() or "")


@pytest.fixture(scope="module")
def trt_bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    """A tiny UNet3D bundle exported with a TensorRT plan (max batch 4)."""
    pytest.importorskip("tensorrt")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from export.bundle_export import ExportOptions, export_bundle

    bundle = make_tiny_bundle("UNet3D", tmp_path_factory.mktemp("trt") / "tiny")
    summary = export_bundle(bundle, options=ExportOptions(max_batch=4))
    assert summary.ok, summary.lines
    return load_bundle(bundle.path)


def _copy(bundle: Bundle, target: Path) -> Bundle:
    shutil.copytree(bundle.path, target)
    return load_bundle(target)


@pytest.mark.tensorrt
@needs_trt
def test_export_writes_a_gated_keyed_plan(trt_bundle: Bundle) -> None:
    record = trt_bundle.export["tensorrt"]
    assert record["gate"]["passed"] and record["gate"]["dice"] >= 0.99
    plan = trt_bundle.path / "engines" / record["plan"]
    meta = json.loads(plan.with_suffix(".json").read_text())
    major, minor = torch.cuda.get_device_capability()
    assert meta["key"]["compute_capability"] == [major, minor] and meta["key"]["profile"]["max_batch"] == 4
    assert meta["gate"]["passed"] and plan.stat().st_size == meta["plan_bytes"]
    assert list((trt_bundle.path / "engines").glob("timing_sm*.cache"))


@pytest.mark.tensorrt
@needs_trt
def test_tensorrt_backend_matches_torch_and_splits_batches(trt_bundle: Bundle) -> None:
    with select_backend("tensorrt", trt_bundle, options=BackendOptions(max_batch=4)) as backend:
        assert backend.plan.stream != torch.cuda.default_stream(backend.device)
        x = torch.randn((6, 1, *trt_bundle.patch_shape), device=backend.device, generator=torch.Generator(backend.device).manual_seed(0))
        y = backend.run(x)  # 6 > the profile's 4: two enqueues
        assert y.shape == (6, 1, *trt_bundle.patch_shape) and y.dtype == torch.float32 and y.device == x.device
        model = trt_bundle.load_model().to(backend.device)
        with torch.inference_mode():
            expected = model(x)
        assert (y - expected).abs().max().item() < 0.05
        single = torch.cat([backend.run(x[i : i + 1]) for i in range(6)])
        assert (single - y).abs().max().item() < 5e-3  # fp16 kernels may differ by batch size
        small = backend.run(x[:2, :, :8, :16, :8].contiguous())  # a shrunk patch inside the profile
        assert small.shape == (2, 1, 8, 16, 8)


@pytest.mark.tensorrt
@needs_trt
def test_segment_with_tensorrt_matches_torch_cpu(trt_bundle: Bundle) -> None:
    from engine.labels import interior_probability
    from engine.pipeline import SegmentOptions, segment
    from engine.synthetic import make_membrane_volume

    volume = make_membrane_volume((24, 48, 48), seed=5).image
    ref = segment(volume, bundle=trt_bundle, options=SegmentOptions(backend="torch-cpu", precision="fp32"))
    got = segment(volume, bundle=trt_bundle, options=SegmentOptions(backend="tensorrt"))
    assert got.report.backend == "tensorrt" and got.report.precision == "fp16"
    a, b = (interior_probability(r.probabilities, trt_bundle.output) > 0.5 for r in (ref, got))
    assert 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()) >= 0.99


@pytest.mark.tensorrt
@needs_trt
@pytest.mark.parametrize("field", ["compute_capability", "tensorrt_version"])
def test_foreign_plan_is_not_used_but_rebuilt(trt_bundle: Bundle, tmp_path: Path, field: str) -> None:
    bundle = _copy(trt_bundle, tmp_path / "tiny")
    (plan_json,) = [p for p in (bundle.path / "engines").glob("*.json")]
    doc = json.loads(plan_json.read_text())
    doc["key"][field] = [1, 0] if field == "compute_capability" else "9.0.0"
    foreign = plan_json.with_name("foreign.json")
    foreign.write_text(json.dumps(doc))
    plan_json.with_suffix(".plan").rename(foreign.with_suffix(".plan"))
    plan_json.unlink()
    with select_backend("tensorrt", bundle, options=BackendOptions(max_batch=2)) as backend:
        assert backend.record.plan_path.name != "foreign.plan"
        assert backend.record.meta["built_by"] == "engine lazy build" and backend.record.meta["gate"]["passed"]


@pytest.mark.tensorrt
@needs_trt
def test_corrupt_plan_is_refused_with_its_name(trt_bundle: Bundle, tmp_path: Path) -> None:
    bundle = _copy(trt_bundle, tmp_path / "tiny")
    (plan,) = list((bundle.path / "engines").glob("*.plan"))
    plan.write_bytes(plan.read_bytes()[:-16] + b"\0" * 16)
    with pytest.raises(BundleError, match=rf"{plan.name}: corrupt or replaced plan"):
        select_backend("tensorrt", bundle)


@pytest.mark.tensorrt
@needs_trt
def test_lean_plan_is_version_compatible_and_runs(tmp_path: Path) -> None:
    from export.bundle_export import ExportOptions, export_bundle

    bundle = make_tiny_bundle("UNet3D", tmp_path / "tiny")
    assert export_bundle(bundle, options=ExportOptions(max_batch=2, lean=True)).ok
    bundle = load_bundle(bundle.path)
    assert bundle.export["tensorrt"]["key"]["version_compatible"] is True
    with select_backend("tensorrt", bundle, options=BackendOptions(max_batch=2)) as backend:
        assert backend.record.key.version_compatible
        assert backend.run(torch.randn((1, 1, *bundle.patch_shape), device=backend.device)).shape[1] == 1


@pytest.mark.tensorrt
@needs_trt
def test_lean_plan_runs_on_tensorrt_lean_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lean = pytest.importorskip("tensorrt_lean")
    from engine.backends import trt_backend
    from export.bundle_export import ExportOptions, export_bundle

    bundle = make_tiny_bundle("UNet3D", tmp_path / "tiny")
    assert export_bundle(bundle, options=ExportOptions(max_batch=2, lean=True)).ok
    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda: (lean, False))
    with select_backend("tensorrt", load_bundle(bundle.path), options=BackendOptions(max_batch=2)) as backend:
        assert not backend.can_build and backend.host.lean_only
        assert backend.run(torch.randn((2, 1, *bundle.patch_shape), device=backend.device)).shape[0] == 2
