"""The stress matrix: held-out volumes that each push one factor to or past the edge of the training range.

Every row is a volume of the second simulator (:mod:`engine.tissue`: curved, non-convex cells of mixed
sizes) with seeds no training run draws (training uses ``engine.tissue`` with seeds from 1_000_000 up):
rows use :data:`STRESS_SEED_BASE` + row index, the baseline's validation volumes
:data:`BASELINE_SEED_BASE` + row index. Every row runs as a user without metadata runs it (a plain array,
no voxel size, no options), except the one row that gives the voxel size. Each row is scored for the
bundle under test (the engine's defaults), optionally an older bundle with rescaling off (the pipeline
before scale-aware inference), and the classical baseline (:mod:`training.baseline`) tuned once on the
validation volumes of all rows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.bundle import Bundle
from engine.metrics import match_instances
from engine.pipeline import SegmentOptions, segment
from engine.tissue import TissueSettings, make_tissue_volume

from .baseline import BaselineParams, classical_segment, tune_baseline

__all__ = [
    "STRESS_SEED_BASE", "BASELINE_SEED_BASE", "PROBE_SEED_BASE", "PROBE_BASELINE_SEED_BASE", "StressRow", "stress_rows",
    "probe_rows", "run_stress", "format_stress",
]

STRESS_SEED_BASE = 900
BASELINE_SEED_BASE = 950
PROBE_SEED_BASE = 920
PROBE_BASELINE_SEED_BASE = 930
_METRICS = ("n_gt", "n_pred", "f1", "mean_matched_iou", "adapted_rand_error")


@dataclass(frozen=True)
class StressRow:
    """One factor pushed: the simulator's settings, the stack shape (sampled grid) and what the run is told."""

    name: str
    settings: TissueSettings
    shape: tuple[int, int, int]
    voxel_size_um: tuple[float, float, float] | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def volume(self, seed: int):  # noqa: ANN201 - engine.tissue.TissueVolume
        return make_tissue_volume(self.shape, seed=seed, settings=self.settings)


def _row(name: str, z: int, xy: int, shape_z: int | None = None, side: int | None = None, **kw: Any) -> StressRow:
    settings = TissueSettings(**{k: v for k, v in kw.items() if k != "voxel_size_um"})
    return StressRow(name, settings, (shape_z or z, side or xy, side or xy), voxel_size_um=kw.get("voxel_size_um"))


def _sides(quick: bool) -> tuple[int, int]:
    return (40, 128) if quick else (64, 192)


