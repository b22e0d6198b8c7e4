"""Probabilities -> labelled cells, whole or slab by slab: one labelling component.

The steps, one module each: :mod:`.distance` (distance transform of the thresholded interior, background
clearing), :mod:`.seeds` (distance maxima at least ``min_dist`` apart within a cell), :mod:`.flood` (the
seeded watershed; :mod:`.seeded` fixes skimage's order among seeds of equal value, so parts of a window
flood on threads as the whole), :mod:`.graph` (region adjacency graph and average-linkage agglomeration),
:mod:`.window` (one window's seeded watershed, on the host or on the network's device), and
:mod:`.slabs` (the slab labeller that runs windows core by core, stitches ids across slab borders and keeps
provisional labels in :mod:`.stores`, joining ids with :mod:`.union_find`;
:func:`label_cells` is its one-core case, as ``sliding_window`` is the one-group case of the slab
inference). Field libraries do the heavy array work where they measured faster: seung-lab's ``edt``
(anisotropic distance transforms), ``cc3d`` (connected components), ``fastremap`` (final ids in place). :mod:`.device` has the array steps
as torch ops for the device that ran the network, equal to these on the CPU; the flood's steepest descent
runs through it everywhere (faster than numpy on a CPU too), a whole window and the region graph's faces
on a GPU, where a GPU run's probability planes stay (pushed as tensors).
"""

from __future__ import annotations

from .distance import BACKGROUND_WIDTH, clear_background, distance_transform
from .flood import flood
from .graph import EdgeTable, agglomerate
from .seeds import find_seeds, interior_of, interior_probability
from .slabs import FileLabelStore, FinalLabels, MemoryLabelStore, SlabLabeler, label_cells
from .union_find import UnionFind

__all__ = [
    "BACKGROUND_WIDTH",
    "EdgeTable",
    "FileLabelStore",
    "FinalLabels",
    "MemoryLabelStore",
    "SlabLabeler",
    "UnionFind",
    "agglomerate",
    "clear_background",
    "distance_transform",
    "find_seeds",
    "flood",
    "interior_of",
    "interior_probability",
    "label_cells",
]
