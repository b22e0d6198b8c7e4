"""The array steps of labelling as torch ops on the tensors' own device, equal to the numpy steps.

Issue 11: a GPU run should label where the network ran, without copying float probabilities to the host.
Each function here mirrors one numpy primitive of :mod:`engine.labels` and gives the same result on CPU
(the tests compare them on membrane maps, random masks and edge cases):

- :func:`bounded_distance` = ``distance.bounded_distance``, bit for bit (the same int16 arithmetic).
- :func:`path_maximum` = ``seeds.path_maximum``, bit for bit (maxima are exact in any order).
- :func:`peaks` = the peak test of ``seeds.find_seeds``, ``mask & (distance >= path maximum)``.
- :func:`connected_components` = ``cc3d.connected_components(mask, connectivity=6)``, the same numbers.
- :func:`descend` = ``flood.descend``, labels and reached levels, with the same tie rule.
- :func:`faces` = the table of ``graph.EdgeTable().add_piece``: the same pairs and counts; sums equal up
  to the order of float64 additions (on a GPU it differs).

Only scalars cross to the host (a maximum, "anything left to do?" checks, the sizes of compacted
selections) and one small table goes to the device (the square roots of ``0..bound**2``); every volume
stays on the input's device. No op needs CUDA; int16 is used only where the CPU has kernels for it.
torch's float32 ``sqrt`` on CPU is not always correctly rounded (numpy's is), hence that table.

Working memory in bytes per voxel, beside the inputs (``I``: index size, 4 below 2**31 voxels, else 8;
``E``: the float input's item size):

- :func:`bounded_distance`: 6 (three int16 volumes), then 6 (the squared distances, their int32 table
  indices) beside the float32 output.
- :func:`path_maximum`: 3E + 1 (three volumes, the output one of them; the outside mask): 13 for float32.
  :func:`peaks`: that, and the bool output.
- :func:`connected_components`: 3I + 2 (labels, indices, one gather; masks), and 3I + 8 per face pair
  still to join in a round (about one per surface voxel in the first round, few after); int32 output.
- :func:`descend`: 3I + E + 2 (indices, pointers, one gather; the running minimum, which becomes the
  ``reached`` output; masks), and the int32 output.
- :func:`faces`: 1 (a face mask), and up to about 80 bytes per face between two different ids.

Tie rules are the numpy ones: :func:`descend` points a voxel to its lowest face neighbour only when it is
strictly lower, the first such in z-, z+, y-, y+, x-, x+ order; :func:`connected_components` numbers
components in scan order of their first voxel, as cc3d does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch

from ..errors import CellSegError

__all__ = [
    "MAX_BOUND",
    "LabelConvergenceError",
    "bounded_distance",
    "connected_components",
    "descend",
    "faces",
    "index_dtype",
    "jump_pointers",
    "path_maximum",
    "peaks",
    "run_on",
]

logger = logging.getLogger(__name__)

_FAR = 30000  # squared distance "beyond the bound", as in distance.bounded_distance
MAX_BOUND = 52  # _FAR + MAX_BOUND**2 = 32704 still fits int16, so the shifted sums never wrap


class LabelConvergenceError(CellSegError, RuntimeError):
    """An iterative labelling step did not converge within its cap (a bug, or a cap set too low)."""


def _check_volume(t: object, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim != 3:
        raise ValueError(f"{name} must be a (Z, Y, X) tensor, got shape {tuple(t.shape)}")
    return t


def _check_pair(a: torch.Tensor, b: torch.Tensor, names: str) -> None:
    if a.shape != b.shape or a.device != b.device:
        raise ValueError(f"{names} must have one shape and device, got {tuple(a.shape)} on {a.device} "
                         f"and {tuple(b.shape)} on {b.device}")


def _check_mask(mask: object, name: str = "mask") -> torch.Tensor:
    t = _check_volume(mask, name)
    if t.dtype != torch.bool:
        raise ValueError(f"{name} must be a bool tensor, got {t.dtype}")
    return t


def index_dtype(n: int, /) -> torch.dtype:
    """The narrowest torch integer that indexes ``n`` voxels."""
    return torch.int32 if n < 2**31 else torch.int64


@torch.no_grad()
def bounded_distance(mask: torch.Tensor, /, *, bound: int) -> torch.Tensor | None:
    """Isotropic distance of each ``mask`` voxel to the nearest non-mask voxel, when none exceeds ``bound``.

    The same int16 shifted minima along x, then y, then z as ``distance.bounded_distance``, so the
    result is bit for bit the same (and scipy's ``distance_transform_edt``'s).

    Args:
        mask: ``(Z, Y, X)`` bool, any device.
        bound: largest distance searched, ``0..MAX_BOUND`` (beyond it int16 sums would wrap).

    Returns:
        ``(Z, Y, X)`` float32 on ``mask``'s device, or None when some distance exceeds ``bound``.
    """
    mask = _check_mask(mask)
    if not 0 <= bound <= MAX_BOUND:
        raise ValueError(f"bound must be 0..{MAX_BOUND} (int16 squared distances), got {bound}")
    f = mask.to(torch.int16) * _FAR
    shifted = torch.empty_like(f)  # one buffer for every shifted sum (no allocation per offset)
    for axis in (2, 1, 0):
        n = f.shape[axis]
        g = f.clone()
        for k in range(1, min(bound, n - 1) + 1):
            lo, hi, s = g.narrow(axis, 0, n - k), g.narrow(axis, k, n - k), shifted.narrow(axis, 0, n - k)
            torch.minimum(lo, torch.add(f.narrow(axis, k, n - k), k * k, out=s), out=lo)
            torch.minimum(hi, torch.add(f.narrow(axis, 0, n - k), k * k, out=s), out=hi)
        f = g.clamp_(max=_FAR)  # as numpy does (a no-op: g starts as f, at most _FAR, and only falls)
    del shifted
    if f.numel() and int(f.max()) > bound * bound:
        return None
    # torch's float32 sqrt on CPU is not always correctly rounded (AVX2: 4602 of the ints up to 30000 are
    # off by an ulp); numpy's is, so the roots come from a numpy table of the bound**2 + 1 possible values.
    roots = torch.from_numpy(np.sqrt(np.arange(bound * bound + 1, dtype=np.float32))).to(f.device)
    return torch.index_select(roots, 0, f.view(-1).to(torch.int32)).view(f.shape)


@torch.no_grad()
def path_maximum(distance: torch.Tensor, mask: torch.Tensor, /, *, radius: tuple[int, int, int]) -> torch.Tensor:
    """The largest ``distance`` each mask voxel reaches by up to ``radius`` face steps per axis inside ``mask``.

    As ``seeds.path_maximum``: a 3-wide max filter along x, then y, then z, ``radius[axis]`` times,
    masked after every step so it never looks across a membrane; -1 outside the mask.

    Args:
        distance: ``(Z, Y, X)`` floating, any device.
        mask: ``(Z, Y, X)`` bool, same device.
        radius: steps along ``(z, y, x)``, each >= 0.

    Returns:
        ``(Z, Y, X)`` of ``distance``'s dtype and device.
    """
    distance, mask = _check_volume(distance, "distance"), _check_mask(mask)
    _check_pair(distance, mask, "distance and mask")
    if not distance.is_floating_point():
        raise ValueError(f"distance must be floating, got {distance.dtype}")
    if len(radius) != 3 or any(int(r) < 0 for r in radius):
        raise ValueError(f"radius must be 3 ints >= 0 (z, y, x), got {radius!r}")
    outside = ~mask
    m = distance.masked_fill(outside, -1.0)
    g, pairs = torch.empty_like(m), torch.empty_like(m)
    for axis in (2, 1, 0):
        n = m.shape[axis]
        if n < 2:
            continue
        for _ in range(min(int(radius[axis]), n - 1)):
            t = pairs.narrow(axis, 0, n - 1)  # t[i] = max(m[i], m[i + 1])
            torch.maximum(m.narrow(axis, 0, n - 1), m.narrow(axis, 1, n - 1), out=t)
            g.narrow(axis, 0, 1).copy_(t.narrow(axis, 0, 1))
            g.narrow(axis, n - 1, 1).copy_(t.narrow(axis, n - 2, 1))
            torch.maximum(t.narrow(axis, 0, n - 2), t.narrow(axis, 1, n - 2), out=g.narrow(axis, 1, n - 2))
            g.masked_fill_(outside, -1.0)
            m, g = g, m
    return m


@torch.no_grad()
def peaks(distance: torch.Tensor, mask: torch.Tensor, /, *, radius: tuple[int, int, int]) -> torch.Tensor:
    """The seed candidates of ``seeds.find_seeds``: mask voxels at least as far as every voxel they reach.

    Args:
        distance: ``(Z, Y, X)`` floating, any device.
        mask: ``(Z, Y, X)`` bool, same device.
        radius: see :func:`path_maximum`.

    Returns:
        ``(Z, Y, X)`` bool on the same device.
    """
    return mask & (distance >= path_maximum(distance, mask, radius=radius))


def jump_pointers(pointer: torch.Tensor, what: str, /) -> None:
    """Pointer jumping, in place, until every entry points to a root (``pointer[root] == root``).

    Pointers only go down (``pointer[i] <= i``, or along a strict descent), so a forest of depth d takes
    about log2(d) + 1 jumps; more than the index width's bits means a cycle, which is a bug.
    """
    for _ in range(pointer.numel().bit_length() + 2):
        jumped = torch.index_select(pointer, 0, pointer)
        if torch.equal(jumped, pointer):
            return
        pointer.copy_(jumped)
    raise LabelConvergenceError(f"{what}: pointer jumping did not converge over {pointer.numel()} entries")


def _hook(labels: torch.Tensor, mask: torch.Tensor) -> bool:
    """Join the trees of face neighbours in ``mask`` whose labels differ; False when none differ.

    For each such pair, the larger label's entry takes the smaller label (a scatter minimum), so every
    label stays the index of a voxel of its own component and never grows.
    """
    flat = labels.view(-1)
    hooked = False
    for axis in range(3):
        n = labels.shape[axis]
        if n < 2:
            continue
        a, b = labels.narrow(axis, 0, n - 1), labels.narrow(axis, 1, n - 1)
        differ = (a != b) & mask.narrow(axis, 0, n - 1) & mask.narrow(axis, 1, n - 1)
        la, lb = a[differ], b[differ]
        if not la.numel():
            continue
        flat.scatter_reduce_(0, torch.maximum(la, lb).long(), torch.minimum(la, lb), reduce="amin")
        hooked = True
    return hooked


@torch.no_grad()
def connected_components(mask: torch.Tensor, /, *, max_rounds: int | None = None) -> torch.Tensor:
    """6-connected components of ``mask``, numbered ``1..n`` in scan order of their first voxel, as cc3d.

    Every mask voxel first points to its z-, else y-, else x- neighbour in the mask; pointer jumping
    takes each to the root of its tree. Rounds then hook differing neighbouring trees, the larger root
    under the smaller (only local minima among neighbouring roots survive a round, so a chain of trees
    at least halves), and jump again: a 2047-voxel Hilbert-curve snake takes 6 rounds, not 2047 steps of
    label propagation. At the end every voxel's label is its component's smallest flat index, and
    ranking those roots in scan order gives cc3d's numbering.

    Args:
        mask: ``(Z, Y, X)`` bool, any device.
        max_rounds: cap on hooking rounds (default: 2 * bits of the voxel count + 8).

    Returns:
        ``(Z, Y, X)`` int32 on ``mask``'s device, 0 outside the mask.

    Raises:
        LabelConvergenceError: the rounds did not converge within ``max_rounds``.
    """
    mask = _check_mask(mask)
    if max_rounds is not None and int(max_rounds) < 1:
        raise ValueError(f"max_rounds must be >= 1, got {max_rounds}")
    n = mask.numel()
    if n == 0:
        return torch.zeros(mask.shape, dtype=torch.int32, device=mask.device)
    cap = 2 * n.bit_length() + 8 if max_rounds is None else int(max_rounds)
    index = torch.arange(n, dtype=index_dtype(n), device=mask.device).view(mask.shape)
    labels = index.clone()
    for axis in (2, 1, 0):  # z- wins over y- over x-: the lowest neighbour index
        s = mask.shape[axis]
        if s < 2:
            continue
        here = labels.narrow(axis, 1, s - 1)
        joined = mask.narrow(axis, 1, s - 1) & mask.narrow(axis, 0, s - 1)
        torch.where(joined, index.narrow(axis, 0, s - 1), here, out=here)
    flat = labels.view(-1)
    for _ in range(cap):
        jump_pointers(flat, "connected_components")
        if not _hook(labels, mask):
            break
    else:
        raise LabelConvergenceError(f"connected_components: not converged after {cap} rounds on a "
                                    f"{tuple(mask.shape)} mask; pass a larger max_rounds")
    root = mask & (labels == index)
    del index
    rank = torch.cumsum(root.view(-1), 0, dtype=torch.int32)
    out = torch.index_select(rank, 0, flat).view(mask.shape)
    return out.masked_fill_(~mask, 0)


@torch.no_grad()
def descend(image: torch.Tensor, labels: torch.Tensor, /) -> tuple[torch.Tensor, torch.Tensor]:
    """Give each unlabelled voxel the label its steepest-descent path in ``image`` runs into.

    As ``flood.descend``: an unlabelled voxel points to its lowest face neighbour when that one is
    strictly lower than the best so far, trying z-, z+, y-, y+, x-, x+ in turn (the first on ties; the
    volume's edges are never lower); pointer jumping follows the paths. A path ending on a labelled
    voxel gives its label; one ending on a plateau or in a pit gives 0. Labelled voxels keep theirs.

    Args:
        image: ``(Z, Y, X)`` floating or integer, any device.
        labels: ``(Z, Y, X)`` integer, 0 = unlabelled, same device.

    Returns:
        int32 labels, and ``image`` with each unlabelled voxel's value replaced by its lowest neighbour's
        (the level at which the flood would have reached it), both ``(Z, Y, X)`` on the same device.
    """
    image, labels = _check_volume(image, "image"), _check_volume(labels, "labels")
    _check_pair(image, labels, "image and labels")
    if image.dtype == torch.bool or image.is_complex():
        raise ValueError(f"image must be real floating or integer, got {image.dtype}")
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels must be integer, got {labels.dtype}")
    n = image.numel()
    index = torch.arange(n, dtype=index_dtype(n), device=image.device).view(image.shape)
    best = image.clone()
    pointer = index.clone()
    for axis in range(3):
        s = image.shape[axis]
        if s < 2:
            continue
        for here, there in ((1, 0), (0, 1)):  # the neighbour below (z-), then above (z+)
            b, p = best.narrow(axis, here, s - 1), pointer.narrow(axis, here, s - 1)
            value = image.narrow(axis, there, s - 1)
            lower = value < b
            torch.where(lower, value, b, out=b)
            torch.where(lower, index.narrow(axis, there, s - 1), p, out=p)
            del lower
    fixed = labels != 0
    torch.where(fixed, image, best, out=best)
    torch.where(fixed, index, pointer, out=pointer)
    del index, fixed
    flat = pointer.view(-1)
    jump_pointers(flat, "descend")
    owner = torch.index_select(labels.reshape(-1), 0, flat).view(image.shape)
    return owner.to(torch.int32), best


def _pair_faces(a: torch.Tensor, b: torch.Tensor, pa: torch.Tensor, pb: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Pairs of different, non-zero ids facing each other, with the mean boundary of the two voxels."""
    touch = (a != b) & (a > 0) & (b > 0)
    u, v = a[touch].long(), b[touch].long()
    value = (pa[touch].double() + pb[touch].double()) * 0.5
    return torch.minimum(u, v), torch.maximum(u, v), value


@torch.no_grad()
def faces(core: torch.Tensor, boundary: torch.Tensor, /, *, axes: tuple[int, ...] = (0, 1, 2)
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The region adjacency faces inside a labelled piece, one row per touching pair, as ``EdgeTable.add_piece``
    (``axes=(0,)`` on two planes: as ``EdgeTable.add_between``).

    Every face between two face-neighbouring voxels of different non-zero ids along ``axes`` counts once,
    with the mean of the two voxels' boundary values (in float64). Rows are sorted by ``(u, v)``.

    Args:
        core: ``(Z, Y, X)`` integer ids ``0..2**32 - 1`` (0 = none), any device.
        boundary: ``(Z, Y, X)`` floating boundary probability, same device.
        axes: the axes whose faces count.

    Returns:
        ``u < v`` (int64), the sum of their face values (float64) and the number of faces (int64), each
        ``(pairs,)`` on the same device.
    """
    core, boundary = _check_volume(core, "core"), _check_volume(boundary, "boundary")
    _check_pair(core, boundary, "core and boundary")
    if core.dtype == torch.bool or core.is_floating_point() or core.is_complex():
        raise ValueError(f"core must be integer ids, got {core.dtype}")
    if core.dtype not in (torch.int32, torch.int64):
        core = core.long()  # comparisons on narrow and unsigned ids: not every device has their kernels
    parts = []
    for axis in axes:
        n = core.shape[axis]
        if n < 2:
            continue
        lo, hi = core.narrow(axis, 0, n - 1), core.narrow(axis, 1, n - 1)
        parts.append(_pair_faces(lo, hi, boundary.narrow(axis, 0, n - 1), boundary.narrow(axis, 1, n - 1)))
    if not parts:
        empty = torch.zeros(0, dtype=torch.int64, device=core.device)
        return empty, empty.clone(), torch.zeros(0, dtype=torch.float64, device=core.device), empty.clone()
    u, v, value = (torch.cat(column) for column in zip(*parts))
    if u.numel() and int(v.max()) >= 2**32:
        raise ValueError(f"core ids must be below 2**32 (as EdgeTable keys them), got {int(v.max())}")
    key = (u - 2**31) * 2**32 + v  # (u, v) order in signed int64 for any ids below 2**32, no overflow
    uniq, inverse = torch.unique(key, sorted=True, return_inverse=True)
    sums = torch.zeros(uniq.numel(), dtype=torch.float64, device=core.device).index_add_(0, inverse, value)
    counts = torch.bincount(inverse, minlength=uniq.numel())
    high = torch.div(uniq, 2**32, rounding_mode="floor")
    return high + 2**31, uniq - high * 2**32, sums, counts


def run_on(device: torch.device | None, step: Callable[..., tuple[torch.Tensor, ...]], /,
           *arrays: np.ndarray | torch.Tensor) -> tuple[np.ndarray, ...]:
    """``step`` (one of the functions above) on ``device`` (the CPU when None) with ``arrays`` as tensors
    there (a tensor already there stays); its tensors come back as host arrays. A GPU out of memory (the
    network may hold most of it) runs the step on the CPU instead, with a warning."""
    tensors = [a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]
    if device is not None and device.type != "cpu":
        try:
            return tuple(t.cpu().numpy() for t in step(*(t.to(device) for t in tensors)))
        except torch.cuda.OutOfMemoryError:
            logger.warning("labelling: %s out of memory for %s over %d voxels; running it on the CPU",
                           device, getattr(step, "__name__", "a step"), tensors[0].numel())
    return tuple(t.numpy() for t in step(*(t.cpu() for t in tensors)))