def stress_rows(*, quick: bool = False) -> list[StressRow]:
    """The rows: plain, anisotropy 3x and 4x (and 3x with its voxel size), small, large, thin membranes,
    15 photons, dome with background."""
    z, xy = _sides(quick)
    return [
        _row("plain (12 vox, isotropic)", z, xy),
        _row("anisotropy 3x", z, xy, shape_z=z // 3, z_step=3, cell_diameter=14),
        _row("anisotropy 4x", z, xy, shape_z=z // 4, z_step=4, cell_diameter=16),
        _row("anisotropy 3x, voxel size given", z, xy, shape_z=z // 3, z_step=3, cell_diameter=14, voxel_size_um=(3.0, 1.0, 1.0)),
        _row("small cells (7 vox)", z, xy, cell_diameter=7),
        _row("large cells (35 vox)", z, xy, shape_z=int(z * 1.5), side=int(xy * 1.5), cell_diameter=35),
        _row("thin membranes (1 vox)", z, xy, membrane="thin"),
        _row("15 photons", z, xy, photons=15.0),
        _row("dome with background, z 2x", z, xy, shape_z=z // 2, z_step=2, cell_diameter=11, dome=True),
    ]


def probe_rows(*, quick: bool = False) -> list[StressRow]:
    """Factors past the shipped model's training ranges (``training.data.DataSettings``: size spread 0-0.4,
    warp 0-0.35, patchiness 0-0.8) and small cells at a coarse z step: where the next training run should
    reach (``python -m training.evaluate --probe``)."""
    z, xy = _sides(quick)
    return [
        _row("cell sizes spread 0.8 (14 vox)", z, xy, cell_diameter=14, size_spread=0.8),
        _row("walls bent 0.6", z, xy, warp=0.6),
        _row("staining patchiness 1.0", z, xy, patchiness=1.0),
        _row("small cells at z 3x (10 vox, 3 planes)", z, xy, shape_z=z // 3, z_step=3, cell_diameter=10),
    ]


def _scores(labels: np.ndarray, truth: np.ndarray, seconds: float) -> dict[str, Any]:
    scores = match_instances(labels, truth, iou_threshold=0.5).to_dict()
    return {**{k: scores[k] for k in _METRICS}, "seconds": round(seconds, 1)}


def _run_bundle(bundle: Bundle, image: np.ndarray, row: StressRow, options: SegmentOptions) -> tuple[np.ndarray, float, str]:
    started = time.perf_counter()
    result = segment(image, bundle=bundle, options=options, voxel_size_um=row.voxel_size_um)
    return result.labels, time.perf_counter() - started, result.report.scale.describe()


def run_stress(bundle: Bundle, /, *, old_bundle: Bundle | None = None, quick: bool = False, tta: bool = False,
               probe: bool = False) -> dict[str, Any]:
    """Score every row for ``bundle`` (defaults; with ``tta`` also with test-time flips), ``old_bundle``
    (rescaling off) and the tuned baseline; ``probe``: the rows of :func:`probe_rows` instead, on their own seeds."""
    rows = probe_rows(quick=quick) if probe else stress_rows(quick=quick)
    seed_base, validation_seed_base = (PROBE_SEED_BASE, PROBE_BASELINE_SEED_BASE) if probe else (STRESS_SEED_BASE, BASELINE_SEED_BASE)
    started = time.perf_counter()
    validation = []
    for i, row in enumerate(rows):
        vol = row.volume(validation_seed_base + i)
        validation.append((vol.image, vol.labels))
    params, val_score = tune_baseline(validation)
    out = []
    for i, row in enumerate(rows):
        vol = row.volume(seed_base + i)
        labels, seconds, scale = _run_bundle(bundle, vol.image, row, SegmentOptions())
        entry: dict[str, Any] = {"row": row.name, "shape": list(row.shape), "scale": scale, "model": _scores(labels, vol.labels, seconds)}
        if tta:
            labels, seconds, _ = _run_bundle(bundle, vol.image, row, SegmentOptions(tta=True))
            entry["tta"] = _scores(labels, vol.labels, seconds)
        if old_bundle is not None:
            labels, seconds, _ = _run_bundle(old_bundle, vol.image, row, SegmentOptions(rescale="off"))
            entry["old"] = _scores(labels, vol.labels, seconds)
        t0 = time.perf_counter()
        entry["classical"] = _scores(classical_segment(vol.image, params), vol.labels, time.perf_counter() - t0)
        out.append(entry)
    return {"rows": out, "baseline_params": vars(params), "baseline_validation_score": round(val_score, 4),
            "wall_time_s": round(time.perf_counter() - started, 1)}


def format_stress(report: dict[str, Any], /) -> str:
    """Markdown: one line per row, F1@0.5 / mean matched IoU / ARE for each method."""
    methods = [m for m in ("model", "tta", "old", "classical") if m in report["rows"][0]]
    names = {"model": "this model", "tta": "this model, --tta", "old": "old model, no rescaling", "classical": "classical baseline"}
    head = "| stress row | shape | cells | " + " | ".join(f"{names[m]} F1 / IoU / ARE" for m in methods) + " | scale used |"
    lines = [head, "|" + "---|" * (4 + len(methods))]
    for r in report["rows"]:
        cells = "".join(
            f" {r[m]['f1']:.3f} / {r[m]['mean_matched_iou']:.3f} / {r[m]['adapted_rand_error']:.3f} |" for m in methods
        )
        shape = "x".join(map(str, r["shape"]))
        lines.append(f"| {r['row']} | {shape} | {r['model']['n_gt']:.0f} |{cells} {r['scale']} |")
    params = BaselineParams(**report["baseline_params"])
    lines.append("")
    lines.append(f"Classical baseline tuned on the validation volumes of all rows: {params} (score {report['baseline_validation_score']}).")
    return "\n".join(lines)
