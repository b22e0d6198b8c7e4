"""Probabilities -> labelled cells.

Foreground models: threshold, then connected components or the module's seeded watershed. Boundary
(membrane) models: seeds come from the distance transform of the thresholded cell interior, and the
watershed floods the boundary probability itself, so cells meet on the membrane and fill the tissue.
Objects under ``label_threshd`` voxels are dropped and ids are made consecutive.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage
from skimage.feature import peak_local_max
from skimage.segmentation import relabel_sequential, watershed

from .bundle import OutputSpec, PostprocessSpec

__all__ = ["interior_probability", "label_cells"]


def interior_probability(probs: NDArray[np.float32], output: OutputSpec, /) -> NDArray[np.float32]:
    """The cell-interior probability ``(Z, Y, X)`` from the network's ``(K, Z, Y, X)`` output."""
    channel = probs[output.channel]
    return (1.0 - channel) if output.kind == "boundary" else channel


def _seeds(mask: NDArray[np.bool_], min_dist: int, sampling: Sequence[float] | None) -> NDArray[np.int32]:
    """Markers at distance-transform maxima at least ``min_dist`` apart, one or more per component."""
    distance = ndimage.distance_transform_edt(mask, sampling=sampling)
    components, _ = ndimage.label(mask)
    peaks = peak_local_max(distance, min_distance=max(1, int(min_dist)), labels=components, exclude_border=False)
    peak_mask = np.zeros(mask.shape, dtype=bool)
    peak_mask[tuple(peaks.T)] = True
    markers, _ = ndimage.label(peak_mask)  # adjacent plateau maxima become one seed
    return markers.astype(np.int32, copy=False)


def _drop_small(labels: np.ndarray, min_size: int) -> NDArray[np.uint32]:
    """Remove objects under ``min_size`` voxels and renumber the rest 1..n."""
    labels = labels.astype(np.uint32, copy=False)
    if min_size > 1 and labels.max() > 0:
        sizes = np.bincount(labels.ravel())
        small = sizes < min_size
        small[0] = False
        if small.any():
            labels = np.where(small[labels], np.uint32(0), labels)
    relabelled, _, _ = relabel_sequential(labels)
    return relabelled.astype(np.uint32, copy=False)


def label_cells(
    probs: NDArray[np.float32],
    /,
    *,
    output: OutputSpec,
    spec: PostprocessSpec,
    sampling: Sequence[float] | None = None,
) -> NDArray[np.uint32]:
    """Label cells in a probability map.

    Args:
        probs: ``(K, Z, Y, X)`` float32 network output on the host.
        output: what the channels mean.
        spec: method, threshold, min_dist, label_threshd.
        sampling: relative voxel size ``(z, y, x)`` for the distance transform; isotropic when None.

    Returns:
        ``(Z, Y, X)`` uint32 labels, 0 = background, cells 1..n.
    """
    interior = interior_probability(probs, output)
    mask = interior > spec.threshold
    if spec.method == "components":
        labels, _ = ndimage.label(mask)
        return _drop_small(labels, spec.label_threshd)
    markers = _seeds(mask, spec.min_dist, sampling)
    if output.kind == "boundary":
        labels = watershed(probs[output.channel], markers)
    else:
        distance = ndimage.distance_transform_edt(mask, sampling=sampling)
        labels = watershed(-distance, markers, mask=mask)
    return _drop_small(labels, spec.label_threshd)
