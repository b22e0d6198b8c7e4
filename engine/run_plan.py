"""The run plan: every decision a run makes before it streams, made once at the door.

:class:`SegmentOptions` is what the caller asks for; :func:`plan_run` checks all of it
(:func:`check_options`), settles the scale (:mod:`engine.scale`), fits the patch and batch to the device
(:mod:`engine.fitting`), and cuts the volume into slabs for the memory budget (:func:`plan_slabs`), and
returns a frozen :class:`RunPlan`; :mod:`engine.pipeline` only wires it to the stages and
:mod:`engine.streaming` only runs them.

Slab sizes: with a memory budget (default :data:`DEFAULT_MEMORY_BYTES` less :data:`RUNTIME_BYTES`, at most
half of the available memory), a volume whose whole-volume working set fits is done in one slab. Otherwise
the post-processing core depth and the number of patch rows per inference group are the largest the budget
allows, with ``halo`` planes on each side of a core for the watershed (default ``max(8, 2 * min_dist)``).
"""

from __future__ import annotations

import ctypes
import logging
import math
from dataclasses import dataclass, replace

import numpy as np

from .backends import Backend
from .bundle import Bundle, PostprocessSpec
from .errors import InputError
from .fitting import fit_tiling
from .model_grid import ModelGrid, labels_on_model_grid
from .progress import PROGRESS_UNITS
from .scale import ScalePlan, plan_for_source
from .streaming import Source
from .tiling import SlabGrid, TilingConfig

__all__ = ["DEFAULT_MEMORY_BYTES", "RUNTIME_BYTES", "RunPlan", "SegmentOptions", "SlabPlan", "available_memory", "check_options",
           "memory_budget", "plan_run", "plan_slabs", "release_freed_memory"]

logger = logging.getLogger(__name__)

DEFAULT_MEMORY_BYTES = 2 * 2**30
# What the process holds besides the run's buffers (python, torch, the model): 337-341 MiB resident after the
# scale estimate and release_freed_memory() on 128x1024x1024 stacks (2-core CPU host, torch 2.13 CPU).
RUNTIME_BYTES = 384 * 2**20
NETWORK_SHARE = 0.5  # of the budget, for the CPU network's activations and one patch row's accumulators
LABEL_SHARE = 0.2  # for a labelling window; the full planes it is cut from take at most PLANES_SHARE
PLANES_SHARE = 0.3
# Host bytes per voxel of each working buffer, measured on 64x256x256 stacks (see tests/engine/test_streaming.py).
POSTPROCESS_BYTES = {"watershed": 72, "components": 24}
_MIN_DEPTH = 8


@dataclass(frozen=True)
class SegmentOptions:
    """Run settings; None means "as the bundle says" (or, for the batch: on CPU 1, or 2 when the host budget
    sizes the patch, see :func:`engine.fitting.fit_tiling`; on GPU fitted to the device).

    Args:
        backend: ``auto`` or a name from ``engine.backends.BACKEND_CHOICES``.
        precision: ``auto``, ``fp32``, ``bf16`` or ``fp16`` (what the backend supports).
        patch_shape: ``(z, y, x)``, multiples of the network's divisor.
        overlap: fraction of a patch shared with each neighbour, ``0 <= overlap < 1``.
        batch_size: patches per network call.
        threads: CPU threads (None: all cores available).
        threshold, min_dist, label_threshd: post-processing overrides (see ``PostprocessSpec``).
        slab_depth: input planes per z-slab; None: one slab when the volume's working set fits
            ``memory_limit_gib``, else the deepest slab that does (:func:`engine.streaming.plan_slabs`).
        halo: input planes added on each side of a slab for the watershed (None: ``max(8, 2 * min_dist)``); the
            slabbed watershed equals the whole-volume one when the halo exceeds the cells' extent in z.
        memory_limit_gib: host working-memory budget that sizes the slabs (None: 2 GiB, at most half of
            the available memory).
        progress_unit: ``patch`` or ``voxel``, what ``progress(done, total)`` counts (see
            :mod:`engine.progress`).
        voxel_size_um: ``(z, y, x)`` of the input in µm, overriding the file's (None: the file's, if any).
        cell_diameter: typical cell diameter, µm when the voxel size is known, else xy voxels (None:
            estimated from the data, see :mod:`engine.scale`).
        rescale: ``auto`` (run the network at the model's cell size and voxel grid) or ``off`` (as is).
        tta: average the network over the eight flips of each patch (:mod:`engine.flips`; eight times the
            network's time; on a GPU an output-sized sum and a flipped batch beside the fitted batch, which
            the batch fit does not count: an out-of-memory halves the batch as usual); the scale estimate
            runs without them.
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
    tta: bool = False


@dataclass(frozen=True)
class SlabPlan:
    """How a volume is cut: ``depth`` planes per post-processing core, ``halo`` planes each side of it,
    ``rows_per_group`` patch rows per inference group (None: all in one), ``tile`` the side of the xy tiles
    a core is labelled in (None: whole planes)."""

    depth: int
    halo: int
    rows_per_group: int | None
    tile: int | None = None
    ends: tuple[int, ...] | None = None  # where each core ends (SlabGrid.core_ends); None: every ``depth`` planes

    def n_slabs(self, z: int, /) -> int:
        return len(self.ends) if self.ends else -(-z // self.depth)


def available_memory() -> int:
    """``MemAvailable`` from /proc/meminfo (bytes), or 8 GiB where it cannot be read."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


