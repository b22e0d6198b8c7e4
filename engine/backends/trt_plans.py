"""The one gated plan builder: build a TensorRT plan, gate it against torch fp32, write it keyed.

``cellseg3d export`` (prebuilt plans) and the TensorRT backend (a plan built on first use on a GPU host) both
call :func:`build_gated_plan`, so a plan is written only after the same accuracy gate
(:mod:`engine.backends.gate`) passed, with the same key and records, whoever built it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from ..bundle import Bundle
from .engine_key import FP16_FILE, EngineKey, Host, PlanRecord, Profile, write_plan
from .gate import GateResult, Sample, compare, probabilities
from .trt_build import BuildSettings, build_serialized_plan
from .trt_runtime import TrtEngine

__all__ = ["GatedPlan", "PlanRequest", "build_gated_plan", "default_profile"]


def default_profile(bundle: Bundle, patch_shape: tuple[int, int, int], /, *, max_batch: int) -> Profile:
    """Batch 1..min(4, max)..max, spatial from the network's divisor up to ``patch_shape``."""
    d = bundle.divisor
    z, y, x = (min(d, side) for side in patch_shape)
    return Profile(
        channels=bundle.in_channels, patch_shape=patch_shape, min_spatial=(z, y, x), opt_batch=min(4, max_batch), max_batch=max_batch,
    )


@dataclass(frozen=True)
class PlanRequest:
    """What to build and where: the profile, builder settings, the engines folder, who asks (for the record)."""

    profile: Profile
    settings: BuildSettings
    directory: Path
    built_by: str


@dataclass(frozen=True)
class GatedPlan:
    """The outcome: the gate, and (when it passed) the written record and the engine already loaded."""

    key: EngineKey
    gate: GateResult
    build_seconds: float
    record: PlanRecord | None
    engine: TrtEngine | None


def build_gated_plan(
    trt: ModuleType, bundle: Bundle, /, *, host: Host, onnx_sha256: str, request: PlanRequest, sample: Sample,
    reference: NDArray[np.float32], runtime: ModuleType | None = None,
) -> GatedPlan:
    """Build a plan for ``request``, gate it on ``sample`` against ``reference``, write it when it passes.

    Call it under :func:`engine.backends.engine_key.plan_lock` for the key's stem. ``runtime`` is the
    TensorRT module that runs the gate (for a version-compatible plan, the lean runtime an image ships).

    Raises:
        BackendUnavailableError: TensorRT cannot start CUDA here.
        BundleError: TensorRT cannot parse ``model.fp16.onnx``.
        RuntimeError: the builder failed.
    """
    device = torch.device("cuda", torch.cuda.current_device())
    settings = request.settings
    key = EngineKey(
        compute_capability=host.compute_capability, tensorrt_version=host.tensorrt_version, onnx_sha256=onnx_sha256,
        profile=request.profile, version_compatible=settings.version_compatible,
    )
    started = time.perf_counter()
    plan = build_serialized_plan(trt, bundle.path / FP16_FILE, request.profile, settings=settings)
    build_s = round(time.perf_counter() - started, 1)
    engine = TrtEngine(
        runtime or trt, plan, record=None, profile=request.profile, channels=(bundle.in_channels, len(bundle.output.names)),
        device=device, version_compatible=settings.version_compatible,
    )
    gate_started = time.perf_counter()
    candidate = probabilities(bundle, sample, engine.run, device=device, batch_size=min(4, request.profile.max_batch))
    gate = compare(bundle, reference, candidate, sample=sample.source, started=gate_started)
    if not gate.passed:
        return GatedPlan(key=key, gate=gate, build_seconds=build_s, record=None, engine=None)
    meta: dict[str, Any] = {
        "built_by": request.built_by, "onnx_file": FP16_FILE, "gpu": torch.cuda.get_device_name(device),
        "tensorrt": host.tensorrt_version, "torch": torch.__version__, "build_seconds": build_s,
        "workspace_bytes": settings.workspace_bytes, "version_compatible": settings.version_compatible,
        "gate": {**gate.to_json(), "runtime": f"TensorRT {(runtime or trt).__version__} on {torch.cuda.get_device_name(device)}"},
    }
    record = write_plan(request.directory, key, plan, meta=meta)
    return GatedPlan(key=key, gate=gate, build_seconds=build_s, record=record, engine=engine)
