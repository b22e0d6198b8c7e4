"""One benchmark run: machine facts, peaks, the reference per size, every method, one JSON file.

:func:`run_suite` is what ``cellseg3d bench`` and ``benchmarks/gpu_host.py`` call. The JSON is rewritten
after every method, so a run cut short still leaves its finished rows.
"""

from __future__ import annotations

import json
import math
import logging
import os
import platform
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.backends.torch_backend import cpu_flags, cpu_has_native_bf16, default_threads
from engine.bundle import Bundle
from engine.errors import CellSegError
from engine.metrics import match_instances
from engine.labels import label_cells

from .cases import SIZES, bench_bundle, make_case, reference_probabilities, scratch_dir
from .measure import flops_per_voxel, machine_peaks, native_precisions
from .methods import Context, default_methods, run_method

__all__ = ["SPEED_FLAGS", "SuiteConfig", "run_suite", "machine_info"]

# the CPU features a figure depends on (vector width, bf16 arithmetic), recorded with every run
SPEED_FLAGS = frozenset({"avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "asimd", "bf16", "sve"})
GENERATE_VOXELS_PER_S = 2.5e6  # synthetic volume generation speed on the project's CPU (for the time budget)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SuiteConfig:
    """What to run.

    Args:
        sizes: names from ``benchmarks.cases.SIZES``.
        gpu: run the CUDA methods (and the peers on CUDA) instead of the CPU ones.
        repeats: timed repetitions per method (the best is kept).
        only: substrings; when given, only methods whose name contains one of them run.
        prefer_default_bundle: benchmark ``engine/default_bundle`` when it is installed.
        slab_voxels: voxel budget of the engine's ``slab-patch`` rows.
        shapes: optional ``size -> (Z, Y, X)`` overrides.
        size_only: optional ``size -> substrings``: on that size only the matching methods run.
        bundle_dir: benchmark this bundle instead (overrides ``prefer_default_bundle``).
        deadline_s: methods that would start after this many seconds are skipped (with that reason).
        warmup_first_size: on CUDA, one untimed end-to-end run per method on the first size.
        reference_cells_max_voxels: count the reference's cells (a post-processing run) up to this size.
        keep_labels: keep every run's label TIFF in ``out_dir/labels``.
        peer_patch: the patch (MONAI's ``roi_size``) the peers run with; the issue's reference is 64x128x128.
        rounds: run the whole method list this many times, round-robin, keeping each method's fastest run
            (on a shared machine a load spike then hurts one round of every method, not one method).
    """

    sizes: Sequence[str] = ("small",)
    gpu: bool = False
    repeats: int = 1
    only: Sequence[str] = ()
    prefer_default_bundle: bool = True
    slab_voxels: int = 2**23
    shapes: dict[str, tuple[int, int, int]] | None = None
    size_only: dict[str, Sequence[str]] | None = None
    bundle_dir: Path | None = None
    deadline_s: float | None = None
    warmup_first_size: bool = True
    reference_cells_max_voxels: int = 2**25
    keep_labels: bool = False
    peer_patch: tuple[int, int, int] = (64, 128, 128)
    rounds: int = 1


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device, /) -> dict[str, Any]:
    """The facts a number needs to be read: CPU, cores, load, torch, GPU."""
    info: dict[str, Any] = {
        "host": platform.node(),
        "cpu": _cpu_model(),
        "cores_available": default_threads(),
        "torch_threads": torch.get_num_threads(),
        "cpu_native_bf16": cpu_has_native_bf16(),
        "cpu_flags": sorted((cpu_flags() or frozenset()) & SPEED_FLAGS),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "loadavg_start": list(os.getloadavg()),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    for module in ("monai", "onnxruntime", "tensorrt"):
        try:
            info[module] = __import__(module).__version__
        except ImportError:
            info[module] = None
    return info


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write(doc: dict[str, Any], path: Path) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def _prepare_exports(bundle_dir: Path, gpu: bool, notes: list[str]) -> None:
    """Export ONNX (and a TensorRT plan on GPU hosts) into the scratch bundle so those backends can run."""
    try:
        from engine.bundle import load_bundle
        from export.bundle_export import ExportOptions, export_bundle
    except ImportError as exc:
        notes.append(f"no ONNX/TensorRT export ({exc}); those backends are skipped")
        return
    try:
        summary = export_bundle(load_bundle(bundle_dir), options=ExportOptions(tensorrt=gpu))
        notes.extend(summary.lines)
    except (CellSegError, ImportError, RuntimeError, OSError, ValueError) as exc:
        notes.append(f"export failed ({type(exc).__name__}: {exc}); ONNX/TensorRT backends are skipped")


def _warm_up(bundle: Bundle, device: torch.device) -> None:
    """Run each precision once on a small input, so no row pays the libraries' one-time start-up (thread
    pools, kernel JIT); shape-specific set-up stays in every row, as in a real run."""
    from engine.backends import BackendOptions, backend_class, select_backend

    d = bundle.divisor
    x = torch.randn((1, bundle.in_channels, 2 * d, 4 * d, 4 * d), device=device)
    with torch.inference_mode():
        bundle.load_model().to(device)(x)
    name = "torch-cuda" if device.type == "cuda" else "torch-cpu"
    for precision in (p for p in ("fp16", "bf16", "fp32") if p in native_precisions(device) and p in backend_class(name).precisions):
        with select_backend(name, bundle, options=BackendOptions(precision=precision)) as backend:
            backend.run(x)


def run_suite(config: SuiteConfig, out_dir: Path, /, *, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the benchmark and write ``out_dir/results.json``; returns the same document.

    Args:
        config: sizes, device, repetitions, filters.
        out_dir: results folder (created); label TIFFs of every run go to ``out_dir/labels`` with
            ``config.keep_labels``, else to a scratch folder that is removed.
        progress: called with one line per finished step.
    """
    say = progress or (lambda line: logger.info("%s", line))
    started = time.perf_counter()  # the deadline counts exports (a TensorRT build) and warm-up too
    device = torch.device("cuda") if config.gpu else torch.device("cpu")
    torch.set_num_threads(default_threads())
    out_dir.mkdir(parents=True, exist_ok=True)
    work = scratch_dir()
    labels_dir = out_dir / "labels" if config.keep_labels else work / "labels"
    labels_dir.mkdir(exist_ok=True)
    try:
        if config.bundle_dir is not None:
            from engine.bundle import load_bundle

            bundle, origin = load_bundle(config.bundle_dir), f"bundle {config.bundle_dir}"
        else:
            bundle, origin = bench_bundle(work, prefer_default=config.prefer_default_bundle)
        if bundle.path.resolve() != (work / "bench_bundle").resolve():
            shutil.copytree(bundle.path, work / "bench_bundle", ignore=shutil.ignore_patterns("engines"))
            from engine.bundle import load_bundle

            bundle = load_bundle(work / "bench_bundle")
        notes: list[str] = []
        methods = [m for m in default_methods(gpu=config.gpu) if not config.only or any(s in m.name for s in config.only)]
        if any(m.backend.startswith(("ort", "tensorrt")) for m in methods):
            _prepare_exports(bundle.path, config.gpu, notes)
            from engine.bundle import load_bundle

            bundle = load_bundle(bundle.path)
        peaks = machine_peaks(device)
        fpv = flops_per_voxel(bundle.build_model(), in_channels=bundle.in_channels, patch_shape=bundle.patch_shape)
        doc: dict[str, Any] = {
            "machine": machine_info(device),
            "bundle": {"name": bundle.name, "origin": origin, "model_sha256": _sha256(bundle.weights_path), "patch_shape": list(bundle.patch_shape), "overlap": bundle.overlap,
                       "architecture": bundle.architecture, "arch_kwargs": bundle.arch_kwargs, "postprocess": vars(bundle.postprocess)},
            "peer_patch": list(config.peer_patch),
            "flops_per_voxel": fpv,
            "peak_gflops": peaks,
            "peak_note": "best of 5 square matmuls (2048 on CPU, 8192 on CUDA) in this process",
            "notes": notes,
            "cases": [],
            "results": [],
        }
        say(f"bundle: {origin}; {fpv / 1e3:.1f} kFLOP/voxel; peak GFLOP/s {', '.join(f'{k} {v:.0f}' for k, v in peaks.items())}")
        ctx = Context(bundle=bundle, device=device, flops_per_voxel=fpv, peaks=peaks, out_dir=labels_dir,
                      repeats=config.repeats, slab_voxels=config.slab_voxels, peer_patch=config.peer_patch)
        _warm_up(bundle, device)
        for index, size in enumerate(config.sizes):
            shape = (config.shapes or {}).get(size) or SIZES[size]
            wanted = (config.size_only or {}).get(size)
            if config.deadline_s is not None and time.perf_counter() - started + math.prod(shape) / GENERATE_VOXELS_PER_S > config.deadline_s:
                reason = f"time budget of {config.deadline_s:.0f} s: no time left to generate and run this size"
                for method in methods:
                    if wanted is None or any(w in method.name for w in wanted):
                        doc["results"].append({"method": method.name, "kind": method.kind, "backend": method.backend,
                                               "precision": method.precision, "size": size, "shape": list(shape), "skipped": reason})
                say(f"{size}: skipped ({reason})")
                continue
            case = make_case(size, work, shape=shape)
            probs = reference_probabilities(case, bundle, device=device)
            if case.voxels <= config.reference_cells_max_voxels:
                ref_labels = label_cells(probs, output=bundle.output, spec=bundle.postprocess)
                case.notes["reference_cells"] = int(ref_labels.max())
                if case.truth is not None:
                    case.notes["reference_f1_truth"] = match_instances(ref_labels, case.truth, iou_threshold=0.5).f1
                del ref_labels
            del probs
            ctx.warmup = config.gpu and config.warmup_first_size and index == 0
            doc["cases"].append({"size": size, "shape": list(case.shape), "voxels": case.voxels, **case.notes})
            say(f"{size} {'x'.join(map(str, case.shape))}: reference {case.notes['reference']} in {case.notes['reference_seconds']:.1f} s")
            first_row = len(doc["results"])
            for round_ in range(config.rounds):
                row = first_row
                for method in methods:
                    if wanted is not None and not any(w in method.name for w in wanted):
                        continue
                    if config.deadline_s is not None and time.perf_counter() - started > config.deadline_s:
                        rec = {"method": method.name, "kind": method.kind, "backend": method.backend, "precision": method.precision,
                               "size": size, "shape": list(case.shape), "skipped": f"time budget of {config.deadline_s:.0f} s spent"}
                    else:
                        rec = run_method(method, case, ctx)
                    rec["loadavg"] = list(os.getloadavg())
                    if round_ == 0:
                        doc["results"].append(rec)
                    else:
                        old = doc["results"][row]
                        rec["rounds_seconds"] = [*old.get("rounds_seconds", [old.get("seconds")]), rec.get("seconds")]
                        if "skipped" in old or ("skipped" not in rec and rec["seconds"] < old["seconds"]):
                            doc["results"][row] = rec
                        else:
                            old["rounds_seconds"] = rec["rounds_seconds"]
                    row += 1
                    _write(doc, out_dir / "results.json")
                    say(("" if config.rounds == 1 else f"[round {round_ + 1}/{config.rounds}] ") + _line(rec))
        doc["machine"]["loadavg_end"] = list(os.getloadavg())
        _write(doc, out_dir / "results.json")
        return doc
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _line(rec: dict[str, Any]) -> str:
    if "skipped" in rec:
        return f"  {rec['method']:36s} skipped: {rec['skipped']}"
    dice = f"{rec['dice']:.4f}" if rec.get("dice") is not None else "-"
    return (f"  {rec['method']:36s} {rec['seconds']:8.2f} s {rec['voxels_per_s'] / 1e6:8.2f} Mvox/s "
            f"{rec['gflops']:7.1f} GFLOP/s dice {dice}")
