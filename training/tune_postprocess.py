r"""Tune the default bundle's post-processing (and pick its patch shape) on validation volumes.

Command (from the repository root, after ``python -m training.train_default``)::

    python -m training.tune_postprocess [--bundle engine/default_bundle]

The validation volumes (seeds 500-502, 48x160x160, voxel_scale 1, 0.75 and 1.5, and one ``engine.tissue``
volume per stress row, seeds 950+) are used by no training step and by no evaluation (``training/data.py``,
``training/stress.py``). The network runs once per volume, as ``engine.segment``
runs it by default; then every ``threshold`` x ``min_dist`` of the grid is scored with
``engine.labels.label_cells`` (criterion: mean of F1@0.5 and mean matched IoU, averaged over the
volumes), then ``label_threshd`` at the best pair, then the agglomeration (``MERGES``), then the threshold
again together with its lowering on zoomed-up model grids (``PER_UPSAMPLING``), then the bundle's
cell-diameter range (``DIAMETER_RANGES``, which changes the scale the engine picks, so the volumes are run
again). The patch shape is the fastest of a few candidates
on a 64x256x256 volume. The chosen values and every figure go into ``bundle.json`` (``postprocess``,
``patch_shape`` and ``validation``).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from engine.bundle import Bundle, PostprocessSpec, load_bundle, write_bundle_json
from engine.metrics import match_instances
from engine.pipeline import SegmentOptions, segment
from engine.labels import MemoryLabelStore, SlabLabeler
from engine.model_grid import ModelGrid, labels_on_model_grid
from engine.scale import ScalePlan
from engine.streaming import ArraySource
from engine.synthetic import make_membrane_volume

from .data import VALIDATION_SEEDS
from .stress import BASELINE_SEED_BASE, stress_rows

__all__ = ["THRESHOLDS", "MIN_DISTS", "LABEL_THRESHDS", "PATCH_CANDIDATES", "tune", "main"]

logger = logging.getLogger("training.tune_postprocess")

VALIDATION_SHAPE = (48, 160, 160)
VALIDATION_SCALES = (1.0, 0.75, 1.5)
THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)
# 12 and 16 exceed most cells' interior radius, so they come close to one seed per connected component of
# the thresholded interior; larger values would only widen the streaming halo (2 * min_dist planes)
MIN_DISTS = (3, 4, 6, 8, 10)
LABEL_THRESHDS = (5, 20, 50, 100)
MERGES = ((None, 0), (0.3, 0), (0.5, 0), (0.5, 150), (0.7, 150))  # (merge_threshold, merge_min_size), model voxels
PER_UPSAMPLING = (0.0, 0.05, 0.1, 0.15)  # interior threshold lowered per unit of zoom-up on the model grid
DIAMETER_RANGES = ((9.0, 24.0), (12.0, 20.0))  # Bundle.cell_diameter_voxels candidates
PATCH_CANDIDATES = ((32, 128, 128), (64, 128, 128), (64, 256, 256))


Run = tuple[np.ndarray, np.ndarray, ScalePlan, ModelGrid | None]  # probabilities, truth, scale, model grid


def _label(probs: np.ndarray, bundle: Bundle, spec: PostprocessSpec, plan: ScalePlan, grid: ModelGrid | None) -> np.ndarray:
    """Label ``probs`` as ``engine.segment`` does for a volume that is one slab: on the model grid (``probs`` are
    there, the labels are sampled back) when the run labels there, else on the input grid."""
    shape = probs.shape[1:]
    store = MemoryLabelStore(shape)
    on_model_grid = grid is not None  # there the labelling is unscaled: no distance sampling
    labeler = SlabLabeler(shape, output=bundle.output, spec=plan.postprocess(spec, on_model_grid=on_model_grid),
                          sampling=None if on_model_grid else plan.sampling, depth=shape[0], halo=0, store=store)
    labeler.push(0, probs)
    labels = labeler.finish().lut[store.labels]
    return labels if grid is None else np.concatenate(list(grid.labels_back(iter([labels]))))


def _score(runs: list[Run], bundle: Bundle, spec: PostprocessSpec) -> dict[str, Any]:
    """Label each run with ``spec`` as the engine would, and score it."""
    per = [match_instances(_label(p, bundle, spec, plan, grid), t) for p, t, plan, grid in runs]
    f1 = float(np.mean([s.f1 for s in per]))
    iou = float(np.mean([s.mean_matched_iou for s in per]))
    return {"f1": f1, "mean_matched_iou": iou, "objective": (f1 + iou) / 2,
            "adapted_rand_error": float(np.mean([s.adapted_rand_error for s in per])),
            "per_volume": [s.to_dict() for s in per]}


def _network_output(image: np.ndarray, truth: np.ndarray, bundle: Bundle, voxel_size_um: tuple[float, float, float] | None) -> Run:
    """The network's output on the grid ``engine.segment`` labels on. For a run on the model grid that is the
    stack resampled there as the engine resamples it, run as it is; its normalization statistics are then the
    resampled stack's, not the input's (the engine's), a close stand-in for tuning."""
    result = segment(image, bundle=bundle, voxel_size_um=voxel_size_um)
    scale = result.report.scale
    if not labels_on_model_grid(scale):
        return result.probabilities, truth, scale, None
    grid = ModelGrid.for_scale(image.shape, scale)
    resampled = grid.source(ArraySource(image[np.newaxis])).read(0, grid.model_shape[0])
    return segment(resampled, bundle=bundle, options=SegmentOptions(rescale="off")).probabilities, truth, scale, grid


def _patch_timings(bundle: Bundle) -> dict[str, float]:
    volume = make_membrane_volume((64, 256, 256), seed=VALIDATION_SEEDS[0]).image
    timings = {}
    for patch in PATCH_CANDIDATES:
        segment(volume[:16, :64, :64], bundle=bundle, options=SegmentOptions(patch_shape=(16, 64, 64)))  # warm-up
        result = segment(volume, bundle=bundle, options=SegmentOptions(patch_shape=patch, min_dist=1000))
        timings["x".join(map(str, patch))] = round(result.report.timings["infer"], 2)
        logger.info("patch %s: inference %.2f s", patch, result.report.timings["infer"])
    return timings


def _validation_runs(bundle: Bundle) -> list[Run]:
    """The network's output on every validation volume, as ``engine.segment`` runs it by default: the
    synthetic ones (``VALIDATION_SEEDS``) and one per stress row of ``engine.tissue`` (the seeds the classical
    baseline is tuned on, ``training.stress.BASELINE_SEED_BASE``)."""
    runs = []
    for seed, scale in zip(VALIDATION_SEEDS, VALIDATION_SCALES):
        vol = make_membrane_volume(VALIDATION_SHAPE, seed=seed, voxel_scale=scale)
        runs.append(_network_output(vol.image, vol.labels, bundle, None))
    for i, row in enumerate(stress_rows(quick=True)):
        vol = row.volume(BASELINE_SEED_BASE + i)
        runs.append(_network_output(vol.image, vol.labels, bundle, row.voxel_size_um))
    return runs


def _tune_lowering(runs: list[Run], bundle: Bundle, spec: PostprocessSpec) -> tuple[dict[str, Any], PostprocessSpec, dict[str, float]]:
    """The threshold and its lowering on zoomed-up model grids (``PER_UPSAMPLING``), searched together (the
    lowering moves the threshold the model-grid runs see); ties go to the first pair: no lowering, low threshold.

    Returns:
        The best score, the spec with both set, and the objective of each ``"threshold/lowering"``.
    """
    scored = [(_score(runs, bundle, dataclasses.replace(spec, threshold=t, threshold_per_upsampling=k)), t, k)
              for k, t in itertools.product(PER_UPSAMPLING, THRESHOLDS)]
    result, t, k = max(scored, key=lambda r: round(r[0]["objective"], 4))
    return result, dataclasses.replace(spec, threshold=t, threshold_per_upsampling=k), {f"{t}/{k}": round(r["objective"], 4) for r, t, k in scored}


def tune(
    bundle: Bundle, /, *, measure_patches: bool = True
) -> tuple[PostprocessSpec, tuple[int, int, int], dict[str, Any], tuple[float, float] | None]:
    """Best post-processing, patch shape, the validation record and the cell-diameter range for ``bundle``."""
    started = time.perf_counter()
    runs = _validation_runs(bundle)
    grid = []
    base = dataclasses.replace(bundle.postprocess, method="watershed", threshold_per_upsampling=0.0)  # as any bundle starts
    for threshold, min_dist in itertools.product(THRESHOLDS, MIN_DISTS):
        spec = dataclasses.replace(base, threshold=threshold, min_dist=min_dist)
        result = _score(runs, bundle, spec)
        grid.append({"threshold": threshold, "min_dist": min_dist, "f1": round(result["f1"], 4),
                     "mean_matched_iou": round(result["mean_matched_iou"], 4)})
        logger.info("threshold %.2f min_dist %d: F1 %.3f IoU %.3f", threshold, min_dist, result["f1"], result["mean_matched_iou"])
    best = max(grid, key=lambda g: (g["f1"] + g["mean_matched_iou"], -g["min_dist"]))
    specs = [dataclasses.replace(base, threshold=best["threshold"], min_dist=best["min_dist"], label_threshd=n)
             for n in LABEL_THRESHDS]
    scored = [(_score(runs, bundle, s), s) for s in specs]
    best_result, best_spec = max(scored, key=lambda rs: (round(rs[0]["objective"], 4), rs[1].label_threshd))
    merged = [(_score(runs, bundle, dataclasses.replace(best_spec, merge_threshold=t, merge_min_size=m)), t, m) for t, m in MERGES]
    for result, t, m in merged:
        logger.info("merge_threshold %s merge_min_size %d: F1 %.3f IoU %.3f", t, m, result["f1"], result["mean_matched_iou"])
    best_result, t, m = max(merged, key=lambda r: round(r[0]["objective"], 4))
    best_spec = dataclasses.replace(best_spec, merge_threshold=t, merge_min_size=m)
    best_result, best_spec, lowered = _tune_lowering(runs, bundle, best_spec)
    ranges = {str(list(bundle.cell_diameter_voxels or ())): best_result["objective"]}
    for candidate in DIAMETER_RANGES:
        if candidate == bundle.cell_diameter_voxels:
            continue
        other = dataclasses.replace(bundle, cell_diameter_voxels=candidate)
        result = _score(_validation_runs(other), other, best_spec)
        ranges[str(list(candidate))] = result["objective"]
        logger.info("cell_diameter_voxels %s: F1 %.3f IoU %.3f", candidate, result["f1"], result["mean_matched_iou"])
        if result["objective"] > best_result["objective"]:
            best_result, bundle = result, other
    patch = bundle.patch_shape
    timings = _patch_timings(bundle) if measure_patches else {}
    if timings:
        fastest = min(timings, key=timings.__getitem__)
        patch = tuple(int(v) for v in fastest.split("x"))  # type: ignore[assignment]
    record = {
        "command": "python -m training.tune_postprocess",
        "volumes": [{"seed": s, "shape": list(VALIDATION_SHAPE), "voxel_scale": v} for s, v in zip(VALIDATION_SEEDS, VALIDATION_SCALES)]
        + [{"tissue_row": r.name, "seed": BASELINE_SEED_BASE + i, "shape": list(r.shape)} for i, r in enumerate(stress_rows(quick=True))],
        "criterion": "mean over volumes of (F1@0.5 + mean matched IoU) / 2",
        "grid": grid,
        "label_threshd": {str(s.label_threshd): round(r["objective"], 4) for r, s in scored},
        "merge": {f"{t}/{m}": round(r["objective"], 4) for r, t, m in merged},
        "threshold_per_upsampling": lowered,
        "cell_diameter_voxels": {k: round(v, 4) for k, v in ranges.items()},
        "chosen_cell_diameter_voxels": list(bundle.cell_diameter_voxels or ()),
        "chosen": dataclasses.asdict(best_spec),
        "f1": round(best_result["f1"], 4),
        "mean_matched_iou": round(best_result["mean_matched_iou"], 4),
        "adapted_rand_error": round(best_result["adapted_rand_error"], 4),
        "per_volume": best_result["per_volume"],
        "patch_infer_s_64x256x256": timings,
        "wall_time_s": round(time.perf_counter() - started, 1),
    }
    return best_spec, patch, record, bundle.cell_diameter_voxels  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    logging.getLogger("engine").setLevel(logging.WARNING)  # not the backend selection per run
    parser = argparse.ArgumentParser(prog="python -m training.tune_postprocess", description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", type=Path, default=None, help="bundle directory. Default: the shipped one")
    parser.add_argument("--no-patch-timing", action="store_true", help="keep the bundle's patch shape")
    args = parser.parse_args(argv)
    bundle = load_bundle(args.bundle)
    spec, patch, record, diameters = tune(bundle, measure_patches=not args.no_patch_timing)
    record["command"] = f"python -m training.tune_postprocess {' '.join(argv if argv is not None else sys.argv[1:])}".strip()
    write_bundle_json(dataclasses.replace(bundle, postprocess=spec, patch_shape=patch, validation=record, cell_diameter_voxels=diameters))
    logger.info("%s: postprocess %s, patch %s, F1 %.3f, IoU %.3f", bundle.path, spec, patch, record["f1"], record["mean_matched_iou"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
