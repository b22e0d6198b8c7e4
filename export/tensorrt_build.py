"""Export step 3: the TensorRT plan from ``model.fp16.onnx``, gated against torch fp32 before it is written.

Runs where the full ``tensorrt`` package and a CUDA GPU are present (a GPU build host, or the GPU host
itself); elsewhere it records why it was skipped, and the engine builds the plan on its first run on a GPU
host (``engine/backends/trt_backend.py``). The build itself (strongly typed network, one profile, workspace
limit, timing cache, ``--lean``) is ``engine.backends.trt_build``; this module adds the full accuracy gate on
the bundle's sample volume and the records.

``--lean`` makes a version-compatible plan with the lean runtime excluded. A module image can then ship
only ``tensorrt_lean`` (about 45 MB instead of the full builder); the trade-offs: such an image cannot
build or rebuild plans (a new GPU kind or TensorRT major version needs a new export), and
version-compatible plans can be slower than plans built for one TensorRT version.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from types import ModuleType
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from engine.backends.engine_key import FP16_FILE, EngineKey, engines_dir, plan_lock, verify_onnx, write_plan
from engine.backends.trt_build import (
    BuildSettings, build_serialized_plan, check_max_batch, host_info, import_tensorrt, timing_cache_path,
)
from engine.bundle import Bundle, write_bundle_json

from .gate import Sample, compare, probabilities

__all__ = ["TrtBuildOptions", "build_plan_for_bundle", "skip_reason"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrtBuildOptions:
    """Plan settings: profile batches (min 1, ``opt_batch`` or min(4, max), ``max_batch``), workspace, lean."""

    max_batch: int = 8
    opt_batch: int | None = None
    lean: bool = False
    workspace_gib: float = 4.0


def skip_reason() -> str | None:
    """Why no plan can be built here, or None when the full TensorRT and a CUDA GPU are present."""
    trt, can_build = import_tensorrt()
    if trt is None or not can_build:
        return "the full TensorRT package is not installed (pip install tensorrt)"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA GPU"
    return None


def _gate_runtime(trt: ModuleType, *, lean: bool) -> ModuleType:
    """The runtime that runs the gate: for a --lean plan the lean runtime when installed (what the image runs)."""
    if lean:
        try:
            import tensorrt_lean
        except ImportError:
            return trt
        return tensorrt_lean
    return trt


def _record(bundle: Bundle, value: dict[str, Any]) -> Bundle:
    updated = replace(bundle, export={**bundle.export, "tensorrt": value})
    write_bundle_json(updated)
    return updated


def build_plan_for_bundle(
    bundle: Bundle, /, *, sample: Sample, reference: NDArray[np.float32], options: TrtBuildOptions
) -> tuple[Bundle, str, bool]:
    """Build, gate and write the plan for this GPU and TensorRT; returns ``(bundle, summary line, passed)``.

    A plan that fails the gate (foreground Dice < 0.99 against torch fp32 on the sample) is not written.

    Raises:
        InputError: the batch would make an activation reach 2**31 elements.
        BundleError: TensorRT cannot parse ``model.fp16.onnx``.
    """
    reason = skip_reason()
    if reason is not None:
        note = "the engine builds the plan on its first run on a GPU host"
        bundle = _record(bundle, {"skipped": reason, "note": note})
        return bundle, f"TensorRT plan: skipped ({reason}); {note}", True
    from engine.backends.trt_backend import TrtEngine, default_profile

    trt, _ = import_tensorrt()
    if trt is None:  # skip_reason() checked it; this narrows the type
        raise RuntimeError("tensorrt disappeared between checks")
    device = torch.device("cuda", torch.cuda.current_device())
    check_max_batch(bundle, bundle.patch_shape, options.max_batch)
    profile = default_profile(bundle, bundle.patch_shape, max_batch=options.max_batch)
    if options.opt_batch is not None:
        profile = replace(profile, opt_batch=min(options.opt_batch, options.max_batch))
    onnx_path = bundle.path / FP16_FILE
    host = host_info(trt, can_build=True, device=device)
    key = EngineKey(
        compute_capability=host.compute_capability, tensorrt_version=host.tensorrt_version,
        onnx_sha256=verify_onnx(bundle, onnx_path), profile=profile, version_compatible=options.lean,
    )
    directory = engines_dir(bundle)
    with plan_lock(directory, key.stem()):
        started = time.perf_counter()
        settings = BuildSettings(
            workspace_bytes=int(options.workspace_gib * (1 << 30)), version_compatible=options.lean,
            timing_cache=timing_cache_path(directory, host),
        )
        plan = build_serialized_plan(trt, onnx_path, profile, settings=settings)
        build_s = time.perf_counter() - started
        engine = TrtEngine(
            _gate_runtime(trt, lean=options.lean), plan, record=None, profile=profile, out_channels=len(bundle.output.names),
            device=device, version_compatible=options.lean,
        )
        gate_started = time.perf_counter()
        candidate = probabilities(bundle, sample, engine.run, device=device, batch_size=min(4, options.max_batch))
        gate = compare(bundle, reference, candidate, sample=sample.source, started=gate_started)
        gate_doc = {**gate.to_json(), "runtime": f"TensorRT {host.tensorrt_version} on {torch.cuda.get_device_name(device)}"}
        if not gate.passed:
            bundle = _record(bundle, {"failed": key.stem(), "gate": gate_doc})
            return bundle, f"TensorRT plan: NOT written, {gate.summary()}", False
        meta = {
            "built_by": "cellseg3d export", "onnx_file": FP16_FILE, "gpu": torch.cuda.get_device_name(device),
            "tensorrt": host.tensorrt_version, "torch": torch.__version__, "build_seconds": round(build_s, 1),
            "workspace_bytes": settings.workspace_bytes, "lean": options.lean, "gate": gate_doc,
        }
        record = write_plan(directory, key, plan, meta=meta)
    bundle = _record(bundle, {"plan": record.plan_path.name, "key": key.to_json(), "build_seconds": round(build_s, 1), "gate": gate_doc})
    lean = ", version-compatible (lean runtime excluded)" if options.lean else ""
    return bundle, f"{record.plan_path}: TensorRT {host.tensorrt_version}{lean}, built in {build_s:.0f} s, {gate.summary()}", True
