"""TensorRT backend: runs a plan built from the bundle's fp16 ONNX, building it on first use where it can.

On construction the backend looks in the bundle's ``engines/`` folder (or ``$CELLSEG3D_ENGINES/<name>``)
for a plan whose key fits this host: GPU compute capability, TensorRT version, sha256 of
``model.fp16.onnx``, and a profile covering the patch (``engine_key.py``). A plan is never loaded blindly:
one for another GPU or TensorRT version is passed over, with the reason logged. When none fits and the
full ``tensorrt`` package is installed, a plan is built (minutes; under a file lock so two processes do
not build the same plan at once), checked against torch fp32 (foreground Dice >= 0.99) and cached. With
only ``tensorrt_lean`` installed (a lean image), prebuilt version-compatible plans (``cellseg3d export
--lean``) run and nothing is built: a missing plan makes the backend unavailable, with the reason.

Inference binds torch CUDA tensors by address (``set_tensor_address``), sets the batch's shape
(``set_input_shape``) and enqueues ``execute_async_v3`` on a non-default torch stream that is ordered
after the caller's stream and before its next use of the output. Batches larger than the profile's
maximum are split.
"""

from __future__ import annotations

import logging
import time
from types import ModuleType
from typing import Any

import numpy as np
import torch

from ..bundle import Bundle
from ..errors import BackendUnavailableError, BundleError, InputError
from ..normalize import normalize
from ..postprocess import interior_probability
from .base import Backend, BackendOptions
from .engine_key import (
    FP16_FILE, INPUT_NAME, OUTPUT_NAME, EngineKey, PlanRecord, Profile, engines_dir, find_plan, plan_lock,
    read_plan, verify_onnx, write_plan,
)
from .trt_build import BuildSettings, build_serialized_plan, host_info, import_tensorrt, max_batch_for, timing_cache_path

__all__ = ["GATE_MIN_DICE", "TensorRTBackend", "TrtEngine", "default_profile", "quick_gate"]

logger = logging.getLogger(__name__)

GATE_MIN_DICE = 0.99
_INSTALL = "pip install tensorrt (builds and runs plans) or pip install tensorrt-lean (runs plans exported with --lean)"


class TrtEngine:
    """A deserialized plan with one execution context; ``run`` maps a CUDA batch to probabilities.

    Raises (constructor):
        BackendUnavailableError: this TensorRT cannot deserialize the plan (built elsewhere); the message names it.
        BundleError: the plan's inputs/outputs are not the bundle's fp32 ``input``/``output``.
    """

    def __init__(
        self, trt: ModuleType, plan: bytes, /, *, record: PlanRecord | None, profile: Profile, out_channels: int,
        device: torch.device, version_compatible: bool = False,
    ) -> None:
        where = record.plan_path if record is not None else "new plan"
        self.profile, self.out_channels, self.device = profile, out_channels, device
        self._logger = trt.Logger(trt.Logger.WARNING)  # must outlive the runtime and engine
        self._runtime = trt.Runtime(self._logger)
        if version_compatible and hasattr(self._runtime, "engine_host_code_allowed"):
            self._runtime.engine_host_code_allowed = True  # our own plan: keyed and sha-checked, or just built
        with torch.cuda.device(device):
            self.engine = self._runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise BackendUnavailableError(
                f"{where}: TensorRT {trt.__version__} cannot deserialize this plan (see its log); delete it to rebuild"
            )
        names = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)}
        types = {n: self.engine.get_tensor_dtype(n) for n in names}
        if names != {INPUT_NAME, OUTPUT_NAME} or any(t != trt.DataType.FLOAT for t in types.values()):
            raise BundleError(f"{where}: plan tensors {types} are not fp32 {INPUT_NAME!r} and {OUTPUT_NAME!r}; delete it to rebuild")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream(device=device)

    def _run_chunk(self, x: torch.Tensor) -> torch.Tensor:
        n, _, z, y, w = x.shape
        out = torch.empty((n, self.out_channels, z, y, w), dtype=torch.float32, device=self.device)
        caller = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(caller)  # the input was written on the caller's stream
        if not self.context.set_input_shape(INPUT_NAME, tuple(x.shape)):
            raise InputError(f"TensorRT rejects input shape {tuple(x.shape)}; the plan's profile is {self.profile.shapes()}")
        self.context.set_tensor_address(INPUT_NAME, x.data_ptr())
        self.context.set_tensor_address(OUTPUT_NAME, out.data_ptr())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed (see its log)")
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


