"""Export step 3: the TensorRT plan from ``model.fp16.onnx``, gated against torch fp32 before it is written.

Runs where the full ``tensorrt`` package and a CUDA GPU are present (a GPU build host, or the GPU host
itself); elsewhere it records why it was skipped, and the engine builds the plan on its first run on a GPU
host (``engine/backends/trt_backend.py``). The build itself (strongly typed network, one profile, workspace
limit, timing cache, ``--lean``) and its gate are ``engine.backends.trt_plans``, shared with the engine's
lazy build; this module adds the bundle.json records.

``--lean`` makes a version-compatible plan that embeds the lean runtime. A module image can then ship only
``tensorrt_lean`` of the same version (about 45 MB instead of the full builder); the trade-offs: such an
image cannot build or rebuild plans (a new GPU kind or TensorRT version needs a new export), and
version-compatible plans can be slower than plans built for one TensorRT version.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from types import ModuleType
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from engine.backends.engine_key import FP16_FILE, engines_dir, plan_lock, verify_onnx
from engine.backends.gate import Sample
from engine.backends.trt_backend import INSTALL_HINT
from engine.backends.trt_build import (
    BuildSettings,
    check_max_batch,
    host_info,
    import_tensorrt,
    timing_cache_path,
)
from engine.backends.trt_plans import PlanRequest, build_gated_plan, default_profile
from engine.backends.trt_runtime import cuda_driver_version, cuda_mismatch
from engine.bundle import Bundle, write_bundle_json
from engine.errors import BackendUnavailableError

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
    """Why no plan can be built here, or None when the full TensorRT, a CUDA GPU and a fitting driver are present."""
    trt, can_build = import_tensorrt()
    if trt is None or not can_build:
        return f"the full TensorRT package is not installed ({INSTALL_HINT})"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA GPU"
    return cuda_mismatch(trt, driver=cuda_driver_version())


def _gate_runtime(trt: ModuleType, *, lean: bool) -> ModuleType:
    """The runtime that runs the gate: for a --lean plan the lean runtime when one of the builder's version is
    installed (what the image runs; a lean runtime runs only its own version's plans), else the full one."""
    if lean:
        try:
            import tensorrt_lean
        except ImportError:
            return trt
        if tensorrt_lean.__version__ == trt.__version__:
            return tensorrt_lean
        logger.warning("tensorrt_lean %s is not the builder's %s; the --lean plan is gated on the full runtime", tensorrt_lean.__version__, trt.__version__)
    return trt


def _record(bundle: Bundle, value: dict[str, Any]) -> Bundle:
    updated = replace(bundle, export={**bundle.export, "tensorrt": value})
    write_bundle_json(updated)
    return updated


def _skipped(bundle: Bundle, reason: str) -> tuple[Bundle, str, bool]:
    note = "the engine builds the plan on its first run on a GPU host"
    return _record(bundle, {"skipped": reason, "note": note}), f"TensorRT plan: skipped ({reason}); {note}", True


def build_plan_for_bundle(
    bundle: Bundle, /, *, sample: Sample, reference: NDArray[np.float32], options: TrtBuildOptions
) -> tuple[Bundle, str, bool]:
    """Build, gate and write the plan for this GPU and TensorRT; returns ``(bundle, summary line, passed)``.

    A plan that fails the gate (foreground Dice < 0.99 against torch fp32 on the sample) is not written; a
    host where TensorRT cannot start CUDA records why it skipped.

    Raises:
        InputError: the batch would make an activation reach 2**31 elements.
        BundleError: TensorRT cannot parse ``model.fp16.onnx``.
    """
    trt, _ = import_tensorrt()
    reason = skip_reason()
    if reason is not None or trt is None:
        return _skipped(bundle, reason or "TensorRT is not installed")
    device = torch.device("cuda", torch.cuda.current_device())
    check_max_batch(bundle, bundle.patch_shape, options.max_batch)
    profile = default_profile(bundle, bundle.patch_shape, max_batch=options.max_batch)
    if options.opt_batch is not None:
        profile = replace(profile, opt_batch=min(options.opt_batch, options.max_batch))
    host = host_info(trt, can_build=True, device=device)
    directory = engines_dir(bundle)
    request = PlanRequest(
        profile=profile, directory=directory, built_by="cellseg3d export",
        settings=BuildSettings(
            workspace_bytes=int(options.workspace_gib * (1 << 30)), version_compatible=options.lean,
            timing_cache=timing_cache_path(directory, host),
        ),
    )
    onnx_sha = verify_onnx(bundle, bundle.path / FP16_FILE)
    try:
        with plan_lock(directory, f"{onnx_sha[:16]}_{profile.tag()}"):
            built = build_gated_plan(
                trt, bundle, host=host, onnx_sha256=onnx_sha, request=request, sample=sample, reference=reference,
                runtime=_gate_runtime(trt, lean=options.lean),
            )
    except BackendUnavailableError as exc:
        return _skipped(bundle, str(exc))
    gate_doc = {**built.gate.to_json(), "runtime": f"TensorRT {host.tensorrt_version} on {torch.cuda.get_device_name(device)}"}
    if built.record is None:
        bundle = _record(bundle, {"failed": built.key.stem(), "gate": gate_doc})
        return bundle, f"TensorRT plan: NOT written, {built.gate.summary()}", False
    record = built.record
    doc = {"plan": record.plan_path.name, "key": built.key.to_json(), "build_seconds": built.build_seconds, "gate": gate_doc}
    bundle = _record(bundle, doc)
    lean = ", version-compatible (embeds the lean runtime)" if options.lean else ""
    return bundle, f"{record.plan_path}: TensorRT {host.tensorrt_version}{lean}, built in {built.build_seconds:.0f} s, {built.gate.summary()}", True
