"""TensorRT backend: runs a plan built from the bundle's fp16 ONNX, building it on first use where it can.

On construction the backend looks in the bundle's ``engines/`` folder (or ``$CELLSEG3D_ENGINES/<name>``)
for a plan whose key fits this host: GPU compute capability, TensorRT version, sha256 of
``model.fp16.onnx``, and a profile covering the patch (``engine_key.py``). A plan is never loaded blindly:
one for another GPU or TensorRT version is passed over, with the reason logged. When none fits and the
full ``tensorrt`` package is installed, a plan is built (minutes; under a file lock so two processes do
not build the same plan at once), gated against torch fp32 (:mod:`engine.backends.trt_plans`) and cached.
With only ``tensorrt_lean`` installed (a lean image), version-compatible plans of that exact version
(``cellseg3d export --lean``) run and nothing is built: a missing plan makes the backend unavailable.

:meth:`TensorRTBackend.prepare` loads or builds the plan for the fitted patch and batch before streaming;
after it, a batch the plan does not cover is an error rather than a build in the middle of a run.
"""

from __future__ import annotations

import logging
from typing import ClassVar

import torch

from ..bundle import Bundle
from ..errors import BackendUnavailableError, InputError
from .base import Backend, BackendOptions
from .engine_key import (
    FP16_FILE,
    PlanRecord,
    engines_dir,
    find_plan,
    plan_lock,
    read_plan,
    verify_onnx,
)
from .gate import load_sample, torch_probabilities
from .trt_build import (
    BuildSettings,
    host_info,
    import_tensorrt,
    max_batch_for,
    timing_cache_path,
)
from .trt_plans import PlanRequest, build_gated_plan, default_profile
from .trt_runtime import TrtEngine, cuda_driver_version, cuda_mismatch

__all__ = ["INSTALL_HINT", "TensorRTBackend"]

logger = logging.getLogger(__name__)

INSTALL_HINT = (
    "pip install tensorrt-cu12 (builds and runs plans; name your CUDA major: the plain 'tensorrt' package pulls the "
    "CUDA 13 build) or pip install tensorrt-lean-cu12 (runs plans exported with --lean)"
)