def default_profile(bundle: Bundle, patch_shape: tuple[int, int, int], /, *, max_batch: int) -> Profile:
    """Batch 1..min(4, max)..max, spatial from the network's divisor up to ``patch_shape``."""
    d = bundle.divisor
    z, y, x = (min(d, side) for side in patch_shape)
    return Profile(
        channels=bundle.in_channels, patch_shape=patch_shape, min_spatial=(z, y, x), opt_batch=min(4, max_batch), max_batch=max_batch,
    )


def _gate_input(bundle: Bundle, patch_shape: tuple[int, int, int]) -> np.ndarray:
    """One normalized patch of a seeded synthetic volume of the bundle's kind (smooth noise if no generator)."""
    try:
        from .. import synthetic
    except ImportError:
        rng = np.random.default_rng(0)
        raw = torch.nn.functional.avg_pool3d(
            torch.from_numpy(rng.random((1, 1, *patch_shape), dtype=np.float32)), kernel_size=5, stride=1, padding=2
        )[0].numpy()
    else:
        make = synthetic.make_membrane_volume if bundle.output.kind == "boundary" else synthetic.make_nuclei_volume
        z, y, x = (max(8, p) for p in patch_shape)
        raw = make((z, y, x), seed=0).image[np.newaxis]
    raw = np.repeat(raw[:1, : patch_shape[0], : patch_shape[1], : patch_shape[2]], bundle.in_channels, axis=0)
    return normalize(raw, bundle.normalization)


def quick_gate(bundle: Bundle, engine: TrtEngine, patch_shape: tuple[int, int, int], /) -> dict[str, Any]:
    """Plan vs torch fp32 (TF32 off) on the GPU, one synthetic patch: foreground Dice and max probability error."""
    x = torch.from_numpy(_gate_input(bundle, patch_shape))[None].to(engine.device)
    model = bundle.load_model().to(engine.device)
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.inference_mode():
            expected = model(x).float()[0].cpu().numpy()
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    got = engine.run(x)[0].cpu().numpy()
    threshold = bundle.postprocess.threshold
    a = interior_probability(expected, bundle.output) > threshold
    b = interior_probability(got, bundle.output) > threshold
    total = int(a.sum()) + int(b.sum())
    dice = 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total
    return {
        "dice": round(dice, 6), "max_prob_error": float(np.abs(expected - got).max()), "min_dice": GATE_MIN_DICE,
        "passed": dice >= GATE_MIN_DICE, "sample": f"synthetic patch {patch_shape}", "reference": "torch fp32 (CUDA, TF32 off)",
    }


