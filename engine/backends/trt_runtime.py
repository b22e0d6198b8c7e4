"""Running a TensorRT plan on torch CUDA tensors, and starting TensorRT without crashing where it cannot run.

Facts from the real wheels (TensorRT 11.4.0.106 / 10.16.1.11, ``tensorrt_lean``): ``trt.Builder(logger)``
and ``trt.Runtime(logger)`` raise ``TypeError`` ("factory function returned nullptr") when TensorRT cannot
start CUDA; the lean runtime instead logs an error and returns a Runtime that segfaults when touched. So
every Runtime and Builder here is created with a logger that records errors, and one whose creation logged
an error is never used: the backend is unavailable, with TensorRT's own message. Before that, a TensorRT
wheel built for a newer CUDA major than the driver supports is refused by :func:`cuda_mismatch`.

The module imports TensorRT only through the ``trt`` module object its callers pass in.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import logging
import re
from types import ModuleType
from typing import Any

import torch

from ..errors import BackendUnavailableError, BundleError, InputError
from .engine_key import INPUT_NAME, OUTPUT_NAME, PlanRecord, Profile

__all__ = [
    "TrtEngine", "check_io", "cuda_driver_version", "cuda_mismatch", "open_runtime", "recording_logger", "start_checked", "tensorrt_cuda_major",
]

logger = logging.getLogger(__name__)

_NEVER_FREED: list[tuple[Any, Any]] = []
_CUDA_DIST = re.compile(r"^tensorrt(?:[-_](?:lean|dispatch))?[-_]cu(\d+)(?:[-_](?:bindings|libs))?$", re.IGNORECASE)


def recording_logger(trt: ModuleType, /) -> Any:
    """A ``trt.ILogger`` that forwards warnings and errors to Python logging and keeps the errors in ``.errors``."""

    class RecordingLogger(trt.ILogger):  # type: ignore[name-defined, misc]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                self.errors.append(msg)
                logger.error("TensorRT: %s", msg)
            elif severity == trt.ILogger.Severity.WARNING:
                logger.warning("TensorRT: %s", msg)

    return RecordingLogger()


def start_checked(trt: ModuleType, factory: Any, what: str, /) -> tuple[Any, Any]:
    """``(factory(logger), logger)`` for ``trt.Runtime`` or ``trt.Builder``, refusing one that did not start.

    Raises:
        BackendUnavailableError: the factory gave nullptr (``TypeError``) or logged an error (the lean
            runtime's way), so the object is never touched.
    """
    trt_logger = recording_logger(trt)
    try:
        made = factory(trt_logger)
    except TypeError as exc:  # pybind11: "factory function returned nullptr"
        raise BackendUnavailableError(f"TensorRT {trt.__version__} cannot create its {what} (CUDA did not initialise: {exc})") from exc
    if trt_logger.errors:  # the lean runtime returns an object that crashes the process when touched, even
        _NEVER_FREED.append((made, trt_logger))  # by its destructor: keep it, unused, for the process's life
        raise BackendUnavailableError(f"TensorRT {trt.__version__} cannot create its {what}: {trt_logger.errors[0]}")
    return made, trt_logger


def open_runtime(trt: ModuleType, /) -> tuple[Any, Any]:
    """``(trt.Runtime, its logger)``; the logger must outlive the runtime and its engines.

    Raises:
        BackendUnavailableError: TensorRT cannot start CUDA here (its message is included).
    """
    return start_checked(trt, trt.Runtime, "runtime")


def cuda_driver_version() -> tuple[int, int] | None:
    """The CUDA version the installed driver supports (``cuDriverGetVersion``), or None without a driver."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    version = ctypes.c_int(0)
    if libcuda.cuDriverGetVersion(ctypes.byref(version)) != 0:
        return None
    return version.value // 1000, (version.value % 1000) // 10


def tensorrt_cuda_major(trt: ModuleType, /) -> int | None:
    """The CUDA major the installed TensorRT wheel is built for (``tensorrt-cu12`` -> 12), None if unknown."""
    top = trt.__name__.split(".")[0]
    for dist in importlib.metadata.packages_distributions().get(top, []):
        match = _CUDA_DIST.match(dist)
        if match:
            return int(match[1])
    return None


def cuda_mismatch(trt: ModuleType, /, *, driver: tuple[int, int] | None) -> str | None:
    """Why this TensorRT cannot start on this driver (no driver, or a wheel for a newer CUDA major), else None."""
    want = tensorrt_cuda_major(trt)
    if driver is None:
        return "no CUDA driver found (libcuda.so.1 cannot be loaded)"
    if want is not None and want > driver[0]:
        return (
            f"TensorRT {trt.__version__} is built for CUDA {want}, the driver supports CUDA {driver[0]}.{driver[1]}; "
            f"pip install tensorrt-cu{driver[0]} (or update the driver)"
        )
    return None


def check_io(trt: ModuleType, engine: Any, *, where: object, channels: tuple[int, int]) -> None:
    """The plan's tensors must be fp32 ``input (N, C, Z, Y, X)`` and ``output (N, K, Z, Y, X)`` of the bundle."""
    names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
    types = {n: engine.get_tensor_dtype(n) for n in names}
    if names != {INPUT_NAME, OUTPUT_NAME} or any(t != trt.DataType.FLOAT for t in types.values()):
        raise BundleError(f"{where}: plan tensors {types} are not fp32 {INPUT_NAME!r} and {OUTPUT_NAME!r}; delete it to rebuild")
    for name, want in zip((INPUT_NAME, OUTPUT_NAME), channels):
        shape = tuple(engine.get_tensor_shape(name))
        if len(shape) != 5 or shape[1] != want:
            raise BundleError(f"{where}: plan tensor {name!r} has shape {shape}, the bundle needs (N, {want}, Z, Y, X); delete it to rebuild")


class TrtEngine:
    """A deserialized plan with one execution context; ``run`` maps a CUDA batch to probabilities.

    Raises (constructor):
        BackendUnavailableError: TensorRT cannot start here or cannot deserialize the plan (built elsewhere).
        BundleError: the plan's inputs/outputs are not the bundle's fp32 ``input``/``output``.
    """

    def __init__(
        self, trt: ModuleType, plan: bytes, /, *, record: PlanRecord | None, profile: Profile, channels: tuple[int, int],
        device: torch.device, version_compatible: bool = False,
    ) -> None:
        where = record.plan_path if record is not None else "new plan"
        self.profile, self.out_channels, self.device = profile, channels[1], device
        with torch.cuda.device(device):  # the runtime, engine, context and stream all belong to this GPU
            self._runtime, self._logger = open_runtime(trt)
            if version_compatible:
                self._runtime.engine_host_code_allowed = True  # our own plan: keyed and sha-checked, or just built
            self.engine = self._runtime.deserialize_cuda_engine(plan)
            if self.engine is None:
                raise BackendUnavailableError(
                    f"{where}: TensorRT {trt.__version__} cannot deserialize this plan ({'; '.join(self._logger.errors) or 'see its log'}); "
                    "delete it to rebuild"
                )
            check_io(trt, self.engine, where=where, channels=channels)
            self.context = self.engine.create_execution_context()
            if self.context is None:
                raise BackendUnavailableError(f"{where}: TensorRT cannot create an execution context ({'; '.join(self._logger.errors)})")
            self.stream = torch.cuda.Stream(device=device)

    def _run_chunk(self, x: torch.Tensor) -> torch.Tensor:
        n, _, z, y, w = x.shape
        want = (n, self.out_channels, z, y, w)
        if not self.context.set_input_shape(INPUT_NAME, tuple(x.shape)):
            raise InputError(f"TensorRT rejects input shape {tuple(x.shape)}; the plan's profile is {self.profile.shapes()}")
        got = tuple(self.context.get_tensor_shape(OUTPUT_NAME))
        if got != want:  # the output buffer below holds exactly ``want``: a plan writing more would overrun it
            raise BundleError(f"TensorRT plan gives output {got} for input {tuple(x.shape)}, the bundle needs {want}; delete it to rebuild")
        out = torch.empty(want, dtype=torch.float32, device=self.device)
        caller = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(caller)  # the input was written on the caller's stream
        self.context.set_tensor_address(INPUT_NAME, x.data_ptr())
        self.context.set_tensor_address(OUTPUT_NAME, out.data_ptr())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError(f"TensorRT execute_async_v3 failed: {'; '.join(self._logger.errors[-3:]) or 'see its log'}")
        x.record_stream(self.stream)
        out.record_stream(self.stream)
        caller.wait_stream(self.stream)  # the caller reads the output after the plan wrote it
        return out

    def run(self, batch: torch.Tensor, /) -> torch.Tensor:
        """``(N, C, Z, Y, X)`` float32 CUDA -> ``(N, K, Z, Y, X)`` float32 CUDA; N is split to the profile's max."""
        x = batch.to(device=self.device, dtype=torch.float32).contiguous()
        step = self.profile.max_batch
        outs = [self._run_chunk(x[i : i + step]) for i in range(0, x.shape[0], step)]
        return outs[0] if len(outs) == 1 else torch.cat(outs)
