"""Orchestration only: read -> normalize -> tiled inference -> post-process -> write, with a run report.

``segment`` works on an array, ``segment_file`` on TIFF paths; both return a :class:`SegmentResult`
whose ``report`` says what ran (backend, precision, device, patch, batch, slabs) and how long each stage
took. Both run the slab loop of :mod:`engine.streaming`: a volume whose working set fits the memory budget
is one slab (the whole-volume computation); a larger one is streamed in z-slabs with reading, inference
and labelling overlapped, and ``segment_file`` then writes its outputs slab by slab without ever holding
the volume (see :class:`SegmentResult` for what the result holds in that case).
"""

from __future__ import annotations

import logging
import math
import os
import resource
import time
from dataclasses import dataclass, replace

import numpy as np
from numpy.typing import NDArray

from . import io
from .backends import Backend, BackendOptions, select_backend
from .bundle import Bundle, PostprocessSpec, load_bundle
from .errors import InputError
from .fitting import BackoffRunner, fit_tiling
from .normalize import normalization_stats
from .outputs import RunOutputs
from .progress import PROGRESS_UNITS, Progress, ProgressTracker
from .report import RunReport
from .scale import ScaledRun, ScalePlan, plan_for_source
from .labels import FileLabelStore, MemoryLabelStore, SlabLabeler
from .streaming import (
    ArraySource,
    Source,
    StreamTimings,
    plan_slabs,
    prefetched,
    stream,
    volume_stats,
)
from .tiff_stream import write_labels_stream
from .tiling import SlabGrid, TilingConfig

