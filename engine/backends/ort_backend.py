"""ONNX Runtime backends: ``ort-gpu`` (TensorRT EP, CUDA EP, IO binding on torch CUDA tensors) and ``ort-cpu``.

Both run the bundle's exported ONNX (``cellseg3d export``): ``model.onnx`` (fp32) or ``model.fp16.onnx``
(fp16 compute, fp32 inputs/outputs). ``onnxruntime`` is imported here and nowhere else in the engine, and
only when a backend is asked about or built, so the engine runs without it.

On the project's 2-core CPU ONNX Runtime is slower than torch (DESIGN.md), which is why ``auto`` tries
``ort-cpu`` last. onnxruntime-gpu lists its GPU providers even when their CUDA libraries are missing and then
quietly creates a CPU session, so ``ort-gpu`` checks the providers the session really chose.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from ..bundle import Bundle
from ..errors import BackendUnavailableError, BundleError
from .base import Backend, BackendOptions
from .engine_key import (
    FP16_FILE,
    INPUT_NAME,
    ONNX_FILE,
    OUTPUT_NAME,
    engines_dir,
    verify_onnx,
)
from .torch_backend import default_threads

__all__ = ["OrtCPUBackend", "OrtGPUBackend", "check_gpu_session", "fp16_gate_passed"]

logger = logging.getLogger(__name__)

_INSTALL_CPU = "pip install onnxruntime"
_INSTALL_GPU = "pip install onnxruntime-gpu (the build for this machine's CUDA major: 'onnxruntime-gpu<1.27' for CUDA 12, 1.27+ for CUDA 13)"
_GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
_WORKSPACE_BYTES = 4 << 30


def _import_ort() -> ModuleType | None:
    try:
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime


def fp16_gate_passed(bundle: Bundle, /) -> bool:
    """Whether ``cellseg3d export`` recorded a passing accuracy gate for the bundle's fp16 ONNX."""
    record = bundle.export.get("fp16", {})
    gate = record.get("gate", {}) if isinstance(record, dict) else {}
    return isinstance(gate, dict) and gate.get("passed") is True


def _session(ort: ModuleType, path: Path, bundle: Bundle, *, providers: list[Any], threads: int | None) -> Any:
    """An InferenceSession on ``path``, checked against the bundle's channels.

    Raises:
        BundleError: not a loadable ONNX model, or its inputs/outputs do not fit the bundle.
    """
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.intra_op_num_threads = threads or 0
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except Exception as exc:  # onnxruntime raises its own pybind types (InvalidProtobuf, Fail, ...) for a bad file
        raise BundleError(
            f"{path}: ONNX Runtime cannot load it ({type(exc).__name__}: {exc}); re-run 'cellseg3d export {bundle.path}'"
        ) from exc
    inputs, outputs = session.get_inputs(), session.get_outputs()
    n_out = len(bundle.output.names)
    ok = (
        len(inputs) == 1 and inputs[0].name == INPUT_NAME and len(inputs[0].shape) == 5 and inputs[0].shape[1] == bundle.in_channels
        and len(outputs) == 1 and outputs[0].name == OUTPUT_NAME and len(outputs[0].shape) == 5 and outputs[0].shape[1] == n_out
        and inputs[0].type == "tensor(float)" and outputs[0].type == "tensor(float)"
    )
    if not ok:
        got = [(t.name, t.type, t.shape) for t in (*inputs, *outputs)]
        raise BundleError(
            f"{path}: does not fit bundle {bundle.name!r}: expected float input {INPUT_NAME!r} (N, {bundle.in_channels}, Z, Y, X) "
            f"and float output {OUTPUT_NAME!r} (N, {n_out}, Z, Y, X), got {got}; re-run 'cellseg3d export {bundle.path}'"
        )
    return session


class OrtCPUBackend(Backend):
    """ONNX Runtime on the CPU with ``model.onnx`` (fp32), all graph optimizations, ``threads`` intra-op threads."""

    name = "ort-cpu"
    precisions = ("fp32",)

    def __init__(self, bundle: Bundle, /, *, options: BackendOptions) -> None:
        super().__init__(bundle, options=options)
        ort = _import_ort()
        if ort is None:
            raise BackendUnavailableError(f"backend {self.name}: onnxruntime is not installed; {_INSTALL_CPU}")
        self.path = bundle.path / ONNX_FILE
        verify_onnx(bundle, self.path)
        threads = options.threads or default_threads()
        self.session = _session(ort, self.path, bundle, providers=["CPUExecutionProvider"], threads=threads)

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if _import_ort() is None:
            return f"onnxruntime is not installed; {_INSTALL_CPU}"
        return None

    def forward(self, batch: torch.Tensor, /) -> torch.Tensor:
        (y,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: batch.detach().numpy()})
        return torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32))

    def close(self) -> None:
        self.session = None


def check_gpu_session(ort: ModuleType, path: Path, /, *, chosen: list[str]) -> None:
    """Refuse a session onnxruntime created on the CPU although GPU providers were asked for.

    Raises:
        BackendUnavailableError: no GPU provider among ``chosen`` (``session.get_providers()``).
    """
    if any(p in chosen for p in _GPU_PROVIDERS):
        return
    raise BackendUnavailableError(
        f"{path}: onnxruntime {ort.__version__} created a CPU session (providers it chose: {chosen}); its CUDA "
        f"libraries are missing or built for another CUDA major than this machine's (torch is built for CUDA "
        f"{torch.version.cuda}); {_INSTALL_GPU}"
    )


