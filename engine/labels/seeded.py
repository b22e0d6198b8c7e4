"""skimage's seeded watershed with a stated order among seeds of equal value, so a part floods as the whole.

skimage queues every marker voxel at age 0 and breaks ties on (value, age), so among markers of one value
the heap's shape decides which goes first, and that shape depends on everything queued. Flooding parts
of a window on their own (the split of shared components in groups on threads) would then decide such
ties differently from one flood of the whole window, and the labels would depend on the number of cores;
on quantized maps (bf16 output, saturated probabilities) such ties are common. Here markers of equal value
go in raster order: each is lowered by float64 steps below its value, the first in raster order the most.
Every step lies below the next float32 value under it (2**29 float64 steps per float32 step), so no other
order changes, and every other voxel is queued with a fresh age, as before. Where no two markers share a
value (the usual float32 network output) skimage's order is this one already and its watershed runs as it is.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray
from skimage.segmentation import watershed

__all__ = ["seeded_watershed"]


def seeded_watershed(image: np.ndarray, markers: NDArray[np.integer], mask: NDArray[np.bool_], /) -> NDArray[np.int32]:
    """``skimage.segmentation.watershed(image, markers, mask=mask)`` (face connectivity) with markers of
    equal value queued in raster order (see the module docstring)."""
    at = np.flatnonzero(markers)  # raster order
    value = image[np.unravel_index(at, image.shape)].astype(np.float64)
    order = np.argsort(value, kind="stable")
    ranked = value[order]
    if not np.any(ranked[1:] == ranked[:-1]):  # no two markers tie: the heap's order is already this one
        return watershed(image, markers, mask=mask)
    steps = np.empty(len(at), dtype=np.float64)
    steps[order] = np.searchsorted(ranked, ranked, side="right") - np.arange(len(ranked))  # the first the most
    priority = image.astype(np.float64)  # one more float64 copy of the box than skimage's own
    priority.reshape(-1)[at] = value - steps * np.abs(np.spacing(value))
    return watershed(priority, markers, mask=mask)