__all__ = ["SegmentOptions", "RunReport", "SegmentResult", "segment", "segment_file"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SegmentOptions:
    """Run settings; None means "as the bundle says" (or, for the batch, 1 on CPU and 4 on GPU).

    Args:
        backend: ``auto`` or a name from ``engine.backends.BACKEND_CHOICES``.
        precision: ``auto``, ``fp32``, ``bf16`` or ``fp16`` (what the backend supports).
        patch_shape: ``(z, y, x)``, multiples of the network's divisor.
        overlap: fraction of a patch shared with each neighbour, ``0 <= overlap < 1``.
        batch_size: patches per network call.
        threads: CPU threads (None: all cores available).
        threshold, min_dist, label_threshd: post-processing overrides (see ``PostprocessSpec``).
        slab_depth: planes per z-slab; None: one slab when the volume's working set fits
            ``memory_limit_gib``, else the deepest slab that does (:func:`engine.streaming.plan_slabs`).
        halo: planes added on each side of a slab for the watershed (None: ``max(8, 2 * min_dist)``); the
            slabbed watershed equals the whole-volume one when the halo exceeds the cells' extent in z.
        memory_limit_gib: host working-memory budget that sizes the slabs (None: 2 GiB, at most half of
            the available memory).
        progress_unit: ``patch`` or ``voxel``, what ``progress(done, total)`` counts (see
            :mod:`engine.progress`).
        voxel_size_um: ``(z, y, x)`` of the input in µm, overriding the file's (None: the file's, if any).
        cell_diameter: typical cell diameter, µm when the voxel size is known, else xy voxels (None:
            estimated from the data, see :mod:`engine.scale`).
        rescale: ``auto`` (run the network at the model's cell size and voxel grid) or ``off`` (as is).
    """

    backend: str = "auto"
    precision: str = "auto"
    patch_shape: tuple[int, int, int] | None = None
    overlap: float | None = None
    batch_size: int | None = None
    threads: int | None = None
    threshold: float | None = None
    min_dist: int | None = None
    label_threshd: int | None = None
    slab_depth: int | None = None
    halo: int | None = None
    memory_limit_gib: float | None = None
    progress_unit: str = "patch"
    voxel_size_um: tuple[float, float, float] | None = None
    cell_diameter: float | None = None
    rescale: str = "auto"


@dataclass(frozen=True)
class SegmentResult:
    """``labels``: ``(Z, Y, X)`` uint32, 0 = background; ``probabilities``: ``(K, Z, Y, X)`` float32.

    When ``segment_file`` streamed the volume (``report.n_slabs > 1``) nothing volume-sized is held in
    memory: ``labels`` is a read-only ``numpy.memmap`` over a temporary file (deleted when the array is
    garbage collected) and ``probabilities`` is None (ask for ``prob_path`` to get them on disk).
    ``segment`` always returns both in memory.
    """

    labels: NDArray[np.uint32]
    probabilities: NDArray[np.float32] | None
    report: RunReport

    @property
    def n_cells(self) -> int:
        return self.report.n_cells


def _postprocess_spec(bundle: Bundle, options: SegmentOptions) -> PostprocessSpec:
    overrides = {k: getattr(options, k) for k in ("threshold", "min_dist", "label_threshd") if getattr(options, k) is not None}
    if "threshold" in overrides and not 0 <= overrides["threshold"] <= 1:
        raise InputError(f"threshold must be between 0 and 1, got {overrides['threshold']}")
    for key in ("min_dist", "label_threshd"):
        if key in overrides and overrides[key] < 0:
            raise InputError(f"{key} must be >= 0, got {overrides[key]}")
    return replace(bundle.postprocess, **overrides)


def _check_options(options: SegmentOptions) -> None:
    if options.progress_unit not in PROGRESS_UNITS:
        raise InputError(f"progress unit must be one of {list(PROGRESS_UNITS)}, got {options.progress_unit!r}")
    if options.memory_limit_gib is not None and not options.memory_limit_gib > 0:
        raise InputError(f"memory limit must be > 0 GiB, got {options.memory_limit_gib}")
    if options.slab_depth is not None and options.slab_depth < 1:
        raise InputError(f"slab depth must be >= 1 plane, got {options.slab_depth}")
    if options.halo is not None and options.halo < 0:
        raise InputError(f"halo must be >= 0 planes, got {options.halo}")
    if options.rescale not in ("auto", "off"):
        raise InputError(f"rescale must be 'auto' or 'off', got {options.rescale!r}")


def _tiling(
    bundle: Bundle, options: SegmentOptions, shape: tuple[int, int, int], backend: Backend, scale: ScalePlan
) -> tuple[TilingConfig, str, tuple[int, int, int]]:
    """Patch and batch: the caller's, else fitted to the device (:func:`engine.fitting.fit_tiling`), on the
    model's grid; returns the tiling on the input grid, where it came from, and the model patch."""
    k = len(bundle.output.names)
    model_shape = scale.model_shape(shape)
    padded_plane = lambda patch: max(model_shape[1], patch[1]) * max(model_shape[2], patch[2])  # noqa: E731
    fit = fit_tiling(
        bundle, backend, model_shape, patch_shape=options.patch_shape, batch_size=options.batch_size,
        reserve_bytes=lambda patch: 4.0 * (k + 1) * patch[0] * padded_plane(patch),
    )
    config = TilingConfig(
        patch_shape=scale.input_patch(fit.patch_shape, shape),
        overlap=bundle.overlap if options.overlap is None else options.overlap,
        batch_size=fit.batch_size,
    )
    return config, fit.source, fit.patch_shape


def _scale(source: Source, stats: list[tuple[float, float]], bundle: Bundle, options: SegmentOptions,
           voxel_size_um: tuple[float, float, float] | None, backend: Backend) -> ScalePlan:
    """The zoom to the model's grid (:mod:`engine.scale`), estimated through ``backend`` when needed."""
    voxel = options.voxel_size_um or voxel_size_um
    if options.rescale == "off":
        return ScalePlan.unscaled("rescaling off", voxel)
    return plan_for_source(
        source, stats, bundle=bundle, run=backend.run, device=backend.device, voxel_size_um=voxel, cell_diameter=options.cell_diameter,
    )


def _halo(options: SegmentOptions, spec: PostprocessSpec, scale: ScalePlan) -> int | None:
    """The caller's halo; on a resampled grid, ``2 * min_dist`` model voxels in input planes (at least 8)."""
    if options.halo is None and not scale.identity and spec.method != "components":
        return max(8, math.ceil(2 * spec.min_dist / scale.zoom[0]))
    return options.halo


def _as_czyx(volume: np.ndarray, channels: int) -> np.ndarray:
    if volume.ndim == 3 and channels == 1:
        volume = volume[np.newaxis]
    if volume.ndim != 4 or volume.shape[0] != channels:
        raise InputError(f"expected a (Z, Y, X) or ({channels}, Z, Y, X) volume, got shape {volume.shape}")
    if volume.size == 0:
        raise InputError(f"empty volume (shape {volume.shape})")
    return volume


def _run(
    source: Source,
    /,
    *,
    bundle: Bundle,
    options: SegmentOptions,
    voxel_size_um: tuple[float, float, float] | None,
    progress: Progress | None,
    backend: Backend | None,
    outputs: RunOutputs,
) -> SegmentResult:
    """Normalize, infer, label and write ``source`` slab by slab (one slab when it fits)."""
    started = time.perf_counter()
    _check_options(options)
    spec = _postprocess_spec(bundle, options)
    c, z, y, x = source.shape
    report = RunReport(shape=tuple(source.shape))
    with report.timed("normalize"):
        try:
            if isinstance(source, ArraySource):
                stats = normalization_stats(source.data, bundle.normalization)
            else:
                stats = volume_stats(source, bundle.normalization, dtype=getattr(source, "dtype", np.dtype(np.float32)))
        except InputError as exc:  # NaN or constant content: name the file when there is one
            if getattr(source, "path", None) is None:
                raise
            raise InputError(f"{source.path}: {exc}") from exc  # type: ignore[attr-defined]
    owned = backend is None
    with report.timed("load"):
        if backend is None:
            backend_options = BackendOptions(precision=options.precision, threads=options.threads)
            backend = select_backend(options.backend, bundle, options=backend_options)
    try:
        with report.timed("scale"):
            scale = _scale(source, stats, bundle, options, voxel_size_um, backend)
        spec = scale.postprocess(spec)
        with report.timed("load"):
            tiling, report.fit, model_patch = _tiling(bundle, options, (z, y, x), backend, scale)
            backend.prepare(model_patch, tiling.batch_size)  # TensorRT loads or builds its plan now, not mid-run
        k = len(bundle.output.names)
        memory = int(options.memory_limit_gib * 2**30) if options.memory_limit_gib else None
        plan = plan_slabs(
            (c, z, y, x), grid_config=tiling, out_channels=k, spec=spec, depth=options.slab_depth, halo=_halo(options, spec, scale),
            memory_bytes=memory, keep_outputs=outputs.output_path is None, device_type=backend.device.type,
        )
        grid = SlabGrid((z, y, x), tiling, plan.rows_per_group)
        report.backend, report.precision, report.device = backend.name, backend.precision, backend.device_name
        report.patch_shape, report.n_patches, report.scale = tiling.patch_shape, grid.n_patches, scale
        report.slab_depth, report.halo, report.n_slabs = plan.depth, plan.halo, plan.n_slabs(z)
        store, write_probs = outputs.open((k, z, y, x), streamed=report.n_slabs > 1)
        labeler = SlabLabeler(
            (z, y, x), output=bundle.output, spec=spec, sampling=scale.sampling, depth=plan.depth, halo=plan.halo,
            store=store,
        )
        run = backend.run if scale.identity else ScaledRun(backend.run, model_patch)
        runner = BackoffRunner(run, batch_size=tiling.batch_size, oom_errors=backend.oom_errors)
        tracker = ProgressTracker(progress, unit=options.progress_unit, total_voxels=z * y * x)
        timings = StreamTimings()
        stream(
            source, stats=stats, run=runner, grid=grid, out_channels=k, device=backend.device, labeler=labeler,
            write_probs=write_probs, tracker=tracker, timings=timings,
        )
        report.batch_size, report.oom_retries = runner.batch_size, runner.oom_retries
    except BaseException:
        outputs.abort()
        raise
    finally:
        if owned:
            backend.close()
    for stage in ("read", "normalize", "infer", "postprocess"):
        report.timings[stage] = report.timings.get(stage, 0.0) + timings.seconds.get(stage, 0.0)
    return _finish(report, labeler, store, outputs, tracker, started)


def _finish(
    report: RunReport,
    labeler: SlabLabeler,
    store: MemoryLabelStore | FileLabelStore,
    outputs: RunOutputs,
    tracker: ProgressTracker,
    started: float,
) -> SegmentResult:
    """Final ids for every cell, then the label file (and the probability file renamed into place)."""
    try:
        with report.timed("postprocess"):
            final = labeler.finish()
        report.n_cells, report.orphan_seeds = final.n_cells, labeler.orphan_seeds
        chunks = prefetched(store.relabel(final.lut, chunk=max(1, labeler.depth)))
        with report.timed("write"):
            if outputs.output_path is None:
                for _ in chunks:
                    pass
            else:
                write_labels_stream(
                    outputs.output_path, chunks, shape=labeler.shape, max_label=final.n_cells, voxel_size_um=outputs.voxel
                )
            if outputs.prob_writer is not None:
                outputs.prob_writer.commit()
    except BaseException:
        outputs.abort()
        raise
    if report.orphan_seeds:
        logger.warning(
            "%d seed(s) beyond a slab flooded into it but were not confirmed by the next slab; the labels may "
            "differ from a whole-volume run near slab borders: raise --halo (now %d planes)",
            report.orphan_seeds, report.halo,
        )
    report.wall_s = time.perf_counter() - started
    report.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    tracker.voxels(0)
    tracker.report(final=True)
    return SegmentResult(labels=store.result(), probabilities=outputs.probs, report=report)


def segment(
    volume: np.ndarray,
    /,
    *,
    bundle: Bundle,
    options: SegmentOptions = SegmentOptions(),
    voxel_size_um: tuple[float, float, float] | None = None,
    progress: Progress | None = None,
    backend: Backend | None = None,
) -> SegmentResult:
    """Segment cells in a 3D volume.

    Args:
        volume: ``(Z, Y, X)`` or ``(C, Z, Y, X)`` raw intensities, any real dtype, on the host (a
            ``numpy.memmap`` works and is read slab by slab).
        bundle: the model bundle.
        options: run settings.
        voxel_size_um: ``(z, y, x)`` in µm, when known (``options.voxel_size_um`` wins): fixes the z/xy zoom to the
            model's grid (:mod:`engine.scale`).
        progress: called with ``(done, total)`` in ``options.progress_unit`` (patches by default).
        backend: an already loaded backend to reuse (``options.backend`` is then ignored).

    Raises:
        InputError: bad volume or options. BackendUnavailableError: the backend cannot run here.
    """
    data = _as_czyx(volume, bundle.in_channels)
    return _run(
        ArraySource(data), bundle=bundle, options=options, voxel_size_um=voxel_size_um, progress=progress,
        backend=backend, outputs=RunOutputs(),
    )


def segment_file(
    input_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    /,
    *,
    bundle: Bundle | str | os.PathLike[str] | None = None,
    options: SegmentOptions = SegmentOptions(),
    channel: int | None = None,
    prob_path: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
    backend: Backend | None = None,
) -> SegmentResult:
    """Segment a TIFF stack and write the label TIFF (and optionally the probabilities).

    The stack is read by z-slabs (memory-mapped when its data are contiguous and uncompressed), and a
    stack larger than the memory budget is streamed: peak memory is bounded by the slab, the outputs are
    written slab by slab (BigTIFF when needed) and the result holds no volume-sized array in memory
    (see :class:`SegmentResult`).

    Args:
        input_path: 3D TIFF (ZYX, CZYX, ImageJ or OME).
        output_path: label TIFF to write; written only when everything before it succeeded.
        bundle: a Bundle, a bundle directory, or None for the shipped default.
        options: run settings.
        channel: which channel of a multi-channel image to segment.
        prob_path: where to write the probability map, if wanted.
        progress: called with ``(done, total)`` in ``options.progress_unit`` (patches by default).
        backend: an already loaded backend to reuse (``options.backend`` is then ignored).

    Raises:
        InputError, BundleError, BackendUnavailableError: one line each, nothing written.
    """
    io.refuse_overwrites(input_path, output_path, prob_path)
    if not isinstance(bundle, Bundle):
        bundle = load_bundle(bundle)
    started = time.perf_counter()
    with io.open_volume(input_path, channel=channel, channels=bundle.in_channels) as reader:
        opened = time.perf_counter() - started
        outputs = RunOutputs(output_path=output_path, prob_path=prob_path, voxel_size_um=options.voxel_size_um or reader.voxel_size_um)
        result = _run(
            reader, bundle=bundle, options=options, voxel_size_um=reader.voxel_size_um, progress=progress,
            backend=backend, outputs=outputs,
        )
    timings = result.report.timings
    result.report.timings = {"read": timings.pop("read", 0.0) + opened, **timings}
    result.report.wall_s += opened
    return result
