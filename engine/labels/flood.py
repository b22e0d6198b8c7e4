"""Seeded watershed of the boundary probability (boundary models) or of the negated distance (foreground
models), done in the cheap order the structure allows.

Profiled on a 64x256x256 membrane stack (benchmarks/PERFORMANCE.md), the priority-queue flood dominated,
so most voxels never enter one:

- An interior component that holds exactly one seed is flooded entirely by that seed (inside it every
  voxel is reached before any membrane voxel is taken), so it is labelled directly; components with
  several seeds are split by a flood confined to them, which is what the full flood does there. For
  foreground models, whose flood stays in the mask, this is the whole job.
- Membrane voxels (boundary models) take the label their steepest-descent path in the boundary probability
  runs into (pointer jumping). The flood gives a voxel the cell with the lowest pass to it, and a
  descending path is such a pass, so the two agree except where two cells tie (ridges, plateaus); voxels
  whose path ends on a plateau or in a pit are flooded as before. Measured agreement with the plain
  flood: 99.997% of voxels.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import cc3d
import numpy as np
import torch
from numpy.typing import NDArray
from skimage.segmentation import watershed

from .device import descend as torch_descend
from .device import run_on
from .seeded import seeded_watershed

__all__ = [
    "FLOOD_GROUPS", "FLOOD_VOXELS_PER_THREAD", "box_of", "descend", "fill", "flood", "flood_pieces", "flood_plateaus",
    "resolve_components", "rim", "seat_components", "split_shared",
]

TIE_BREAK = 1e-9  # rim order among equal boundary probabilities (float32 steps at membrane levels are >= 3e-8)
FLOOD_VOXELS_PER_THREAD = 1_000_000  # box voxels per thread below which a second flood thread costs more than it saves
FLOOD_GROUPS = 2  # at most: more groups' boxes overlap (their sum is 1.36x the box for 2, 2.2x for 4, 6.5x for 16
# on the benchmark's window), each box a flood's float64 copies, so memory would grow with the host's cores


def resolve_components(
    image: np.ndarray, markers: NDArray[np.int32], components: NDArray[np.int32], /, *, threads: int = 1
) -> NDArray[np.int32]:
    """Label every interior component that holds a seed, exactly as the full flood would.

    A component with one seed is that seed's; a component with several is split by flooding ``image`` from
    its seeds inside the component only (its voxels are all labelled before the flood leaves it, so nothing
    outside changes the split; ``threads`` as for :func:`split_shared`). Components without a seed, and
    everything outside the components, stay 0.
    """
    at = markers > 0
    region_of_comp, shared = seat_components(markers[at], components[at], int(components.max()))
    resolved = region_of_comp[components]
    if shared.any():
        inside = shared[components]
        box = box_of(inside)
        resolved[box] = split_shared(image[box], markers[box], components[box], inside[box], resolved[box], threads=threads)
    return resolved


def seat_components(
    seed_markers: NDArray[np.integer], seed_components: NDArray[np.integer], n_components: int, /
) -> tuple[NDArray[np.int32], NDArray[np.bool_]]:
    """From each seed voxel's marker and interior component: the marker that labels each component outright
    (0 when it has none or several) and which components several markers share (to split by a flood)."""
    comp_of_seed = np.zeros(int(seed_markers.max(initial=0)) + 1, dtype=np.int64)
    comp_of_seed[seed_markers] = seed_components
    per_comp = np.bincount(comp_of_seed[1:], minlength=n_components + 1)
    region_of_comp = np.zeros(n_components + 1, dtype=np.int32)
    single = per_comp[comp_of_seed[1:]] == 1
    region_of_comp[comp_of_seed[1:][single]] = np.arange(1, len(comp_of_seed), dtype=np.int32)[single]
    shared = per_comp > 1
    shared[0] = False
    return region_of_comp, shared


def box_of(mask: NDArray[np.bool_], /, *, margin: int = 0) -> tuple[slice, ...]:
    """The bounding box of ``mask``'s voxels, grown by ``margin`` within the volume (``mask`` has some).

    From the planes and rows that hold a voxel (``any`` over each axis's rest): 0.16 ms on a 64x256x256 mask,
    where ``ndimage.find_objects`` of its uint8 copy took 7.8 ms."""
    return tuple(slice(max(0, int(hit[0]) - margin), min(n, int(hit[-1]) + 1 + margin))
                 for hit, n in zip(_occupied(mask), mask.shape))


def _occupied(mask: NDArray[np.bool_], /) -> list[NDArray[np.intp]]:
    """Per axis, the indices whose hyperplane holds a voxel of ``mask``."""
    if mask.ndim == 1:
        return [np.flatnonzero(mask)]
    return [np.flatnonzero(mask.reshape(len(mask), -1).any(axis=1)), *_occupied(mask.any(axis=0))]


def split_shared(image: np.ndarray, markers: NDArray[np.int32], components: NDArray[np.int32], inside: NDArray[np.bool_],
                 resolved: NDArray[np.int32], /, *, threads: int = 1) -> NDArray[np.int32]:
    """``resolved`` with the components ``inside`` marks split among their ``markers`` by a flood of ``image``
    confined to them (a box of the window: the flood never leaves ``inside``; ``threads``: see
    :func:`flood_pieces`)."""
    split = flood_pieces(image, markers, inside, components, threads=threads)
    return np.where(inside, split, resolved).astype(np.int32, copy=False)


def flood_pieces(image: np.ndarray, seeds: NDArray[np.int32], region: NDArray[np.bool_], pieces: NDArray[np.int32], /, *,
                 threads: int = 1) -> NDArray[np.int32]:
    """The flood of ``image`` confined to ``region`` from the ``seeds`` inside it
    (:func:`engine.labels.seeded.seeded_watershed`), as labels on ``region`` (0 elsewhere).

    No flood crosses from one of ``region``'s face-connected ``pieces`` (ids) to another, so with
    ``threads`` > 1 and a box over :data:`FLOOD_VOXELS_PER_THREAD` voxels per thread the pieces are dealt
    into (at most :data:`FLOOD_GROUPS`) groups by z-centre, each flooded in its own box on a thread of its
    own (the flood releases the GIL). The labels are those of one flood: every voxel's place in the queue
    is fixed by its value, then raster order (seeds) or age (the rest), and a piece's voxels keep their
    relative order in a box of their own (raster order within a box is the volume's).
    """
    groups = min(threads, FLOOD_GROUPS, region.size // FLOOD_VOXELS_PER_THREAD)
    if groups > 1:
        group, used = _z_groups(pieces, region, groups)
    if groups < 2 or len(used) < 2:  # one thread, a small box, or a piece holding most of the voxels
        return seeded_watershed(image, np.where(region, seeds, 0), region)

    def flood_group(g: int) -> tuple[tuple[slice, ...], NDArray[np.bool_], NDArray[np.int32]]:
        mine = group == g
        box = box_of(mine)
        return box, mine[box], seeded_watershed(image[box], np.where(mine[box], seeds[box], 0), mine[box])

    out = np.zeros(region.shape, dtype=np.int32)
    with ThreadPoolExecutor(len(used)) as pool:
        for box, mine, labels in pool.map(flood_group, used):
            np.copyto(out[box], labels, where=mine, casting="unsafe")
    return out


def _z_groups(pieces: NDArray[np.int32], region: NDArray[np.bool_], groups: int, /) -> tuple[NDArray[np.int16], list[int]]:
    """Each ``region`` voxel's group ``1..groups`` (0 elsewhere): whole pieces in order of their z-centre,
    dealt into groups of about equal voxel counts (so each group's box spans about its share of planes);
    and the groups that got voxels (a piece over half the voxels leaves a group empty)."""
    piece = pieces[region]
    z = np.repeat(np.arange(len(region)), np.count_nonzero(region.reshape(len(region), -1), axis=1))  # C order
    size = np.bincount(piece)
    present = np.flatnonzero(size)
    order = present[np.argsort(np.bincount(piece, weights=z)[present] / size[present], kind="stable")]
    before = np.cumsum(size[order]) - size[order]
    group_of = np.zeros(len(size), dtype=np.int16)
    group_of[order] = 1 + before * groups // int(before[-1] + size[order[-1]])
    group = np.zeros(region.shape, dtype=np.int16)
    group[region] = group_of[piece]
    return group, np.unique(group_of[order]).tolist()


def descend(image: np.ndarray, labels: NDArray[np.int32]) -> tuple[NDArray[np.int32], np.ndarray]:
    """Give each unlabelled voxel the label its steepest-descent path in ``image`` runs into (numpy).

    The reference for :func:`engine.labels.device.descend`, which the flood runs (on the CPU too: equal bit
    for bit, and measured 1.5x faster on one thread, 2.7x on two; ``benchmarks/PERFORMANCE.md``).

    Each unlabelled voxel points to its lowest 6-neighbour if that one is strictly lower (the first such in
    z, y, x order on ties); pointer jumping follows the paths to their ends. A path that ends on a labelled
    voxel gives its label; one that ends on a plateau or a pit leaves 0.

    Returns:
        The labels, and ``image`` with each unlabelled voxel's value replaced by its lowest neighbour's
        (the level at which the flood would have reached it).
    """
    big = np.array(np.inf, dtype=image.dtype) if image.dtype.kind == "f" else np.iinfo(image.dtype).max
    padded = np.pad(image, 1, constant_values=big).ravel()
    owner = np.pad(labels, 1, constant_values=-1).ravel()
    shape = tuple(s + 2 for s in image.shape)
    index: type[np.signedinteger] = np.int32 if padded.size < 2**31 else np.int64
    open_idx: NDArray[np.signedinteger] = np.flatnonzero(owner == 0).astype(index, copy=False)
    best = padded[open_idx]
    parent = open_idx.copy()
    for stride in (shape[1] * shape[2], shape[2], 1):
        for step in (-stride, stride):
            neighbour = open_idx + step
            value = padded[neighbour]
            lower = value < best
            best[lower] = value[lower]
            parent[lower] = neighbour[lower]
    pointer = np.arange(padded.size, dtype=index)
    pointer[open_idx] = parent
    moving = open_idx[parent != open_idx]
    while moving.size:
        target = pointer[moving]
        jumped = pointer[target]
        pointer[moving] = jumped
        moving = moving[jumped != target]
    owner[open_idx] = owner[pointer[open_idx]]
    padded[open_idx] = best
    inner = (slice(1, -1),) * 3
    return owner.reshape(shape)[inner].astype(np.int32, copy=False), padded.reshape(shape)[inner]


def rim(region: NDArray[np.bool_]) -> NDArray[np.bool_]:
    """The voxels outside ``region`` with a face neighbour in it (``binary_dilation(region) & ~region``, by
    six shifted ORs: 5 ms against scipy's 40 ms on 64x256x256)."""
    grown = region.copy()
    for axis in range(region.ndim):
        n = region.shape[axis]
        lo = tuple(slice(0, n - 1) if a == axis else slice(None) for a in range(region.ndim))
        hi = tuple(slice(1, n) if a == axis else slice(None) for a in range(region.ndim))
        grown[lo] |= region[hi]
        grown[hi] |= region[lo]
    return grown & ~region


def flood(image: np.ndarray, markers: NDArray[np.int32], components: NDArray[np.int32], /, *, confined: bool,
          device: torch.device | None = None) -> NDArray[np.int32]:
    """Seeded watershed of ``image`` (lowest first) from ``markers``: :func:`resolve_components`, then, unless
    ``confined``, :func:`fill`.

    Args:
        image: what to flood.
        markers: seeds 1..k, inside ``components``.
        components: the interior's connected components.
        confined: the flood stays inside the components (foreground models); else it fills the volume.
        device: see :func:`fill`.
    """
    resolved = resolve_components(image, markers, components)
    return resolved if confined else fill(image, resolved, device=device)


def fill(image: np.ndarray, resolved: NDArray[np.int32], /, *, device: torch.device | None = None,
         needed: tuple[slice, ...] | None = None) -> NDArray[np.int32]:
    """Flood the voxels :func:`resolve_components` left unlabelled (membranes, seedless components) from the
    labelled ones, as the full seeded watershed would (see the module docstring).

    A separate step so a caller can drop the seeds and components first (the labelling window's peak memory).

    Args:
        image: what to flood.
        resolved: labels of the seeded components, 0 elsewhere.
        device: where the steepest descent runs (the backend's device; the CPU when None; a GPU out of
            memory hands it to the CPU).
        needed: see :func:`flood_plateaus`.
    """
    if not (resolved == 0).any():
        return resolved
    descended, reached = run_on(device, torch_descend, image, resolved)
    return flood_plateaus(image, resolved, descended, reached, needed=needed)


def flood_plateaus(image: np.ndarray, resolved: NDArray[np.int32], descended: NDArray[np.int32], reached: np.ndarray, /, *,
                   needed: tuple[slice, ...] | None = None) -> NDArray[np.int32]:
    """``descended`` (:func:`descend`'s labels) with the voxels it left 0 (plateaus, pits) flooded from their
    labelled rim, in the box around them (the flood stays inside them and their rim).

    ``needed``: the box whose labels the caller reads (None: all). A plateau with no voxel there is left 0:
    its flood stays inside it and its rim, which no other plateau's flood enters, so the voxels in ``needed``
    come out the same. A slab window's lower halo, whose cells' seeds lie below the window, was 86% of
    the plateau voxels of the benchmark's second window (benchmarks/PERFORMANCE.md).
    """
    rest = descended == 0
    if needed is not None and any(s.indices(n)[:2] != (0, n) for s, n in zip(needed, rest.shape)):
        rest = _pieces_in(rest, needed)
    if not rest.any():
        return descended
    box = box_of(rest, margin=1)
    descended = descended.copy()
    descended[box] = _flood_rest(image[box], resolved[box], descended[box], reached[box], rest[box])
    return descended


def _pieces_in(region: NDArray[np.bool_], box: tuple[slice, ...], /) -> NDArray[np.bool_]:
    """The face-connected pieces of ``region`` that have a voxel in ``box``.

    When ``box`` spans whole planes (a slab window's block), only its two sides in z are labelled: a piece
    there reaches the box through the plane next to it, and the sides never touch. That costs the halo,
    not the window (the labelling benchmark's two windows: 6-8 ms against 33 ms).
    """
    if not all(s.indices(n)[:2] == (0, n) for s, n in zip(box[1:], region.shape[1:])):
        pieces, n = cc3d.connected_components(region, connectivity=6, return_N=True)
        keep = np.zeros(n + 1, dtype=bool)
        keep[pieces[box]] = True
        keep[0] = False
        return keep[pieces]
    z0, z1 = box[0].indices(len(region))[:2]
    if z0 >= z1:  # an empty box: no piece reaches it
        return np.zeros_like(region)
    kept = region.copy()
    for side, outer, inner in ((slice(0, z0), z0 - 1, z0), (slice(z1, len(region)), z1, z1 - 1)):
        if side.start == side.stop:  # the box reaches this end of the volume
            continue
        pieces, n = cc3d.connected_components(region[side], connectivity=6, return_N=True)
        touching = np.zeros(n + 1, dtype=bool)
        touching[pieces[outer - side.start][region[inner]]] = True
        touching[0] = False
        kept[side] = touching[pieces]
    return kept


def _flood_rest(image: np.ndarray, resolved: NDArray[np.int32], descended: NDArray[np.int32], reached: np.ndarray,
                rest: NDArray[np.bool_]) -> NDArray[np.int32]:
    # The rest (plateaus, pits) is flooded from its labelled rim. A rim voxel goes before unlabelled voxels
    # of its own value, and among rim voxels of equal value, those the full flood reached earlier (from a
    # lower neighbour) go first, as they were queued first there: a tie-break of 1-2e-9, far below the
    # gap between distinct float32 probabilities at membrane levels.
    edge = rim(rest)
    late = edge & (resolved == 0)
    priority = image.astype(np.float64)
    priority[late] -= TIE_BREAK * (2.0 - reached[late])
    flooded = watershed(priority, np.where(edge, descended, 0), mask=rest | edge)
    return np.where(rest, flooded, descended).astype(np.int32, copy=False)
