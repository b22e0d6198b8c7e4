"""skimage's seeded watershed with a stated order among seeds of equal value, so a part floods as the whole.

skimage queues every marker voxel at age 0 and breaks ties on (value, age), so among markers of one value
the heap's shape decides which goes first, and that shape depends on everything queued. Flooding parts
of a window on their own (the split of shared components on threads, the plateaus piece by piece) would
then decide such ties differently from one flood of the whole window; on quantized maps (bf16 output,
saturated probabilities) they are common. Here markers of equal value go in raster order: each is lowered
by float64 steps below its value, the first in raster order the most. Every step lies below the next float32
value under it (2**29 float64 steps per float32 step), so no other order changes, and every other voxel
is queued with a fresh age, as before.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray
from skimage.segmentation import watershed

__all__ = ["seeded_watershed"]


def seeded_watershed(image: np.ndarray, markers: NDArray[np.integer], mask: NDArray[np.bool_], /) -> NDArray[np.int32]:
    """``skimage.segmentation.watershed(image, markers, mask=mask)`` (face connectivity) with markers of
    equal value queued in raster order (see the module docstring)."""
    priority = image.astype(np.float64)  # skimage floods a float64 copy anyway
    at = np.flatnonzero(markers.reshape(-1))  # raster order
    value = priority.reshape(-1)[at]
    order = np.argsort(value, kind="stable")
    ranked = value[order]
    steps = np.empty(len(at), dtype=np.float64)
    steps[order] = np.searchsorted(ranked, ranked, side="right") - np.arange(len(ranked))  # the first the most
    priority.reshape(-1)[at] = value - steps * np.abs(np.spacing(value))
    return watershed(priority, markers, mask=mask)
