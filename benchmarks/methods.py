"""The timed methods: this engine (end to end and network alone, per backend and precision) and the peers.

Each method runs on a :class:`~benchmarks.cases.Case` and returns one record (a dict, see
:func:`run_method`) with its seconds per stage, voxels/s, network voxels, GFLOP/s, fraction of the
machine's peak and foreground Dice against the fp32 reference. End-to-end runs go TIFF in -> labels TIFF
out; the peers get the engine's reading, normalization, post-processing and writing around their
inference, so only the inference strategy differs.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from numpy.typing import NDArray

from engine.backends import Backend, BackendOptions, backend_class, select_backend
from engine.bundle import Bundle
from engine.errors import CellSegError
from engine.io import read_volume, write_labels
from engine.metrics import match_instances
from engine.normalize import normalize
from engine.pipeline import SegmentOptions, segment
from engine.labels import label_cells
from engine.tiling import fit_patch_shape

from . import peers
from .cases import Case, fitted_patch, largest_patch
from .measure import TimedNetwork, mask_dice, native_precisions

__all__ = ["Method", "Context", "default_methods", "run_method"]

logger = logging.getLogger(__name__)

Kind = Literal["engine", "model", "peer"]


@dataclass(frozen=True)
class Method:
    """One row of the table.

    Args:
        name: unique, e.g. ``engine torch-cpu bf16``.
        kind: ``engine`` (end to end), ``model`` (the network alone on one batch) or ``peer`` (end to end).
        backend: engine backend name, or for peers the device they run on (``cpu`` / ``cuda``).
        precision: ``fp32``, ``bf16`` or ``fp16``.
        peer: ``monai``, ``pytorch-3dunet`` or ``original-loop`` for peers.
        patch: which patch the run uses (passed as ``--patch`` to the engine, as ``roi_size`` to MONAI):
            ``bundle`` (the bundle's recommended patch), ``peer`` (:attr:`Context.peer_patch`, what a user of
            MONAI or pytorch-3dunet runs: the issue's 64x128x128), ``fit`` (the peer patch shrunk to the fewest
            patches that keep its overlap, :func:`benchmarks.cases.fitted_patch`, the tiler change proposed in
            PERFORMANCE.md) or ``slab`` (one patch as large as the volume and :attr:`Context.slab_voxels` allow).
    """

    name: str
    kind: Kind
    backend: str
    precision: str
    peer: str = ""
    patch: Literal["bundle", "peer", "fit", "slab"] = "bundle"


@dataclass
class Context:
    """What all methods of one run share.

    Args:
        bundle: the model bundle.
        device: ``cpu`` or ``cuda`` (for peers and the reference).
        flops_per_voxel: network FLOPs per input voxel.
        peaks: measured matmul GFLOP/s per precision on ``device``.
        out_dir: where label TIFFs are written.
        repeats: timed repetitions (the best is kept).
        slab_voxels: the voxel budget of a slab patch.
        warmup: run each end-to-end method once untimed first (cuDNN autotuning, TensorRT plans, allocator).
        score_truth: score each run's labels against the generator's ground truth (F1 at IoU 0.5), untimed.
        peer_patch: the patch the peers run with (and the engine's ``peer``/``fit`` rows).
    """

    bundle: Bundle
    device: torch.device
    flops_per_voxel: float
    peaks: dict[str, float]
    out_dir: Path
    repeats: int = 1
    slab_voxels: int = 2**23
    warmup: bool = False
    score_truth: bool = True
    peer_patch: tuple[int, int, int] = (64, 128, 128)


def default_methods(*, gpu: bool) -> list[Method]:
    """Every method that makes sense on this host (unavailable ones are still listed, and skipped with the reason).

    Names are unique by construction (a row whose name is already taken, such as ``monai {fast}`` when the
    fast precision is fp32, is the same run and is not added twice).
    """
    from engine.backends import BACKEND_ORDER

    device = torch.device("cuda" if gpu else "cpu")
    methods: dict[str, Method] = {}

    def add(method: Method) -> None:
        methods.setdefault(method.name, method)

    for name in BACKEND_ORDER:
        on_gpu = name.endswith(("cuda", "gpu")) or name == "tensorrt"
        if on_gpu != gpu:
            continue
        try:
            precisions = backend_class(name).precisions
        except CellSegError:
            precisions = ("fp32",)
        for precision in precisions:
            add(Method(f"engine {name} {precision}", "engine", name, precision))
    fast = "fp16" if gpu else native_precisions(device)[-1]
    fast_backend = "torch-cuda" if gpu else "torch-cpu"
    for mode in ("peer", "fit", "slab"):
        add(Method(f"engine {fast_backend} {fast} {mode}-patch", "engine", fast_backend, fast, patch=mode))  # type: ignore[arg-type]
    for m in list(methods.values()):
        if m.patch == "bundle":
            add(Method(f"model {m.backend} {m.precision}", "model", m.backend, m.precision))
    dev = device.type
    for method in (
        Method("monai fp32", "peer", dev, "fp32", peer="monai", patch="peer"),
        Method(f"monai {fast}", "peer", dev, fast, peer="monai", patch="peer"),
        Method("monai fp32 bundle-patch", "peer", dev, "fp32", peer="monai", patch="bundle"),
        Method("pytorch-3dunet fp32", "peer", dev, "fp32", peer="pytorch-3dunet", patch="peer"),
        Method("original-loop fp32", "peer", dev, "fp32", peer="original-loop"),
    ):
        add(method)
    return list(methods.values())


class _TimedBackend:
    """A loaded backend whose ``run`` is timed; passed to ``engine.segment`` in place of the backend."""

    def __init__(self, backend: Backend) -> None:
        self.inner = backend
        self.net = TimedNetwork(backend.run, backend.device)
        self.name, self.precision, self.device = backend.name, backend.precision, backend.device
        self.device_name = backend.device_name

    def run(self, batch: torch.Tensor, /) -> torch.Tensor:
        return self.net(batch)

    def __getattr__(self, name: str) -> Any:  # prepare, oom_errors, can_grow_patch...: the backend's own
        return getattr(self.inner, name)

    def close(self) -> None:
        self.inner.close()


@contextlib.contextmanager
def _stage(timings: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


def _record(method: Method, case: Case, ctx: Context, **fields: Any) -> dict[str, Any]:
    return {
        "method": method.name, "kind": method.kind, "backend": method.backend, "precision": method.precision,
        "size": case.size, "shape": list(case.shape), **fields,
    }


def _finish(
    rec: dict[str, Any], case: Case, ctx: Context, net: TimedNetwork, seconds: float, probs: NDArray[np.float32] | None,
    labels: NDArray[np.uint32] | None = None,
) -> dict[str, Any]:
    flops = ctx.flops_per_voxel * net.voxels
    gflops = flops / net.seconds / 1e9 if net.seconds > 0 else 0.0
    peak = ctx.peaks.get(rec["precision"]) or 0.0
    rec.update(
        seconds=seconds,
        voxels_per_s=case.voxels / seconds if seconds > 0 else 0.0,
        net_seconds=net.seconds,
        net_voxels=net.voxels,
        net_calls=net.calls,
        overlap_factor=net.voxels / case.voxels,
        gflop=flops / 1e9,
        gflops=gflops,
        peak_gflops=peak,
        peak_fraction=gflops / peak if peak > 0 else None,
    )
    if probs is not None and case.reference_mask is not None:
        rec["dice"] = mask_dice(probs, case.reference_mask, ctx.bundle)
    if labels is not None and case.truth is not None and ctx.score_truth:
        scores = match_instances(labels, case.truth, iou_threshold=0.5)
        rec["f1_truth"], rec["iou_truth"] = scores.f1, scores.mean_matched_iou
    return rec


def run_patch(method: Method, case: Case, ctx: Context, /) -> tuple[int, int, int]:
    """The patch ``method`` runs with on ``case`` (fitted to the volume as the engine fits it)."""
    bundle = ctx.bundle
    if method.patch == "slab":
        return largest_patch(case.shape, bundle.divisor, max_voxels=ctx.slab_voxels)
    if method.patch == "fit":
        return fitted_patch(case.shape, ctx.peer_patch, bundle.divisor, bundle.overlap)
    base = ctx.peer_patch if method.patch == "peer" else bundle.patch_shape
    return fit_patch_shape(case.shape, base, bundle.divisor)


def _engine_e2e(method: Method, case: Case, ctx: Context) -> dict[str, Any]:
    bundle = ctx.bundle
    timings: dict[str, float] = {}
    patch = run_patch(method, case, ctx)
    options = SegmentOptions(backend=method.backend, precision=method.precision, patch_shape=patch)
    start = time.perf_counter()
    with _stage(timings, "load"):
        backend = _TimedBackend(select_backend(method.backend, bundle, options=BackendOptions(precision=method.precision)))
    try:
        with _stage(timings, "read"):
            volume = read_volume(case.tiff, channels=bundle.in_channels)
        result = segment(volume.data, bundle=bundle, options=options, voxel_size_um=volume.voxel_size_um, backend=backend)  # type: ignore[arg-type]
        timings.update({k: v for k, v in result.report.timings.items() if k != "load"})
        with _stage(timings, "write"):
            write_labels(ctx.out_dir / f"{case.size}_{method.name.replace(' ', '_')}.tif", result.labels, voxel_size_um=volume.voxel_size_um)
    finally:
        backend.close()
    seconds = time.perf_counter() - start
    report = result.report
    rec = _record(method, case, ctx, patch=list(report.patch_shape), batch=report.batch_size, overlap=bundle.overlap, n_patches=report.n_patches, timings=timings, n_cells=report.n_cells, device=report.device)
    return _finish(rec, case, ctx, backend.net, seconds, result.probabilities, result.labels)


def _model_alone(method: Method, case: Case, ctx: Context) -> dict[str, Any]:
    bundle = ctx.bundle
    patch = fit_patch_shape(case.shape, bundle.patch_shape, bundle.divisor)
    batch_size = 1 if method.backend.endswith("cpu") else 4
    with select_backend(method.backend, bundle, options=BackendOptions(precision=method.precision)) as backend:
        gen = torch.Generator().manual_seed(0)
        batch = torch.randn((batch_size, bundle.in_channels, *patch), generator=gen).to(backend.device)
        backend.prepare(patch, batch_size)  # a TensorRT build or load never lands inside a timing
        best: TimedNetwork | None = None
        warmups = 1 if backend.device.type == "cuda" or ctx.repeats > 1 else 0
        repeats = max(ctx.repeats, 5) if backend.device.type == "cuda" else ctx.repeats
        for i in range(warmups + repeats):
            net = TimedNetwork(backend.run, backend.device)
            net(batch)
            if i >= warmups and (best is None or net.seconds < best.seconds):
                best = net
    if best is None:
        raise RuntimeError("no timed repetition ran (repeats must be >= 1)")
    voxels = best.voxels
    rec = _record(method, case, ctx, patch=list(patch), batch=batch_size, timings={"network": best.seconds}, device=str(ctx.device))
    rec = _finish(rec, case, ctx, best, best.seconds, None)
    rec["voxels_per_s"] = voxels / best.seconds
    rec["overlap_factor"] = None
    return rec


def _peer_network(method: Method, ctx: Context) -> tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[], None]]:
    """fp32: the plain model as a peer's user runs it; otherwise the engine's torch backend (same settings)."""
    if method.precision == "fp32":
        model = ctx.bundle.load_model().to(ctx.device)
        return (lambda x: model(x)), (lambda: None)
    name = "torch-cuda" if ctx.device.type == "cuda" else "torch-cpu"
    backend = select_backend(name, ctx.bundle, options=BackendOptions(precision=method.precision))
    return backend.run, backend.close


def _peer_e2e(method: Method, case: Case, ctx: Context) -> dict[str, Any]:
    bundle = ctx.bundle
    k = len(bundle.output.names)
    patch = run_patch(method, case, ctx)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    with _stage(timings, "load"):
        forward, close = _peer_network(method, ctx)
        net = TimedNetwork(forward, ctx.device)
    try:
        with _stage(timings, "read"):
            volume = read_volume(case.tiff, channels=bundle.in_channels)
        with _stage(timings, "normalize"):
            net_input = normalize(volume.data, bundle.normalization)
        with _stage(timings, "infer"):
            if method.peer == "monai":
                probs = peers.monai_sliding_window(net_input, net, roi_size=patch, device=ctx.device)
                extra: dict[str, Any] = {"patch": list(patch), "overlap": 0.25, "batch": 4}
            elif method.peer == "pytorch-3dunet":
                halo = peers.pytorch3dunet_halo(patch, bundle.divisor)
                probs = peers.pytorch3dunet_predictor(net_input, net, patch=patch, halo=halo, device=ctx.device, out_channels=k)
                extra = {"patch": [p + 2 * h for p, h in zip(patch, halo)], "halo": list(halo), "batch": 1}
            else:
                probs = peers.original_loop(net_input, net, divisor=bundle.divisor, device=ctx.device, out_channels=k)
                extra = {"patch": [16, *case.shape[1:]], "overlap": 0.0, "batch": 1}
        with _stage(timings, "postprocess"):
            labels = label_cells(probs, output=bundle.output, spec=bundle.postprocess)
        with _stage(timings, "write"):
            write_labels(ctx.out_dir / f"{case.size}_{method.name.replace(' ', '_')}.tif", labels, voxel_size_um=volume.voxel_size_um)
    finally:
        close()
    seconds = time.perf_counter() - start
    rec = _record(method, case, ctx, timings=timings, n_cells=int(labels.max()), device=str(ctx.device), **extra)
    return _finish(rec, case, ctx, net, seconds, probs, labels)


def unavailable_reason(method: Method) -> str | None:
    """Why ``method`` cannot run here, or None."""
    on_gpu = method.backend in ("cuda", "tensorrt") or method.backend.endswith(("cuda", "gpu"))
    if not on_gpu and method.precision not in native_precisions(torch.device("cpu")):
        return f"{method.precision} is emulated on this CPU (no AVX512-BF16/AMX-BF16): minutes per patch, not a real run"
    if method.kind in ("engine", "model"):
        try:
            return backend_class(method.backend).unavailable_reason()
        except CellSegError as exc:
            return str(exc)
    if method.backend == "cuda" and not torch.cuda.is_available():
        return "no CUDA device"
    if method.peer == "monai":
        return peers.monai_unavailable_reason()
    return None


def run_method(method: Method, case: Case, ctx: Context, /) -> dict[str, Any]:
    """Run ``method`` on ``case`` (best of ``ctx.repeats``) and return its record; a skip carries ``skipped``.

    The record holds: method, kind, backend, precision, size, shape, seconds, voxels_per_s, timings (per
    stage), net_seconds, net_voxels, overlap_factor (network voxels / stack voxels), gflops, peak_gflops,
    peak_fraction, dice (vs the fp32 reference), n_cells, patch, batch.
    """
    reason = unavailable_reason(method)
    if reason is None and method.kind == "engine" and method.patch != "bundle":
        default = fit_patch_shape(case.shape, ctx.bundle.patch_shape, ctx.bundle.divisor)
        if run_patch(method, case, ctx) == default:
            reason = f"same patch as the bundle's ({'x'.join(map(str, default))}): see the row without a suffix"
    if reason is None and method.kind == "peer" and method.patch == "bundle" and method.peer == "monai":
        if run_patch(method, case, ctx) == fit_patch_shape(case.shape, ctx.peer_patch, ctx.bundle.divisor):
            reason = "the bundle's patch is the peer patch: see 'monai fp32'"
    if reason is not None:
        return _record(method, case, ctx, skipped=reason)
    runner = {"engine": _engine_e2e, "model": _model_alone, "peer": _peer_e2e}[method.kind]
    try:
        if method.kind != "model" and ctx.warmup:
            runner(method, case, ctx)
        best: dict[str, Any] | None = None
        for _ in range(1 if method.kind == "model" else ctx.repeats):
            rec = runner(method, case, ctx)
            if best is None or rec["seconds"] < best["seconds"]:
                best = rec
    except (CellSegError, RuntimeError, MemoryError, OSError) as exc:
        logger.warning("%s on %s failed: %s: %s", method.name, case.size, type(exc).__name__, exc)
        return _record(method, case, ctx, skipped=f"failed: {type(exc).__name__}: {exc}")
    finally:
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    if best is None:
        return _record(method, case, ctx, skipped="no timed repetition ran (repeats must be >= 1)")
    return best
