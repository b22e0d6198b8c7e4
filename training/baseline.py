"""The classical baseline every accuracy row is compared with: smoothing + distance-transform watershed.

No network: the membrane image itself, smoothed with a gaussian and scaled by its percentiles to 0..1, is
the boundary map; the engine's own labelling (:func:`engine.labels.label_cells`: threshold, distance-
transform seeds ``min_dist`` apart, watershed on the boundary map) turns it into cells, and a heavily
smoothed foreground mask removes the dark background around the tissue. Its parameters are tuned on
validation volumes only (:func:`tune_baseline`), never on the volumes it is scored on. Like a user without
metadata, it assumes isotropic voxels.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage as ndi

from engine.bundle import OutputSpec, PostprocessSpec
from engine.metrics import match_instances
from engine.labels import label_cells

__all__ = ["BaselineParams", "GRID", "classical_segment", "tune_baseline"]

_BOUNDARY = OutputSpec(kind="boundary", channel=0, names=("boundary",))


@dataclass(frozen=True)
class BaselineParams:
    """``sigma``: smoothing (voxels); ``threshold``: interior level on the 0..1 map; ``min_dist``: seed
    spacing (voxels); ``foreground``: level of the 4-voxel-smoothed map below which is background."""

    sigma: float = 1.0
    threshold: float = 0.7
    min_dist: int = 3
    foreground: float = 0.08


GRID = {"sigma": (0.6, 1.2), "threshold": (0.5, 0.65, 0.8), "min_dist": (2, 4), "foreground": (0.0, 0.1)}


def classical_segment(image: NDArray[np.number], params: BaselineParams, /) -> NDArray[np.uint32]:
    """``(Z, Y, X)`` raw membrane image -> ``(Z, Y, X)`` uint32 labels."""
    data = image.astype(np.float32)
    lo, hi = np.percentile(data[::2, ::2, ::2], [1.0, 99.8])
    scaled = np.clip((data - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    boundary = ndi.gaussian_filter(scaled, params.sigma)
    spec = PostprocessSpec(method="watershed", threshold=params.threshold, min_dist=params.min_dist, label_threshd=5)
    labels = label_cells(boundary[np.newaxis], output=_BOUNDARY, spec=spec, open_background=False)  # bright is no background
    if params.foreground > 0:
        background = ndi.gaussian_filter(scaled, 4.0) < params.foreground
        labels[background] = 0
    return labels


def tune_baseline(volumes: Sequence[tuple[NDArray[np.number], NDArray[np.integer]]], /) -> tuple[BaselineParams, float]:
    """The :data:`GRID` point with the best mean of F1@0.5 and mean matched IoU over ``(image, truth)`` pairs."""
    best, best_score = BaselineParams(), -1.0
    for values in itertools.product(*GRID.values()):
        params = BaselineParams(**dict(zip(GRID, values)))
        scores = [match_instances(classical_segment(img, params), truth) for img, truth in volumes]
        score = float(np.mean([(s.f1 + s.mean_matched_iou) / 2 for s in scores]))
        if score > best_score:
            best, best_score = params, score
    return best, best_score
