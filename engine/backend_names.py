"""Backend names, in the order ``auto`` tries them: importable without torch, so the command line can
check ``--backend`` before the heavy imports (the backends themselves live in :mod:`engine.backends`)."""

from __future__ import annotations

__all__ = ["BACKEND_MODULES", "BACKEND_ORDER", "BACKEND_CHOICES"]

# name -> (module in engine.backends, class); fastest first, as ``auto`` tries them (DESIGN.md, issue 4).
# ``ort-cpu`` is last: on the project's CPU ONNX Runtime is slower than torch.
BACKEND_MODULES: dict[str, tuple[str, str]] = {
    "tensorrt": ("trt_backend", "TensorRTBackend"),
    "ort-gpu": ("ort_backend", "OrtGPUBackend"),
    "torch-cuda": ("torch_backend", "TorchCUDABackend"),
    "torch-cpu": ("torch_backend", "TorchCPUBackend"),
    "ort-cpu": ("ort_backend", "OrtCPUBackend"),
}
BACKEND_ORDER: tuple[str, ...] = tuple(BACKEND_MODULES)
BACKEND_CHOICES: tuple[str, ...] = ("auto", *BACKEND_ORDER)
