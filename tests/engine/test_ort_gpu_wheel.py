"""ort-gpu against the real onnxruntime-gpu wheel on a CPU machine: the state of a GPU host whose ORT build
does not match its CUDA. onnxruntime-gpu lists its CUDA provider, then quietly creates a CPU session.

The wheels live in the folders ``$CELLSEG3D_ORT_GPU_WHEEL`` names (``pip install --target``, one per version;
``.ci/run`` makes 1.31.1, CUDA 13, and 1.26.0, CUDA 12.8, the Dockerfile's: they cannot share the venv with the
CPU ``onnxruntime``); without them these tests skip with that reason. torch's CUDA check is
forced true in a child Python, with the three calls a CPU build of torch cannot make (current device, stream,
device context) answered there; everything ONNX Runtime does is real.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from real_packages import ORT_GPU_ENV, package_dirs, run_child
from tiny_bundles import make_tiny_bundle

from engine.bundle import Bundle, load_bundle
from export.bundle_export import ExportOptions, export_bundle

WHEELS = package_dirs(ORT_GPU_ENV)
pytestmark = [
    pytest.mark.skipif(not WHEELS, reason=f"needs the onnxruntime-gpu wheel in ${ORT_GPU_ENV} (see .ci/run)"),
    pytest.mark.parametrize("wheel", WHEELS or [None], ids=lambda p: p.name if p else "none"),
]

_GPU_HOST = """
import contextlib, logging, types, torch
import onnxruntime
import engine.backends
from engine.backends import select_backend
from engine.bundle import load_bundle
from engine.errors import BackendUnavailableError
assert "CUDAExecutionProvider" in onnxruntime.get_available_providers(), onnxruntime.get_available_providers()
torch.cuda.is_available = lambda: True
torch.cuda.current_device = lambda: 0
torch.cuda.device = lambda device: contextlib.nullcontext()
torch.cuda.Stream = lambda device=None: types.SimpleNamespace(cuda_stream=0x7F00)
logging.basicConfig(level=logging.WARNING, format="LOG %(message)s")
bundle = load_bundle({path!r})
"""

_EXPLICIT = _GPU_HOST + """
try:
    select_backend("ort-gpu", bundle)
except BackendUnavailableError as exc:
    print("UNAVAILABLE", exc)
"""

_AUTO = _GPU_HOST + """
engine.backends.BACKEND_ORDER = ("ort-gpu", "torch-cpu")
with select_backend("auto", bundle) as backend:
    print("CHOSEN", backend.name)
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    bundle = make_tiny_bundle("UNet3D", tmp_path_factory.mktemp("ortgpu") / "tiny")
    export_bundle(bundle, options=ExportOptions(tensorrt=False))
    return load_bundle(bundle.path)


def test_ort_gpu_refuses_the_cpu_session_naming_the_providers_ort_chose(exported: Bundle, wheel: Path) -> None:
    child = run_child(_EXPLICIT.format(path=str(exported.path)), paths=[wheel])
    assert child.returncode == 0, child.stderr[-3000:]
    assert "UNAVAILABLE" in child.stdout, child.stdout + child.stderr[-2000:]
    assert "created a CPU session (providers it chose: ['CPUExecutionProvider'])" in child.stdout
    assert "pip install onnxruntime-gpu" in child.stdout


def test_auto_moves_on_from_an_ort_gpu_that_fell_back_to_the_cpu(exported: Bundle, wheel: Path) -> None:
    child = run_child(_AUTO.format(path=str(exported.path)), paths=[wheel])
    assert child.returncode == 0, child.stderr[-3000:]
    assert "CHOSEN torch-cpu" in child.stdout
    assert "LOG backend ort-gpu skipped" in child.stderr and "created a CPU session" in child.stderr


def test_the_stream_is_handed_to_onnxruntime(exported: Bundle, wheel: Path) -> None:
    """The providers ask ORT to run on our stream (``user_compute_stream``), so no host sync is needed."""
    code = _GPU_HOST + """
import onnxruntime
from engine.backends.base import BackendOptions
from engine.backends.ort_backend import OrtGPUBackend
backend = object.__new__(OrtGPUBackend)
backend.bundle, backend.options = bundle, BackendOptions()
backend.device, backend.stream = torch.device("cuda", 0), torch.cuda.Stream()
print("PROVIDERS", backend._providers(onnxruntime))
"""
    child = run_child(code.format(path=str(exported.path)), paths=[wheel])
    assert child.returncode == 0, child.stderr[-3000:]
    assert "('CUDAExecutionProvider', {'device_id': 0, 'user_compute_stream': '32512'})" in child.stdout
    assert "'TensorrtExecutionProvider', {'device_id': 0, 'user_compute_stream': '32512'" in child.stdout
    assert Path(exported.path / "engines" / "ort-trt").is_dir()


def test_every_onnxruntime_name_the_engine_uses_is_in_the_gpu_wheel(wheel: Path) -> None:
    code = "import onnxruntime, api_names\nu = api_names.used_api('onnxruntime')\nprint('PROBLEMS', api_names.problems(api_names.describe(onnxruntime, u), u))\n"
    child = run_child(code, paths=[wheel])
    assert child.returncode == 0, child.stderr[-2000:]
    assert "PROBLEMS []" in child.stdout
