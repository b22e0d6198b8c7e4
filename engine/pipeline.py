"""Orchestration only: read -> normalize -> tiled inference -> post-process -> write, with a run report.

``segment`` works on an array, ``segment_file`` on TIFF paths; both return a :class:`SegmentResult`
whose ``report`` says what ran (backend, precision, device, patch, batch) and how long each stage took.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from . import io
from .backends import Backend, BackendOptions, select_backend
from .bundle import Bundle, PostprocessSpec, load_bundle
from .errors import InputError
from .normalize import normalize
from .postprocess import label_cells
from .tiling import TilingConfig, fit_patch_shape, sliding_window

__all__ = ["SegmentOptions", "RunReport", "SegmentResult", "segment", "segment_file"]

Progress = Callable[[int, int], None]


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


@dataclass
class RunReport:
    """What ran and how long each stage took (seconds)."""

    backend: str = ""
    precision: str = ""
    device: str = ""
    patch_shape: tuple[int, int, int] = (0, 0, 0)
    batch_size: int = 0
    n_patches: int = 0
    shape: tuple[int, ...] = ()
    n_cells: int = 0
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def voxels_per_second(self) -> float:
        """End-to-end throughput over every timed stage."""
        total = sum(self.timings.values())
        return float(np.prod(self.shape[-3:])) / total if total > 0 else 0.0

    def summary(self) -> str:
        """One line for the CLI and logs."""
        stages = " ".join(f"{k}={v:.2f}s" for k, v in self.timings.items())
        patch = "x".join(map(str, self.patch_shape))
        return (
            f"{self.n_cells} cells | backend={self.backend} precision={self.precision} device={self.device} "
            f"patch={patch} batch={self.batch_size} patches={self.n_patches} | {stages} | "
            f"{self.voxels_per_second / 1e6:.2f} Mvoxel/s"
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "voxels_per_second": self.voxels_per_second}


@dataclass(frozen=True)
class SegmentResult:
    """``labels``: ``(Z, Y, X)`` uint32, 0 = background; ``probabilities``: ``(K, Z, Y, X)`` float32."""

    labels: NDArray[np.uint32]
    probabilities: NDArray[np.float32]
    report: RunReport

    @property
    def n_cells(self) -> int:
        return self.report.n_cells


@contextmanager
def _timed(report: RunReport, stage: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    report.timings[stage] = report.timings.get(stage, 0.0) + time.perf_counter() - start


def _postprocess_spec(bundle: Bundle, options: SegmentOptions) -> PostprocessSpec:
    overrides = {k: getattr(options, k) for k in ("threshold", "min_dist", "label_threshd") if getattr(options, k) is not None}
    if "threshold" in overrides and not 0 <= overrides["threshold"] <= 1:
        raise InputError(f"threshold must be between 0 and 1, got {overrides['threshold']}")
    for key in ("min_dist", "label_threshd"):
        if key in overrides and overrides[key] < 0:
            raise InputError(f"{key} must be >= 0, got {overrides[key]}")
    return replace(bundle.postprocess, **overrides)


def _tiling(bundle: Bundle, options: SegmentOptions, shape: tuple[int, ...], backend: Backend) -> TilingConfig:
    divisor = bundle.divisor
    patch = tuple(options.patch_shape) if options.patch_shape is not None else bundle.patch_shape
    if len(patch) != 3 or any(int(p) <= 0 or int(p) % divisor for p in patch):
        raise InputError(f"patch shape must be 3 positive multiples of {divisor}, got {patch!r}")
    batch = options.batch_size or (1 if backend.device.type == "cpu" else 4)
    return TilingConfig(
        patch_shape=fit_patch_shape(shape, patch, divisor),
        overlap=bundle.overlap if options.overlap is None else options.overlap,
        batch_size=batch,
    )


def _as_czyx(volume: np.ndarray, channels: int) -> np.ndarray:
    if volume.ndim == 3 and channels == 1:
        volume = volume[np.newaxis]
    if volume.ndim != 4 or volume.shape[0] != channels:
        raise InputError(f"expected a (Z, Y, X) or ({channels}, Z, Y, X) volume, got shape {volume.shape}")
    if volume.size == 0:
        raise InputError(f"empty volume (shape {volume.shape})")
    return volume


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
        volume: ``(Z, Y, X)`` or ``(C, Z, Y, X)`` raw intensities, any real dtype, on the host.
        bundle: the model bundle.
        options: run settings.
        voxel_size_um: ``(z, y, x)``; makes the watershed distance anisotropy-aware when given.
        progress: called with ``(patches_done, patches_total)``.
        backend: an already loaded backend to reuse (``options.backend`` is then ignored).

    Raises:
        InputError: bad volume or options. BackendUnavailableError: the backend cannot run here.
    """
    data = _as_czyx(volume, bundle.in_channels)
    spec = _postprocess_spec(bundle, options)
    report = RunReport(shape=tuple(data.shape))
    with _timed(report, "normalize"):
        net_input = normalize(data, bundle.normalization)
    owned = backend is None
    with _timed(report, "load"):
        if backend is None:
            backend_options = BackendOptions(precision=options.precision, threads=options.threads)
            backend = select_backend(options.backend, bundle, options=backend_options)
    try:
        tiling = _tiling(bundle, options, data.shape[1:], backend)
        report.backend, report.precision, report.device = backend.name, backend.precision, backend.device_name
        report.patch_shape, report.batch_size = tiling.patch_shape, tiling.batch_size

        def count(done: int, total: int) -> None:
            report.n_patches = total
            if progress is not None:
                progress(done, total)

        with _timed(report, "infer"):
            out = sliding_window(
                net_input, backend.run, config=tiling, out_channels=len(bundle.output.names), device=backend.device, progress=count
            )
            probs = out.cpu().numpy()
    finally:
        if owned:
            backend.close()
    sampling = tuple(v / min(voxel_size_um) for v in voxel_size_um) if voxel_size_um else None
    with _timed(report, "postprocess"):
        labels = label_cells(probs, output=bundle.output, spec=spec, sampling=sampling)
    report.n_cells = int(labels.max())
    return SegmentResult(labels=labels, probabilities=probs, report=report)


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
) -> SegmentResult:
    """Segment a TIFF stack and write the label TIFF (and optionally the probabilities).

    Args:
        input_path: 3D TIFF (ZYX, CZYX, ImageJ or OME).
        output_path: label TIFF to write; written only when everything before it succeeded.
        bundle: a Bundle, a bundle directory, or None for the shipped default.
        options: run settings.
        channel: which channel of a multi-channel image to segment.
        prob_path: where to write the probability map, if wanted.
        progress: called with ``(patches_done, patches_total)``.

    Raises:
        InputError, BundleError, BackendUnavailableError: one line each, nothing written.
    """
    if not isinstance(bundle, Bundle):
        bundle = load_bundle(bundle)
    for target in (output_path, prob_path):
        if target is not None and not Path(target).parent.is_dir():
            raise InputError(f"{target}: folder {Path(target).parent} does not exist")
    started = time.perf_counter()
    volume = io.read_volume(input_path, channel=channel, channels=bundle.in_channels)
    read_s = time.perf_counter() - started
    result = segment(volume.data, bundle=bundle, options=options, voxel_size_um=volume.voxel_size_um, progress=progress)
    result.report.timings = {"read": read_s, **result.report.timings}
    with _timed(result.report, "write"):
        io.write_labels(output_path, result.labels, voxel_size_um=volume.voxel_size_um)
        if prob_path is not None:
            io.write_probabilities(prob_path, result.probabilities, voxel_size_um=volume.voxel_size_um)
    return result