class OrtGPUBackend(Backend):
    """ONNX Runtime on CUDA: TensorRT EP (plans cached in the bundle's engines folder), then CUDA EP.

    ``fp16`` runs ``model.fp16.onnx`` and is what ``auto`` picks when export recorded a passing fp16 gate;
    otherwise ``auto`` runs ``model.onnx`` in fp32 and says why. Batches are bound in place (IO binding) on
    torch CUDA tensors, and ORT runs on a torch stream of ours (``user_compute_stream``), ordered after the
    caller's stream and before its next use of the output, so no batch waits on the host.
    """

    name = "ort-gpu"
    precisions = ("fp16", "fp32")

    def __init__(self, bundle: Bundle, /, *, options: BackendOptions) -> None:
        if options.precision == "auto" and not fp16_gate_passed(bundle):
            logger.warning("%s: no passing fp16 accuracy gate in bundle.json; ort-gpu runs fp32 (re-run 'cellseg3d export')", bundle.path)
            options = BackendOptions(precision="fp32", threads=options.threads, max_batch=options.max_batch)
        super().__init__(bundle, options=options)
        reason = self.unavailable_reason()
        ort = _import_ort()
        if reason is not None or ort is None:
            raise BackendUnavailableError(f"backend {self.name}: {reason}")
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.path = bundle.path / (FP16_FILE if self.precision == "fp16" else ONNX_FILE)
        verify_onnx(bundle, self.path)
        with torch.cuda.device(self.device):
            self.stream = torch.cuda.Stream(device=self.device)
        self.session = _session(ort, self.path, bundle, providers=self._providers(ort), threads=options.threads)
        self.providers = self.session.get_providers()
        check_gpu_session(ort, self.path, chosen=self.providers)
        self.run_options = ort.RunOptions()
        self.run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")
        self._ort_error: type[Exception] = ort.capi.onnxruntime_pybind11_state.RuntimeException

    def _providers(self, ort: ModuleType) -> list[Any]:
        """TensorRT EP (when the installed onnxruntime has it), CUDA EP, CPU EP; each on our stream."""
        index = self.device.index or 0
        stream = str(self.stream.cuda_stream)
        providers: list[Any] = []
        if "TensorrtExecutionProvider" in ort.get_available_providers():
            cache = engines_dir(self.bundle) / "ort-trt"
            try:
                cache.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                logger.warning("%s: cannot cache ORT TensorRT engines there (%s); TensorRT EP skipped", cache, exc)
            else:
                lo, opt, hi = self._profile_shapes()
                providers.append(("TensorrtExecutionProvider", {
                    "device_id": index,
                    "user_compute_stream": stream,
                    "trt_max_workspace_size": _WORKSPACE_BYTES,
                    "trt_engine_cache_enable": True,
                    "trt_engine_cache_path": str(cache),
                    "trt_timing_cache_enable": True,
                    "trt_profile_min_shapes": lo,
                    "trt_profile_opt_shapes": opt,
                    "trt_profile_max_shapes": hi,
                }))
        providers.append(("CUDAExecutionProvider", {"device_id": index, "user_compute_stream": stream}))
        providers.append("CPUExecutionProvider")
        return providers

    def _profile_shapes(self) -> tuple[str, str, str]:
        """TensorRT EP profile strings ``input:NxCxZxYxX`` (batch 1..max_batch, spatial divisor..patch)."""
        c, patch, d = self.bundle.in_channels, self.bundle.patch_shape, self.bundle.divisor
        opt_batch = min(4, self.options.max_batch)

        def fmt(*dims: int) -> str:
            return f"{INPUT_NAME}:" + "x".join(map(str, dims))

        return fmt(1, c, d, d, d), fmt(opt_batch, c, *patch), fmt(self.options.max_batch, c, *patch)

    @classmethod
    def unavailable_reason(cls) -> str | None:
        ort = _import_ort()
        if ort is None:
            return f"onnxruntime is not installed; {_INSTALL_GPU}"
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return f"onnxruntime {ort.__version__} has no CUDA execution provider (has {ort.get_available_providers()}); {_INSTALL_GPU}"
        if not torch.cuda.is_available():
            return f"torch {torch.__version__} sees no CUDA device (ort-gpu binds torch CUDA tensors)"
        return None

    def forward(self, batch: torch.Tensor, /) -> torch.Tensor:
        n, _, z, y, x = batch.shape
        out = torch.empty((n, len(self.bundle.output.names), z, y, x), dtype=torch.float32, device=self.device)
        index = self.device.index or 0
        binding = self.session.io_binding()
        binding.bind_input(
            name=INPUT_NAME, device_type="cuda", device_id=index, element_type=np.float32, shape=tuple(batch.shape), buffer_ptr=batch.data_ptr(),
        )
        binding.bind_output(
            name=OUTPUT_NAME, device_type="cuda", device_id=index, element_type=np.float32, shape=tuple(out.shape), buffer_ptr=out.data_ptr(),
        )
        caller = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(caller)  # the input was written on the caller's stream
        try:
            self.session.run_with_iobinding(binding, self.run_options)
        except self._ort_error as exc:
            if "allocate" in str(exc) or "out of memory" in str(exc).lower():
                raise torch.cuda.OutOfMemoryError(f"onnxruntime: {exc}") from exc
            raise
        batch.record_stream(self.stream)
        out.record_stream(self.stream)
        caller.wait_stream(self.stream)  # the caller reads the output after ORT wrote it
        return out

    @property
    def device_name(self) -> str:
        return f"{torch.cuda.get_device_name(self.device)} ({self.providers[0]})"

    def close(self) -> None:
        self.session = None