class TensorRTBackend(Backend):
    """TensorRT with the bundle's fp16 plan (fp16 compute, fp32 normalization and I/O)."""

    name: ClassVar[str] = "tensorrt"
    precisions: ClassVar[tuple[str, ...]] = ("fp16",)

    def __init__(self, bundle: Bundle, /, *, options: BackendOptions) -> None:
        super().__init__(bundle, options=options)
        reason = self.unavailable_reason()
        trt, self.can_build = import_tensorrt()
        if reason is not None or trt is None:
            raise BackendUnavailableError(f"backend {self.name}: {reason}")
        self.trt = trt
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.onnx_path = bundle.path / FP16_FILE
        self.onnx_sha = verify_onnx(bundle, self.onnx_path)
        fp16 = bundle.export.get("fp16")
        gate = fp16.get("gate", {}) if isinstance(fp16, dict) else {}
        if gate.get("passed") is False:
            raise BackendUnavailableError(
                f"{self.onnx_path}: failed its fp16 accuracy gate at export (Dice {gate.get('dice')}); TensorRT fp16 not used"
            )
        self.host = host_info(trt, can_build=self.can_build, device=self.device)
        self.directory = engines_dir(bundle)
        self.record, self.plan = self._load(bundle.patch_shape, options.max_batch)

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if not torch.cuda.is_available():
            return f"torch {torch.__version__} sees no CUDA device"
        trt, _ = import_tensorrt()
        if trt is None:
            return f"neither tensorrt nor tensorrt_lean is installed; {INSTALL_HINT}"
        return cuda_mismatch(trt, driver=cuda_driver_version())

    def prepare(self, patch_shape: tuple[int, int, int], max_batch: int, /) -> None:
        """Load or build the plan for ``max_batch`` patches of ``patch_shape`` now, before streaming."""
        super().prepare(patch_shape, max_batch)
        self._cover(patch_shape, max_batch)

    def _cover(self, patch_shape: tuple[int, ...], max_batch: int) -> None:
        """Switch to a plan whose profile covers ``patch_shape`` and ``max_batch`` (capped by the options)."""
        profile = self.record.key.profile
        if not profile.covers(tuple(patch_shape)) or profile.max_batch < min(max_batch, self.options.max_batch):
            patch = tuple(max(a, b) for a, b in zip(patch_shape, profile.patch_shape))
            self.record, self.plan = self._load((patch[0], patch[1], patch[2]), max(max_batch, profile.max_batch))

    def _find(self, patch_shape: tuple[int, ...], max_batch: int) -> tuple[PlanRecord | None, list[str]]:
        return find_plan(self.directory, host=self.host, onnx_sha256=self.onnx_sha, patch_shape=patch_shape, max_batch=max_batch)

    def _load(self, patch_shape: tuple[int, int, int], max_batch: int) -> tuple[PlanRecord, TrtEngine]:
        record, reasons = self._find(patch_shape, max_batch)
        for reason in reasons:
            logger.warning("%s: plan not used: %s", self.directory, reason)
        avoid = None
        if record is not None:
            try:
                return record, self._engine(record, read_plan(record))
            except BackendUnavailableError as exc:
                if not self.can_build:
                    raise
                logger.warning("%s; building a new plan", exc)
                avoid = record.plan_path
        if not self.can_build:
            raise BackendUnavailableError(
                f"{self.directory}: no TensorRT plan fits this host ({'; '.join(reasons) or 'no plans there'}) and only the lean "
                f"runtime {self.host.tensorrt_version} is installed, which cannot build one; export one with 'cellseg3d export --lean' "
                "with the full TensorRT of this exact version on this GPU kind"
            )
        return self._build(patch_shape, max_batch, avoid=avoid)

    def _engine(self, record: PlanRecord, plan: bytes) -> TrtEngine:
        return TrtEngine(
            self.trt, plan, record=record, profile=record.key.profile, channels=(self.bundle.in_channels, len(self.bundle.output.names)),
            device=self.device, version_compatible=record.key.version_compatible,
        )

    def _build(self, patch_shape: tuple[int, int, int], max_batch: int, *, avoid: object = None) -> tuple[PlanRecord, TrtEngine]:
        """Build, gate and cache a plan for this host, under a lock on the engines folder.

        ``avoid`` is a plan path that failed to deserialize: it is not taken as another process's build.
        """
        cap = min(max_batch, max_batch_for(self.bundle, patch_shape))
        if cap < 1:
            raise BackendUnavailableError(
                f"{self.bundle.path}: one {patch_shape} patch has an activation of 2**31 elements or more; use a smaller patch"
            )
        request = PlanRequest(
            profile=default_profile(self.bundle, patch_shape, max_batch=cap),
            settings=BuildSettings(timing_cache=timing_cache_path(self.directory, self.host)),
            directory=self.directory, built_by="engine lazy build",
        )
        with plan_lock(self.directory, f"{self.onnx_sha[:16]}_{request.profile.tag()}"):
            record, _ = self._find(patch_shape, cap)  # another process may have built it while we waited
            if record is not None and record.plan_path != avoid:
                return record, self._engine(record, read_plan(record))
            logger.warning("%s: no TensorRT plan for this GPU/TensorRT; building one (minutes, once)", self.directory)
            sample = load_sample(self.bundle)
            reference = torch_probabilities(self.bundle, sample, device=self.device)
            built = build_gated_plan(
                self.trt, self.bundle, host=self.host, onnx_sha256=self.onnx_sha, request=request, sample=sample, reference=reference,
            )
        if built.record is None or built.engine is None:
            raise BackendUnavailableError(f"{self.onnx_path}: the TensorRT plan built here fails the accuracy gate ({built.gate.summary()}); not cached")
        return built.record, built.engine

    def forward(self, batch: torch.Tensor, /) -> torch.Tensor:
        spatial = tuple(int(s) for s in batch.shape[2:])
        profile = self.record.key.profile
        if not profile.covers(spatial):
            if self.prepared is not None:
                raise InputError(
                    f"{self.record.plan_path}: prepared for patches up to {profile.patch_shape}, got {spatial}; call prepare() with that patch"
                )
            logger.warning("%s: plan covers patches up to %s, got %s; loading or building one (call prepare() before streaming)",
                           self.record.plan_path, profile.patch_shape, spatial)
            self._cover(spatial, profile.max_batch)
        return self.plan.run(batch)

    @property
    def device_name(self) -> str:
        return f"{torch.cuda.get_device_name(self.device)} (TensorRT {self.host.tensorrt_version}, {self.record.plan_path.name})"

    def close(self) -> None:
        self.plan = None  # type: ignore[assignment]
