"""PyTorch backends: CPU (fp32, or bf16 autocast where the CPU has native bf16) and CUDA (fp16 autocast).

Both run the network in ``channels_last_3d``; measured on the project's 2-core Zen 4 machine that alone is
~1.5x over the default layout in fp32, and bf16 doubles it again (DESIGN.md).
"""

from __future__ import annotations

import contextlib
import os
import platform
from typing import ClassVar

import torch

from ..bundle import Bundle
from .base import Backend, BackendOptions

__all__ = ["TorchCPUBackend", "TorchCUDABackend", "cpu_flags", "cpu_has_native_bf16", "default_threads"]


def cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (x86 ``flags``, Arm ``Features``); None where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        return None
    return frozenset()


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 arithmetic (x86 AVX512-BF16/AMX-BF16, Arm BF16)."""
    flags = cpu_flags()
    if flags is None:
        return platform.machine() == "arm64"  # Apple silicon has bf16
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def default_threads() -> int:
    """Cores this process may run on (respects taskset/cgroup affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class _TorchBackend(Backend):
    """Shared model loading and execution; subclasses pick the device and precision.

    A precision listed in ``_native`` runs with the weights stored in that dtype (no autocast: no per-call
    weight casts, and normalization reads half the bytes); the others run under autocast.
    """

    can_grow_patch = True
    _autocast: ClassVar[dict[str, torch.dtype | None]] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    _native: ClassVar[dict[str, torch.dtype]] = {}

    def __init__(self, bundle: Bundle, /, *, options: BackendOptions, device: torch.device) -> None:
        super().__init__(bundle, options=options)
        self.device = device
        self._dtype = self._native.get(self.precision)
        model = bundle.load_model().to(device=device, memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
        self.model = model if self._dtype is None else model.to(dtype=self._dtype)

    def forward(self, batch: torch.Tensor, /) -> torch.Tensor:
        if self._dtype is not None:
            with torch.inference_mode():
                y = self.model(batch.to(dtype=self._dtype, memory_format=torch.channels_last_3d))
            return y.float().contiguous()
        dtype = self._autocast[self.precision]
        x = batch.contiguous(memory_format=torch.channels_last_3d)
        cast = torch.autocast(self.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
        with torch.inference_mode(), cast:
            y = self.model(x)
        return y.float().contiguous()

    def close(self) -> None:
        self.model = None  # type: ignore[assignment]


class TorchCPUBackend(_TorchBackend):
    """PyTorch on the CPU: fp32, or bf16 (``auto`` picks bf16 only where the CPU has it natively).

    bf16 stores the weights in bf16 rather than using autocast: bf16 has fp32's exponent range, so
    GroupNorm cannot overflow, and the CPU kernels accumulate in fp32 (see benchmarks/PERFORMANCE.md).
    """

    name = "torch-cpu"
    precisions = ("fp32", "bf16")
    _native: ClassVar[dict[str, torch.dtype]] = {"bf16": torch.bfloat16}

    def __init__(self, bundle: Bundle, /, *, options: BackendOptions) -> None:
        if options.precision == "auto":
            options = BackendOptions(
                precision="bf16" if cpu_has_native_bf16() else "fp32", threads=options.threads, max_batch=options.max_batch
            )
        torch.set_num_threads(options.threads or default_threads())
        super().__init__(bundle, options=options, device=torch.device("cpu"))

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return None


class TorchCUDABackend(_TorchBackend):
    """PyTorch on CUDA: fp16 autocast (or fp32), channels_last_3d, cudnn autotuning."""

    name = "torch-cuda"
    precisions = ("fp16", "fp32")

    def __init__(self, bundle: Bundle, /, *, options: BackendOptions) -> None:
        torch.backends.cudnn.benchmark = True
        super().__init__(bundle, options=options, device=torch.device("cuda", torch.cuda.current_device()))

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if not torch.cuda.is_available():
            built = torch.version.cuda or "without CUDA"
            return f"torch {torch.__version__} (built {built}) sees no CUDA device"
        return None
