"""The export chain for one bundle: model.onnx -> model.fp16.onnx (+ gate) -> TensorRT plan (+ gate).

Each step's record lands in ``bundle.json``'s ``export`` section as soon as the step succeeds, so a later
failure leaves the earlier results recorded. ``cellseg3d export`` is a thin wrapper around
:func:`export_bundle`.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import onnxruntime as ort
import torch

from engine.backends.engine_key import FP16_FILE
from engine.backends.gate import (
    GateResult,
    compare,
    load_sample,
    probabilities,
    torch_probabilities,
)
from engine.bundle import Bundle, load_bundle, write_bundle_json
from engine.errors import InputError

from .checkpoint import bundle_from_checkpoint
from .fp16 import convert_fp16
from .onnx_export import DEFAULT_OPSET, OPSETS, export_onnx, ort_cpu_runner

__all__ = ["ExportOptions", "ExportSummary", "export_bundle", "resolve_source"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportOptions:
    """Export settings.

    Args:
        opset: ONNX opset (18, 19 or 20).
        max_batch: the TensorRT profile's largest batch.
        tensorrt: build a TensorRT plan when TensorRT and a GPU are present.
        lean: make the plan version-compatible with the lean runtime excluded (runs on ``tensorrt_lean``).
        workspace_gib: TensorRT builder workspace limit.
    """

    opset: int = DEFAULT_OPSET
    max_batch: int = 8
    tensorrt: bool = True
    lean: bool = False
    workspace_gib: float = 4.0

    def __post_init__(self) -> None:
        if self.opset not in OPSETS:
            raise InputError(f"--opset must be one of {list(OPSETS)}, got {self.opset}")
        if self.max_batch < 1:
            raise InputError(f"--max-batch must be >= 1, got {self.max_batch}")
        if not self.workspace_gib > 0:
            raise InputError(f"--workspace-gib must be > 0, got {self.workspace_gib}")


@dataclass
class ExportSummary:
    """What the export wrote; ``ok`` is False when a gate failed."""

    bundle: Bundle
    lines: list[str] = field(default_factory=list)
    ok: bool = True


def resolve_source(source: Path, /, *, out: Path | None) -> Bundle:
    """The bundle to export into: ``source`` itself, a copy of it in ``out``, or one made from a checkpoint.

    Raises:
        InputError: ``source`` does not exist, or a checkpoint comes without ``--out``.
        BundleError: a malformed bundle or checkpoint.
    """
    if source.is_dir():
        bundle = load_bundle(source)
        if out is None or out.resolve() == source.resolve():
            return bundle
        out.mkdir(parents=True, exist_ok=True)
        named = bundle.validation.get("sample")
        for name in ("bundle.json", "model.pt", "sample.tif", named if isinstance(named, str) else None):
            if name and (source / name).is_file():
                shutil.copy2(source / name, out / name)
        return load_bundle(out)
    if source.is_file():
        if out is None:
            raise InputError(f"{source}: a checkpoint needs --out DIR, the bundle folder to write")
        return bundle_from_checkpoint(source, out)
    raise InputError(f"{source}: no such bundle folder or checkpoint file")


def _record(bundle: Bundle, key: str, value: Any) -> Bundle:
    updated = replace(bundle, export={**bundle.export, key: value})
    write_bundle_json(updated)
    return updated


def export_bundle(bundle: Bundle, /, *, options: ExportOptions = ExportOptions()) -> ExportSummary:
    """Run the export chain on ``bundle`` (files are written into ``bundle.path``).

    Raises:
        ExportError: a file failed its check (nothing of that step is kept).
        InputError, BundleError: bad options or bundle.
    """
    summary = ExportSummary(bundle=bundle)
    sample = load_sample(bundle)
    reference = torch_probabilities(bundle, sample)
    record = export_onnx(bundle, sample=sample, reference=reference, opset=options.opset)
    bundle = _record(bundle, "onnx", record)
    errs = record["max_abs_err"]
    summary.lines.append(
        f"{bundle.path / record['file']}: fp32, opset {record['opset']}, max abs error vs torch "
        f"{errs['random']:.2e} (random) {errs['sample']:.2e} (sample)"
    )

    record16 = convert_fp16(bundle, sample=sample, opset=options.opset)
    started = time.perf_counter()
    candidate = probabilities(bundle, sample, ort_cpu_runner(str(bundle.path / FP16_FILE)), device=torch.device("cpu"))
    gate: GateResult = compare(bundle, reference, candidate, sample=sample.source, started=started)
    record16["gate"] = {**gate.to_json(), "runtime": f"onnxruntime {ort.__version__} CPU"}
    bundle = _record(bundle, "fp16", record16)
    norms = record16["normalization_nodes_fp32"]
    summary.lines.append(f"{bundle.path / FP16_FILE}: fp16 ({norms} normalization nodes fp32), {gate.summary()}")
    if not gate.passed:
        summary.ok = False
        logger.warning("%s: fp16 accuracy gate failed; backends run this bundle in fp32", bundle.path / FP16_FILE)

    if not options.tensorrt or not gate.passed:
        reason = "--no-trt given" if not options.tensorrt else "the fp16 ONNX failed its accuracy gate"
        bundle = _record(bundle, "tensorrt", {"skipped": reason})  # no stale record of an earlier export
        summary.lines.append(f"TensorRT plan: skipped ({reason})")
    else:
        from .tensorrt_build import TrtBuildOptions, build_plan_for_bundle

        trt_options = TrtBuildOptions(max_batch=options.max_batch, lean=options.lean, workspace_gib=options.workspace_gib)
        bundle, line, passed = build_plan_for_bundle(bundle, sample=sample, reference=reference, options=trt_options)
        summary.lines.append(line)
        summary.ok = summary.ok and passed
    summary.bundle = bundle
    return summary