class TensorRTBackend(Backend):
    """TensorRT with the bundle's fp16 plan (fp16 compute, fp32 normalization and I/O)."""

    name = "tensorrt"
    precisions = ("fp16",)

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
        gate = bundle.export.get("fp16", {}).get("gate", {}) if isinstance(bundle.export.get("fp16"), dict) else {}
        if gate.get("passed") is False:
            raise BackendUnavailableError(
                f"{self.onnx_path}: failed its fp16 accuracy gate at export (Dice {gate.get('dice')}); TensorRT fp16 not used"
            )
        self.host = host_info(trt, can_build=self.can_build, device=self.device)
        self.directory = engines_dir(bundle)
        self.record, self.plan = self._load(bundle.patch_shape)

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if not torch.cuda.is_available():
            return f"torch {torch.__version__} sees no CUDA device"
        trt, _ = import_tensorrt()
        if trt is None:
            return f"neither tensorrt nor tensorrt_lean is installed; {_INSTALL}"
        return None

    def _find(self, patch_shape: tuple[int, ...]) -> tuple[PlanRecord | None, list[str]]:
        return find_plan(
            self.directory, host=self.host, onnx_sha256=self.onnx_sha, patch_shape=patch_shape, max_batch=self.options.max_batch
        )

    def _load(self, patch_shape: tuple[int, int, int]) -> tuple[PlanRecord, TrtEngine]:
        record, reasons = self._find(patch_shape)
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
                "on a host with the full TensorRT of this version and this GPU kind"
            )
        return self._build(patch_shape, avoid=avoid)

    def _engine(self, record: PlanRecord, plan: bytes) -> TrtEngine:
        return TrtEngine(
            self.trt, plan, record=record, profile=record.key.profile, out_channels=len(self.bundle.output.names),
            device=self.device, version_compatible=record.key.version_compatible,
        )

    def _build(self, patch_shape: tuple[int, int, int], *, avoid: object = None) -> tuple[PlanRecord, TrtEngine]:
        """Build, gate and cache a plan for this host (lazy build), under a lock on the engines folder.

        ``avoid`` is a plan path that failed to deserialize: it is not taken as another process's build.
        """
        max_batch = min(self.options.max_batch, max_batch_for(self.bundle, patch_shape))
        if max_batch < 1:
            raise BackendUnavailableError(
                f"{self.bundle.path}: one {patch_shape} patch has an activation of 2**31 elements or more; use a smaller patch"
            )
        profile = default_profile(self.bundle, patch_shape, max_batch=max_batch)
        key = EngineKey(
            compute_capability=self.host.compute_capability, tensorrt_version=self.host.tensorrt_version,
            onnx_sha256=self.onnx_sha, profile=profile,
        )
        with plan_lock(self.directory, key.stem()):
            record, _ = self._find(patch_shape)  # another process may have built it while we waited
            if record is not None and record.plan_path != avoid:
                return record, self._engine(record, read_plan(record))
            logger.warning("%s: no TensorRT plan for this GPU/TensorRT; building one (minutes, once)", self.directory)
            started = time.perf_counter()
            settings = BuildSettings(timing_cache=timing_cache_path(self.directory, self.host))
            plan = build_serialized_plan(self.trt, self.onnx_path, profile, settings=settings)
            build_s = time.perf_counter() - started
            engine = TrtEngine(self.trt, plan, record=None, profile=profile, out_channels=len(self.bundle.output.names), device=self.device)
            gate = quick_gate(self.bundle, engine, patch_shape)
            if not gate["passed"]:
                raise BackendUnavailableError(
                    f"{self.onnx_path}: the TensorRT plan built here fails the accuracy gate "
                    f"(Dice {gate['dice']} < {GATE_MIN_DICE}); not cached"
                )
            meta = {
                "built_by": "engine lazy build", "onnx_file": FP16_FILE, "gpu": torch.cuda.get_device_name(self.device),
                "tensorrt": self.host.tensorrt_version, "torch": torch.__version__, "build_seconds": round(build_s, 1), "gate": gate,
            }
            return write_plan(self.directory, key, plan, meta=meta), engine

    def run(self, batch: torch.Tensor, /) -> torch.Tensor:
        spatial = tuple(int(s) for s in batch.shape[2:])
        if not self.record.key.profile.covers(spatial):
            patch = tuple(max(a, b) for a, b in zip(spatial, self.record.key.profile.patch_shape))
            logger.warning(
                "%s: plan covers patches up to %s, got %s; loading or building one for %s",
                self.record.plan_path, self.record.key.profile.patch_shape, spatial, patch,
            )
            self.record, self.plan = self._load((patch[0], patch[1], patch[2]))
        return self.plan.run(batch)

    @property
    def device_name(self) -> str:
        return f"{torch.cuda.get_device_name(self.device)} (TensorRT {self.host.tensorrt_version}, {self.record.plan_path.name})"

    def close(self) -> None:
        self.plan = None  # type: ignore[assignment]
