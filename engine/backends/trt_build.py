"""Build a TensorRT plan from the bundle's fp16 ONNX, with the Python API common to TensorRT 10.x and 11.x.

Part of the TensorRT backend (its lazy build) and used by ``export`` (``cellseg3d export``). What it relies
on, checked against NVIDIA's TensorRT 10/11 documentation and migration guide:

- a strongly typed network, ``create_network(1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED))``:
  required for typed fp16 graphs on 10.x, accepted (and always on) in 11.x. The fp16 precision comes from
  the graph (``model.fp16.onnx``), never from ``BuilderFlag.FP16``, which 11.x removed, as it removed
  ``EXPLICIT_BATCH``;
- ``OnnxParser.parse_from_file``, one optimization profile over the batch axis (and the spatial axes, from
  the network's divisor up to the patch), ``set_memory_pool_limit(MemoryPoolType.WORKSPACE, ...)``;
- a timing cache per (GPU, TensorRT version) file, loaded with ``create_timing_cache`` and saved after the
  build so rebuilds reuse kernel timings;
- for lean images, ``BuilderFlag.VERSION_COMPATIBLE`` alone: the plan embeds the lean runtime, so it runs on
  the ``tensorrt_lean`` of the build's version and on later full runtimes (same major, or 10 -> 11), with
  ``engine_host_code_allowed``. ``EXCLUDE_LEAN_RUNTIME`` is not set: such a plan needs
  ``Runtime.load_runtime(<libnvinfer_lean of the build's exact version>)`` before deserializing, which ties
  the image to one TensorRT version anyway and saves only the plan's size.

``tensorrt`` is imported only by :func:`import_tensorrt`, called by the TensorRT backend and ``export``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from ..atomic import atomic_write_bytes
from ..bundle import Bundle
from ..errors import BundleError, InputError
from .engine_key import INPUT_NAME, Host, Profile
from .trt_runtime import start_checked

__all__ = [
    "MAX_ELEMENTS",
    "BuildSettings",
    "build_serialized_plan",
    "check_max_batch",
    "host_info",
    "import_tensorrt",
    "max_batch_for",
    "timing_cache_path",
]

logger = logging.getLogger(__name__)

MAX_ELEMENTS = 2**31 - 1  # every activation must stay under 2**31 elements (32-bit indexing in kernels)


def import_tensorrt() -> tuple[ModuleType | None, bool]:
    """``(module, can_build)``: the full ``tensorrt`` package, else ``tensorrt_lean`` (runs plans only), else None."""
    try:
        import tensorrt as trt
    except ImportError:
        pass
    else:
        return trt, True
    try:
        import tensorrt_lean as trt_lean
    except ImportError:
        return None, False
    return trt_lean, False


def host_info(trt: ModuleType, /, *, can_build: bool, device: torch.device) -> Host:
    """This host's key facts: the GPU's compute capability and the TensorRT (or lean runtime) version."""
    major, minor = torch.cuda.get_device_capability(device)
    return Host(compute_capability=(int(major), int(minor)), tensorrt_version=str(trt.__version__), lean_only=not can_build)


def timing_cache_path(directory: Path, host: Host, /) -> Path:
    """One timing cache per GPU kind and TensorRT version, beside the plans."""
    major, minor = host.compute_capability
    return directory / f"timing_sm{major}{minor}_trt{host.tensorrt_version}.cache"


def max_batch_for(bundle: Bundle, patch_shape: tuple[int, ...], /) -> int:
    """The largest batch whose every activation has fewer than 2**31 elements for ``patch_shape`` patches.

    Measured with forward hooks on a small input: the largest tensor any module reads or writes, per input
    voxel, times the patch's voxels.
    """
    model = bundle.build_model().eval()
    side = 2 * bundle.divisor
    peak = 0

    def hook(_module: torch.nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        nonlocal peak
        for t in (*inputs, output):
            if isinstance(t, torch.Tensor):
                peak = max(peak, t.numel())

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.inference_mode():
            model(torch.zeros((1, bundle.in_channels, side, side, side)))
    finally:
        for handle in handles:
            handle.remove()
    per_voxel = peak / side**3
    return max(0, int(MAX_ELEMENTS // math.ceil(per_voxel * math.prod(patch_shape))))


@dataclass(frozen=True)
class BuildSettings:
    """Builder settings: workspace limit, version compatibility (``--lean``: runs on ``tensorrt_lean``), timing cache file."""

    workspace_bytes: int = 4 << 30
    version_compatible: bool = False
    timing_cache: Path | None = None


def _load_timing_cache(config: Any, path: Path | None) -> None:
    """Attach the cache from ``path``; a corrupt or foreign one (``create_timing_cache`` gives None, or
    ``set_timing_cache`` refuses it) is replaced by a new one, with a warning."""
    data = path.read_bytes() if path is not None and path.is_file() else b""
    cache = config.create_timing_cache(data)
    if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
        return
    if data:
        logger.warning("%s: timing cache is corrupt or from another GPU/TensorRT; starting a new one", path)
    fresh = config.create_timing_cache(b"")
    if fresh is None or not config.set_timing_cache(fresh, ignore_mismatch=False):
        raise RuntimeError("TensorRT cannot create an empty timing cache (see its log above)")


def _save_timing_cache(config: Any, path: Path | None) -> None:
    if path is None:
        return
    data = bytes(memoryview(config.get_timing_cache().serialize()))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)


def build_serialized_plan(trt: ModuleType, onnx_path: Path, profile: Profile, /, *, settings: BuildSettings) -> bytes:
    """Parse ``onnx_path`` into a strongly typed network and build a serialized plan for ``profile``.

    Raises:
        BackendUnavailableError: TensorRT cannot start CUDA here (``trt.Builder`` gave nullptr or logged an error).
        BundleError: TensorRT cannot parse the ONNX file (the parser's errors are in the message).
        InputError: an activation would reach 2**31 elements (lower the profile's max batch).
        RuntimeError: the builder failed (TensorRT logs the cause).
    """
    started = time.perf_counter()
    builder, trt_logger = start_checked(trt, trt.Builder, "builder")
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BundleError(f"{onnx_path}: TensorRT {trt.__version__} cannot parse it: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(settings.workspace_bytes))
    if settings.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    lo, opt, hi = profile.shapes()
    optimization_profile = builder.create_optimization_profile()
    optimization_profile.set_shape(INPUT_NAME, lo, opt, hi)
    config.add_optimization_profile(optimization_profile)
    _load_timing_cache(config, settings.timing_cache)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        why = "; ".join(trt_logger.errors[-3:]) or "see its log above"
        raise RuntimeError(f"{onnx_path}: TensorRT {trt.__version__} failed to build a plan for profile {lo}..{hi} ({why})")
    _save_timing_cache(config, settings.timing_cache)
    logger.info("%s: TensorRT plan built in %.1f s (profile %s..%s)", onnx_path, time.perf_counter() - started, lo, hi)
    return bytes(memoryview(serialized))


def check_max_batch(bundle: Bundle, patch_shape: tuple[int, ...], max_batch: int, /) -> None:
    """Raise InputError when ``max_batch`` patches would make an activation reach 2**31 elements."""
    limit = max_batch_for(bundle, patch_shape)
    if max_batch > limit:
        raise InputError(
            f"batch {max_batch} of {tuple(patch_shape)} patches makes an activation reach 2**31 elements; "
            f"use --max-batch {limit} or less, or a smaller patch"
        )