def plan_slabs(
    shape: tuple[int, int, int, int],
    /,
    *,
    grid_config: TilingConfig,
    out_channels: int,
    spec: PostprocessSpec,
    depth: int | None = None,
    halo: int | None = None,
    memory_bytes: int | None = None,
    keep_outputs: bool = False,
    device_type: str = "cpu",
) -> SlabPlan:
    """Choose the slab depth, halo and inference grouping for a ``(C, Z, Y, X)`` volume.

    Args:
        shape: ``(C, Z, Y, X)``.
        grid_config: the :class:`engine.tiling.TilingConfig`.
        out_channels: channels the network returns.
        spec: post-processing (its method sets the per-voxel cost, ``min_dist`` the default halo).
        depth, halo: fixed by the caller (None: chosen here).
        memory_bytes: host working-memory budget (None: :data:`DEFAULT_MEMORY_BYTES`, at most half of the
            available memory).
        keep_outputs: whole-volume labels and probabilities are returned in memory even when streamed
            (``segment``); they always count for a one-slab run.
        device_type: where the blend accumulates (CUDA keeps it off the host).

    Raises:
        InputError: ``depth`` < 1 or ``halo`` < 0.
    """
    c, z, y, x = shape
    if depth is not None and depth < 1:
        raise InputError(f"slab depth must be >= 1 plane, got {depth}")
    if halo is not None and halo < 0:
        raise InputError(f"halo must be >= 0 planes, got {halo}")
    budget = memory_bytes if memory_bytes is not None else min(DEFAULT_MEMORY_BYTES, available_memory() // 2)
    halo = (0 if spec.method == "components" else max(_MIN_DEPTH, 2 * int(spec.min_dist))) if halo is None else halo
    plane = y * x
    infer_bytes = _blend_bytes(c, out_channels, device_type)
    post_bytes = POSTPROCESS_BYTES.get(spec.method, 72) + 4 * out_channels  # + planes queued for it
    outputs = (4 + 4 * out_channels) * z * plane  # labels and probabilities, held in memory by a one-slab run
    pz, step = grid_config.patch_shape[0], max(1, round(grid_config.patch_shape[0] * (1 - grid_config.overlap)))
    if depth is None and outputs + (infer_bytes + post_bytes) * max(z, pz) * plane <= budget:
        return SlabPlan(depth=z, halo=0, rows_per_group=None)  # the whole volume fits: one slab, exact
    room = max(0, budget - outputs) if keep_outputs else budget
    tile = None
    if depth is None:
        depth = int(LABEL_SHARE * room / (post_bytes * plane)) - 2 * halo
        if depth < max(_MIN_DEPTH, halo):
            depth, tile = _tiled_cores(int(LABEL_SHARE * room / post_bytes), (y, x), halo, max(_MIN_DEPTH, halo), budget)
    infer_planes = int(0.4 * room / (infer_bytes * plane))
    # Groups emit about a slab's planes each (more would only delay the labelling), within the budget.
    rows = max(1, min((infer_planes - pz) // step + 1, round(depth / step)))
    return SlabPlan(depth=min(depth, z), halo=halo if depth < z else 0, rows_per_group=rows, tile=tile)


def _blend_bytes(in_channels: int, out_channels: int, device_type: str) -> int:
    """Host bytes a voxel for the network's input and, off CUDA, the blend's sums (probabilities, weights)."""
    return 8 * in_channels + (0 if device_type == "cuda" else 4 * out_channels + 4)


def _tiled_cores(window_voxels: int, plane: tuple[int, int], halo: int, base: int, budget: int) -> tuple[int, int]:
    """Core depth and xy tile side for planes too wide for a whole-plane window of ``window_voxels``.

    Of cores 1, 2 or 4 times ``base`` deep, the one that labels each voxel the fewest times (windows
    overlap by the halo in z, y and x) while its full planes (4 bytes of probability a voxel over the
    window's planes, 4 of labels over the core's) stay within :data:`PLANES_SHARE` of the budget.
    """
    side, best = max(plane), None
    for depth in (base, 2 * base, 4 * base):
        widest = math.isqrt(max(0, window_voxels // (depth + 2 * halo))) - 2 * halo
        if widest < max(2 * halo, 16) or 4 * (2 * depth + 2 * halo) * plane[0] * plane[1] > PLANES_SHARE * budget:
            continue
        tile = -(-side // -(-side // widest))  # equal tiles, each at most ``widest``
        repeats = (depth + 2 * halo) / depth * ((tile + 2 * halo) / tile) ** 2
        if best is None or repeats < best[0]:
            best = (repeats, depth, tile)
    if best is None:
        tile = max(2 * halo, 16)
        logger.warning(
            "memory budget %.2f GiB is small for %dx%d planes: labelling %d-plane cores in %dx%d tiles with a %d-voxel halo anyway",
            budget / 2**30, plane[0], plane[1], base, tile, tile, halo,
        )
        return base, tile
    return best[1], best[2]


def _postprocess_spec(bundle: Bundle, options: SegmentOptions) -> PostprocessSpec:
    overrides = {k: getattr(options, k) for k in ("threshold", "min_dist", "label_threshd") if getattr(options, k) is not None}
    if "threshold" in overrides and not 0 <= overrides["threshold"] <= 1:
        raise InputError(f"threshold must be between 0 and 1, got {overrides['threshold']}")
    for key in ("min_dist", "label_threshd"):
        if key in overrides and overrides[key] < 0:
            raise InputError(f"{key} must be >= 0, got {overrides[key]}")
    return replace(bundle.postprocess, **overrides)


def check_options(options: SegmentOptions, /) -> None:
    """Every option value checked at once, before anything is read or loaded.

    Raises:
        InputError: the first bad value, named.
    """
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


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's ``malloc_trim``; elsewhere nothing): the scale
    estimate's freed activations otherwise stay resident, 80-160 MiB after it on 128x1024x1024 stacks here."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def memory_budget(options: SegmentOptions, /) -> int:
    """The host working-memory budget: the caller's, else :data:`DEFAULT_MEMORY_BYTES` less
    :data:`RUNTIME_BYTES` (the promise is input + output + 2 GiB for the whole process), at most half the
    available memory. A constant, not the resident set at planning: that varied by 70 MiB between runs of one
    stack here (400-670 MiB between stacks), and with it the patch the plan fitted, so the probabilities and
    the cells."""
    if options.memory_limit_gib:
        return int(options.memory_limit_gib * 2**30)
    return min(DEFAULT_MEMORY_BYTES - RUNTIME_BYTES, available_memory() // 2)


def _network_bytes(budget: int, bundle: Bundle, options: SegmentOptions, model_shape: tuple[int, int, int]) -> float:
    """Host bytes for the CPU network's activations: :data:`NETWORK_SHARE` of the budget, or, when one bundle
    patch covers the volume and its labelling fits the budget (one slab: the network has finished before the
    labels are made), all of the budget but the run's own buffers, so the fitter keeps one patch where its
    activations fit and cuts it into as few as fit where not (:func:`engine.fitting.fit_tiling`). Measured
    (benchmarks/PERFORMANCE.md, one-slab stacks): 64x512x512 in bundle patches took 3515 MiB against 1691 in
    budgeted ones; 64x256x256 in its one patch 3163-3176 MiB against the 2064 promised, in four 1312-1359."""
    k = len(bundle.output.names)
    spec = _postprocess_spec(bundle, options)
    whole = (POSTPROCESS_BYTES.get(spec.method, 72) + 8 * k + 4 + 8 * bundle.in_channels) * math.prod(model_shape)
    if all(s <= p for s, p in zip(model_shape, bundle.patch_shape)) and whole <= budget:
        return budget - _blend_bytes(bundle.in_channels, k, "cpu") * math.prod(model_shape)
    return NETWORK_SHARE * budget


def _tiling(
    bundle: Bundle, options: SegmentOptions, shape: tuple[int, int, int], backend: Backend, scale: ScalePlan, budget: int
) -> tuple[TilingConfig, str, tuple[int, int, int]]:
    """Patch and batch: the caller's, else fitted to the device (:func:`engine.fitting.fit_tiling`), on the
    model's grid; returns the tiling on the input grid, where it came from, and the model patch."""
    k = len(bundle.output.names)
    model_shape = scale.model_shape(shape)
    padded_plane = lambda patch: max(model_shape[1], patch[1]) * max(model_shape[2], patch[2])  # noqa: E731
    fit = fit_tiling(
        bundle, backend, model_shape, patch_shape=options.patch_shape, batch_size=options.batch_size,
        reserve_bytes=lambda patch: 4.0 * (k + 1 + 2 * bundle.in_channels) * patch[0] * padded_plane(patch),
        host_bytes=_network_bytes(budget, bundle, options, model_shape),
        overlap=bundle.overlap if options.overlap is None else options.overlap,
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


def _model_grid_budget(budget: int, grid: ModelGrid, source: Source, options: SegmentOptions) -> int:
    """The working budget of a run on the model grid: the default one less the input and output a stack of the
    model grid's size would have been allowed (the promise is input + output + 2 GiB of the input's). Measured
    on 43x1024x1024 at a 3x z step (129 model planes): with the whole budget, peak RSS 2639 MiB against the
    2306 MiB promised; the same labelling of the 129-plane stack run as it is peaked 2796 MiB, within its own
    2820. A caller's memory limit stands as it is; never below half the default budget."""
    if options.memory_limit_gib:
        return budget
    per_voxel = np.dtype(getattr(source, "dtype", np.float32)).itemsize + 4  # input, uint32 labels
    extra = (math.prod(grid.model_shape) - math.prod(grid.input_shape)) * source.shape[0] * per_voxel
    return max(budget - extra, DEFAULT_MEMORY_BYTES // 2)


def _halo(options: SegmentOptions, spec: PostprocessSpec, scale: ScalePlan) -> int | None:
    """The caller's halo; on a resampled grid, ``2 * min_dist`` model voxels in input planes (at least 8)."""
    if options.halo is None and not scale.identity and spec.method != "components":
        return max(8, math.ceil(2 * spec.min_dist / scale.zoom[0]))
    return options.halo


@dataclass(frozen=True)
class RunPlan:
    """Everything a run needs decided, decided once: post-processing (in the voxels it labels), scale, tiling
    and the patch the network sees, where the patch and batch came from, slabs and the patch grid.

    ``model_grid`` is set when the run blends and labels on the model's grid (:mod:`engine.model_grid`);
    tiling, slabs and grid are then on that grid, and the outputs are sampled back to the input's.
    """

    spec: PostprocessSpec
    scale: ScalePlan
    tiling: TilingConfig
    model_patch: tuple[int, int, int]
    fit: str
    slabs: SlabPlan
    grid: SlabGrid
    model_grid: ModelGrid | None = None

    @property
    def resamples_patches(self) -> bool:
        """Each patch is resampled to the model's grid and back (:class:`engine.scale.ScaledRun`)."""
        return self.model_grid is None and not self.scale.identity

    @property
    def sampling(self) -> tuple[float, float, float] | None:
        """A labelled voxel's extent in model voxels, for the distance transform (None: isotropic, 1)."""
        return None if self.model_grid is not None else self.scale.sampling


def plan_run(
    source: Source,
    stats: list[tuple[float, float]],
    /,
    *,
    bundle: Bundle,
    options: SegmentOptions,
    voxel_size_um: tuple[float, float, float] | None,
    backend: Backend,
    keep_outputs: bool,
) -> RunPlan:
    """The :class:`RunPlan` for ``source`` (normalized by ``stats``) on ``backend``; the scale estimate runs the
    network on central crops when neither voxel size nor cell diameter settle it (:mod:`engine.scale`).

    Args:
        keep_outputs: the labels and probabilities are returned in memory (``segment``), so they count
            against the memory budget.
    """
    check_options(options)
    c, z, y, x = source.shape
    scale = _scale(source, stats, bundle, options, voxel_size_um, backend)
    release_freed_memory()
    model_grid = ModelGrid.for_scale((z, y, x), scale) if labels_on_model_grid(scale) else None
    # on the model grid the run itself is unscaled: spec, patch and halo in model voxels
    work, shape = (scale, (z, y, x)) if model_grid is None else (ScalePlan.unscaled("model grid"), model_grid.model_shape)
    spec = scale.postprocess(_postprocess_spec(bundle, options), on_model_grid=model_grid is not None)
    budget = memory_budget(options)
    if model_grid is not None:
        budget = _model_grid_budget(budget, model_grid, source, options)
    tiling, fit, model_patch = _tiling(bundle, options, shape, backend, work, budget)
    depth, halo = options.slab_depth, _halo(options, spec, work)
    if model_grid is not None:  # the options count input planes
        depth, halo = (None if n is None else model_grid.planes(n) for n in (depth, halo))
    slabs = plan_slabs(
        (c, *shape), grid_config=tiling, out_channels=len(bundle.output.names), spec=spec, depth=depth,
        halo=halo, memory_bytes=budget, keep_outputs=keep_outputs, device_type=backend.device.type,
    )
    grid = SlabGrid(shape, tiling, slabs.rows_per_group)
    if depth is None and slabs.depth < shape[0]:  # cores end where the network's groups finish planes
        slabs = replace(slabs, ends=grid.core_ends(slabs.depth, slabs.halo))
    return RunPlan(spec, scale, tiling, model_patch, fit, slabs, grid, model_grid)
