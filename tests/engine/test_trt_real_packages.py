"""The TensorRT code against the real wheels on a CPU machine (``tensorrt-cu12-bindings``, ``tensorrt-lean-cu12``).

The wheels live in the folders ``$CELLSEG3D_TRT_WHEELS`` names (``pip install --target``, one per TensorRT
version; ``.ci/run`` makes 11.4.0.106 and 10.16.1.11, the Dockerfile's); without them these tests skip with that
reason. Each runs in a child Python (tests/real_packages.py): the lean runtime imports as is, the full
bindings against stand-in libraries with the real sonames.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from api_names import DESCRIBE_TRT, describe, load_snapshot, problems, used_api
from real_packages import TRT_ENV, package_dirs, run_child, standin_libs

FOLDERS = package_dirs(TRT_ENV)
WHEELS = FOLDERS[0] if FOLDERS else None  # the first is the version the snapshot describes
needs_wheels = pytest.mark.skipif(WHEELS is None, reason=f"needs the real TensorRT wheels in ${TRT_ENV} (see .ci/run)")


@pytest.fixture(scope="module")
def standins(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    assert WHEELS is not None
    return standin_libs(WHEELS, tmp_path_factory.mktemp("standin"))


@needs_wheels
def test_every_tensorrt_name_the_engine_uses_is_in_the_real_bindings(tmp_path: Path) -> None:
    """In every installed version; the snapshot the stand-in is built from must be the first one's exactly."""
    for i, folder in enumerate(FOLDERS):
        child = run_child(DESCRIBE_TRT, paths=[folder], preload=standin_libs(folder, tmp_path / f"standin{i}"))
        assert child.returncode == 0, child.stderr
        real = json.loads(child.stdout)
        for module in ("tensorrt", "tensorrt_lean"):
            assert problems(real[module], used_api(module)) == [], (folder, module)
        if i == 0 and real != load_snapshot():
            (tmp_path / "trt_api_snapshot.json").write_text(child.stdout)
            pytest.fail(f"{folder} differs from tests/engine/trt_api_snapshot.json; the new one is {tmp_path / 'trt_api_snapshot.json'}")


def test_the_name_check_catches_a_misspelt_keyword_and_a_missing_member() -> None:
    usage = used_api("tensorrt")
    usage.keywords[("IBuilderConfig", "set_timing_cache")] = {"ignore_mismatches"}
    usage.chains.add("BuilderFlag.FP16")  # removed in TensorRT 11
    snapshot = load_snapshot()["tensorrt"]
    assert any("ignore_mismatches" in p for p in problems(snapshot, usage))
    assert snapshot["enums"]["NetworkDefinitionCreationFlag"]["STRONGLY_TYPED"] == 0  # 11.x: 0 and deprecated
    assert "FP16" not in snapshot["enums"]["BuilderFlag"] and "EXPLICIT_BATCH" not in snapshot["enums"]["NetworkDefinitionCreationFlag"]


def test_every_onnxruntime_name_the_engine_uses_is_in_the_installed_onnxruntime() -> None:
    ort = pytest.importorskip("onnxruntime")
    usage = used_api("onnxruntime")
    assert ("IOBinding", "bind_input") in usage.keywords and ("InferenceSession", "__init__") in usage.keywords
    assert problems(describe(ort, usage), usage) == []


# Before the fix the engine did ``trt.Runtime(logger)`` and then ``hasattr(runtime, "engine_host_code_allowed")``,
# which crashes the process when the lean runtime could not start CUDA.
_LEAN_ENGINE = """
import contextlib, torch, tensorrt_lean
from engine.backends.engine_key import Profile
from engine.backends.trt_runtime import TrtEngine
from engine.errors import BackendUnavailableError
torch.cuda.device = lambda device: contextlib.nullcontext()  # a CPU torch cannot enter a CUDA device
profile = Profile(channels=1, patch_shape=(16, 32, 32), min_spatial=(4, 4, 4), opt_batch=1, max_batch=2)
try:
    TrtEngine(tensorrt_lean, b"plan", record=None, profile=profile, channels=(1, 1), device=torch.device("cuda", 0),
              version_compatible=True)
except BackendUnavailableError as exc:
    print("UNAVAILABLE", exc)
"""


@needs_wheels
def test_lean_runtime_that_cannot_start_cuda_is_unavailable_not_a_crash() -> None:
    child = run_child(_LEAN_ENGINE, paths=[WHEELS])
    assert child.returncode == 0, f"child died ({child.returncode}): {child.stderr[-2000:]}"
    assert "UNAVAILABLE TensorRT 11." in child.stdout and "cannot create its runtime" in child.stdout
    assert "CUDA" in child.stdout  # TensorRT's own message says why


@needs_wheels
def test_touching_a_lean_runtime_that_logged_an_error_crashes_the_process() -> None:
    """The failure the engine avoids, shown on the real lean runtime: the child dies with a signal."""
    child = run_child("import tensorrt_lean as t\nr = t.Runtime(t.Logger(t.Logger.WARNING))\nhasattr(r, 'engine_host_code_allowed')\n",
                      paths=[WHEELS])
    assert child.returncode < 0


_FULL_BUILDER = """
from pathlib import Path
import tensorrt
from engine.backends.engine_key import Profile
from engine.backends.trt_build import BuildSettings, build_serialized_plan
from engine.errors import BackendUnavailableError
assert not isinstance(tensorrt.Builder, type(None))
profile = Profile(channels=1, patch_shape=(16, 32, 32), min_spatial=(4, 4, 4), opt_batch=1, max_batch=2)
try:
    build_serialized_plan(tensorrt, Path("model.fp16.onnx"), profile, settings=BuildSettings())
except BackendUnavailableError as exc:
    print("UNAVAILABLE", exc)
"""


@needs_wheels
def test_builder_nullptr_from_the_full_bindings_is_unavailable(standins: list[Path]) -> None:
    """``trt.Builder(logger)`` raises TypeError ("factory function returned nullptr") without CUDA."""
    child = run_child(_FULL_BUILDER, paths=[WHEELS], preload=standins)
    assert child.returncode == 0, child.stderr[-2000:]
    assert "UNAVAILABLE TensorRT 11.4" in child.stdout and "factory function returned nullptr" in child.stdout


_BACKEND_REASON = """
import torch, tensorrt_lean
from engine.backends.trt_backend import TensorRTBackend
from engine.backends.trt_runtime import cuda_mismatch, tensorrt_cuda_major
torch.cuda.is_available = lambda: True  # the state of a GPU host whose driver TensorRT cannot use
print("MAJOR", tensorrt_cuda_major(tensorrt_lean))
print("REASON", TensorRTBackend.unavailable_reason())
print("OLD", cuda_mismatch(tensorrt_lean, driver=(11, 8)))
"""


@needs_wheels
def test_tensorrt_checks_the_driver_before_starting() -> None:
    child = run_child(_BACKEND_REASON, paths=[WHEELS])
    assert child.returncode == 0, child.stderr[-2000:]
    assert "MAJOR 12" in child.stdout
    assert "REASON no CUDA driver found" in child.stdout
    assert "OLD TensorRT 11.4.0.106 is built for CUDA 12, the driver supports CUDA 11.8; pip install tensorrt-cu11" in child.stdout
