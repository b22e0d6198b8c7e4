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
import os
import resource
import time
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from . import io
from .backends import Backend, BackendOptions, select_backend
from .bundle import Bundle, load_bundle
from .errors import InputError
from .fitting import BackoffRunner
from .flips import FlipAveraged
from .labels import SlabLabeler
from .normalize import normalization_stats
from .outputs import RunOutputs
from .progress import Progress, ProgressTracker
from .report import RunReport
from .run_plan import RunPlan, SegmentOptions, check_options, plan_run
from .scale import ScaledRun
from .streaming import ArraySource, Source, StreamTimings, prefetched, stream, volume_stats
from .tiff_stream import write_labels_stream

__all__ = ["SegmentOptions", "RunReport", "SegmentResult", "segment", "segment_file"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SegmentResult:
    """``labels``: ``(Z, Y, X)`` uint32, 0 = background; ``probabilities``: ``(K, Z, Y, X)`` float32.

    When ``segment_file`` streamed the volume (``report.n_slabs > 1``) nothing volume-sized is held in
    memory: ``labels`` is a read-only ``numpy.memmap`` over a temporary file (deleted when the array is
    garbage collected) and ``probabilities`` is None (ask for ``prob_path`` to get them on disk).
    ``segment_file`` returns the probabilities only when it wrote them (``prob_path``) in one slab: a file
    run keeps no float copy of the volume it was not asked for (on a GPU they never leave the device).
    ``segment`` always returns both in memory.
    """

    labels: NDArray[np.uint32]
    probabilities: NDArray[np.float32] | None
    report: RunReport

    @property
    def n_cells(self) -> int:
        return self.report.n_cells


def _as_czyx(volume: np.ndarray, channels: int) -> np.ndarray:
    if volume.ndim == 3 and channels == 1:
        volume = volume[np.newaxis]
    if volume.ndim != 4 or volume.shape[0] != channels:
        raise InputError(f"expected a (Z, Y, X) or ({channels}, Z, Y, X) volume, got shape {volume.shape}")
    if volume.size == 0:
        raise InputError(f"empty volume (shape {volume.shape})")
    return volume


def _stats(source: Source, bundle: Bundle) -> list[tuple[float, float]]:
    """Normalization statistics of the whole volume; NaN or constant content names the file when there is one."""
    try:
        if isinstance(source, ArraySource):
            return normalization_stats(source.data, bundle.normalization)
        return volume_stats(source, bundle.normalization, dtype=getattr(source, "dtype", np.dtype(np.float32)))
    except InputError as exc:
        if getattr(source, "path", None) is None:
            raise
        raise InputError(f"{source.path}: {exc}") from exc  # type: ignore[attr-defined]


def _network_run(backend: Backend, plan: RunPlan, options: SegmentOptions) -> BackoffRunner:
    """What the tiler calls per batch: the backend, averaged over flips (``tta``), on patches resampled to the
    model's grid when the plan zooms patches, halving the batch on out-of-memory."""
    run = FlipAveraged(backend.run) if options.tta else backend.run
    run = ScaledRun(run, plan.model_patch) if plan.resamples_patches else run
    return BackoffRunner(run, batch_size=plan.tiling.batch_size, oom_errors=backend.oom_errors)


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
    """Plan the run (:func:`engine.run_plan.plan_run`), then normalize, infer, label and write ``source``
    slab by slab (one slab when it fits)."""
    started = time.perf_counter()
    check_options(options)
    c, z, y, x = source.shape
    report = RunReport(shape=tuple(source.shape))
    with report.timed("normalize"):
        stats = _stats(source, bundle)
    owned = backend is None
    with report.timed("load"):
        if backend is None:
            backend = select_backend(options.backend, bundle, options=BackendOptions(precision=options.precision, threads=options.threads))
    try:
        with report.timed("plan"):  # the scale estimate (network passes on crops) and, on CUDA, the fit
            plan = plan_run(source, stats, bundle=bundle, options=options, voxel_size_um=voxel_size_um, backend=backend,
                            keep_outputs=outputs.output_path is None)
        with report.timed("load"):
            backend.prepare(plan.model_patch, plan.tiling.batch_size)  # TensorRT loads or builds its plan now, not mid-run
        report.backend, report.precision, report.device = backend.name, backend.precision, backend.device_name
        report.tta = options.tta
        report.patch_shape, report.n_patches, report.scale, report.fit = plan.tiling.patch_shape, plan.grid.n_patches, plan.scale, plan.fit
        wz, wy, wx = plan.grid.shape  # the grid the run blends and labels on: the input's, or the model's
        report.slab_depth, report.halo, report.n_slabs = plan.slabs.depth, plan.slabs.halo, plan.slabs.n_slabs(wz)
        report.label_grid = "input" if plan.model_grid is None else "model"
        report.threshold = plan.spec.threshold
        k = len(bundle.output.names)
        store, write_probs = outputs.open((k, z, y, x), streamed=report.n_slabs > 1, grid=plan.model_grid)
        labeler = SlabLabeler(
            (wz, wy, wx), output=bundle.output, spec=plan.spec, sampling=plan.sampling, depth=plan.slabs.depth,
            halo=plan.slabs.halo, ends=plan.slabs.ends, tile=plan.slabs.tile, store=store, device=backend.device,
        )
        report.label_tile = labeler.tile or 0
        runner = _network_run(backend, plan, options)
        tracker = ProgressTracker(progress, unit=options.progress_unit, total_voxels=wz * wy * wx)
        timings = StreamTimings()
        stream(
            source if plan.model_grid is None else plan.model_grid.source(source), stats=stats, run=runner, grid=plan.grid,
            out_channels=k, device=backend.device, labeler=labeler, write_probs=write_probs, tracker=tracker, timings=timings,
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
    return _finish(report, labeler, outputs, tracker, started)


def _finish(
    report: RunReport,
    labeler: SlabLabeler,
    outputs: RunOutputs,
    tracker: ProgressTracker,
    started: float,
) -> SegmentResult:
    """Final ids for every cell, then the label file (and the probability file renamed into place)."""
    try:
        with report.timed("postprocess"):
            final = labeler.finish()
            n_cells, chunks = outputs.labels(final, chunk=max(1, labeler.depth))
        report.n_cells, report.orphan_seeds = n_cells, labeler.orphan_seeds
        chunks = prefetched(chunks)
        with report.timed("write"):
            if outputs.output_path is None:
                for _ in chunks:
                    pass
            else:
                write_labels_stream(
                    outputs.output_path, chunks, shape=report.shape[-3:], max_label=n_cells, voxel_size_um=outputs.voxel
                )
            if outputs.prob_writer is not None:
                outputs.prob_writer.commit()
    except BaseException:
        outputs.abort()
        raise
    if report.orphan_seeds:
        grid = " of the model grid" if report.label_grid == "model" else ""
        logger.log(
            logging.WARNING if report.halo_too_small else logging.INFO,
            "%d seed(s) beyond a slab flooded into it but were not confirmed by the next slab (%d cells); the labels "
            "may differ from a whole-volume run near slab borders%s",
            report.orphan_seeds, report.n_cells, f": raise --halo (now {report.halo} planes{grid})" if report.halo_too_small else "",
        )
    report.wall_s = time.perf_counter() - started
    report.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    tracker.voxels(0)
    tracker.report(final=True)
    return SegmentResult(labels=outputs.result(), probabilities=outputs.probs, report=report)


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
