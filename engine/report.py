"""What a run did: backend, precision, patch, scale, cell count and the time of each stage.

The CLI prints :meth:`RunReport.summary` and writes :meth:`RunReport.write_json` for ``--report``; the
Python API returns the same object in ``SegmentResult.report``.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_write_bytes
from .scale import ScalePlan

__all__ = ["ORPHAN_SEEDS_PER_CELL", "RunReport", "versions"]

_PACKAGES = ("cellseg3d", "torch", "numpy", "scipy", "scikit-image", "tifffile", "onnxruntime", "onnxruntime-gpu", "tensorrt")


def versions() -> dict[str, str]:
    """Python and the installed versions of the packages a run depends on (absent ones left out)."""
    found = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


ORPHAN_SEEDS_PER_CELL = 0.01  # above this, the watershed halo is reported as too small


@dataclass
class RunReport:
    """What ran and how long each stage took (seconds).

    The stages overlap when a volume is streamed, so their sum can exceed ``wall_s``. ``n_slabs`` > 1
    means the volume was streamed in slabs of at most ``slab_depth`` planes (cut where the network's groups
    finish planes, :meth:`engine.tiling.SlabGrid.core_ends`) with ``halo`` planes of watershed halo,
    labelled in ``label_tile`` x ``label_tile`` xy tiles when that is set (0: whole planes);
    ``label_grid``: ``model`` when the run blended and labelled on the model's finer grid and sampled the
    results back (:mod:`engine.model_grid`; slab depth and halo then count model planes), else ``input``;
    ``threshold``: the interior threshold the labelling used (lowered on a zoomed-up model grid, see
    :meth:`engine.scale.ScalePlan.postprocess`).
    ``orphan_seeds`` counts seeds beyond a slab that flooded into it but that the next slab did not find
    (a sign the halo is too small, see :mod:`engine.labels.slabs`). ``oom_retries``: times the batch was halved
    after the device ran out of memory; ``batch_size`` is the batch in use at the end. ``fit``: where the
    patch and batch came from (:class:`engine.fitting.Fit`). ``peak_rss_mb``: the process's peak resident
    memory at the end of the run.
    """

    backend: str = ""
    precision: str = ""
    device: str = ""
    patch_shape: tuple[int, int, int] = (0, 0, 0)
    batch_size: int = 0
    n_patches: int = 0
    shape: tuple[int, ...] = ()
    n_cells: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    slab_depth: int = 0
    halo: int = 0
    label_tile: int = 0
    label_grid: str = "input"
    threshold: float = 0.0
    n_slabs: int = 0
    orphan_seeds: int = 0
    oom_retries: int = 0
    fit: str = ""
    scale: ScalePlan | None = None
    tta: bool = False
    wall_s: float = 0.0
    peak_rss_mb: float = 0.0

    @property
    def halo_too_small(self) -> bool:
        """More orphan seeds than :data:`ORPHAN_SEEDS_PER_CELL` of the cells: the halo is short of the cells'
        extent. A few are normal: on 128x1024x1024 membranes with the default halo (12 planes), 600 orphans for
        155,890 cells left 0.01% of the voxels labelled differently from the whole-volume run (cells matched
        at F1 0.9999); halos of 1-2 planes on 12-voxel cells gave 20-33% orphans and 9-14% of voxels."""
        return self.orphan_seeds > ORPHAN_SEEDS_PER_CELL * max(1, self.n_cells)

    @property
    def voxels_per_second(self) -> float:
        """End-to-end throughput: over the wall time when known, else over every timed stage."""
        total = self.wall_s if self.wall_s > 0 else sum(self.timings.values())
        return float(np.prod(self.shape[-3:])) / total if total > 0 else 0.0

    def summary(self) -> str:
        """One line for the CLI and logs."""
        stages = " ".join(f"{k}={v:.2f}s" for k, v in self.timings.items())
        patch = "x".join(map(str, self.patch_shape))
        slabs = f" slabs={self.n_slabs}x{self.slab_depth}+halo{self.halo}" if self.n_slabs > 1 else ""
        slabs += f" tiles={self.label_tile}" if self.label_tile else ""
        slabs += f" labels=model-grid threshold={self.threshold:g}" if self.label_grid == "model" else ""
        slabs += " tta=flips8" if self.tta else ""
        scale = self.scale.describe() if self.scale else "scale=?"
        return (
            f"{self.n_cells} cells | backend={self.backend} precision={self.precision} device={self.device} "
            f"patch={patch} batch={self.batch_size} patches={self.n_patches}{slabs} | {scale} | {stages} wall={self.wall_s:.2f}s | "
            f"{self.voxels_per_second / 1e6:.2f} Mvoxel/s peak RSS {self.peak_rss_mb:.0f} MB"
        )

    @property
    def voxel_size_um(self) -> tuple[float, float, float] | None:
        """The input's voxel size the run used (file or option), or None."""
        return self.scale.voxel_size_um if self.scale else None

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        """Add the time spent inside the block to ``timings[stage]``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - start

    def to_dict(self) -> dict[str, Any]:
        """Everything above as JSON types, plus the voxel size used, throughput and the software versions."""
        doc = asdict(self)
        doc["scale"] = None if self.scale is None else {**asdict(self.scale), "summary": self.scale.describe()}
        return {**doc, "voxel_size_um": self.voxel_size_um, "voxels_per_second": self.voxels_per_second, "versions": versions()}

    def write_json(self, path: str | os.PathLike[str], /, **extra: Any) -> Path:
        """Write :meth:`to_dict` (plus ``extra`` keys, e.g. the input and output paths) atomically."""
        text = json.dumps({**extra, **self.to_dict()}, indent=2, default=str) + "\n"
        return atomic_write_bytes(path, text.encode())
