"""The seeded flood as whole-array steps, for the device that ran the network.

The host floods with skimage's priority queue, one voxel at a time. Here, in three whole-array passes
(torch ops, so a GPU runs them without the probabilities leaving it):

1. the flood level of every voxel of the region: the lowest, over paths from any seed, of the highest
   ``image`` value on the path (the level at which a rising flood first reaches it, the priority flood's own
   criterion), by synchronous updates from the six face neighbours until nothing changes;
2. in each zone of one level, the steps from where the flood enters it (a seed, or a neighbour of a lower
   level through which the voxel is reached at its own level), by the same updates;
3. each voxel's parent: among the neighbours that reach it at its level, the one of the lowest level, then
   the fewest steps, then the first in z-, z+, y-, y+, x-, x+ order; pointer jumping takes every voxel to
   its seed.

Every voxel gets a seed that reaches it at its lowest level, along a path of its own label, as on the host.
Where several seeds tie, the host's queue order decides and here the rule above, which follows the flood
down into the basin a voxel drains into (as :func:`engine.labels.device.descend`). Only comparisons and
``max`` touch the values, so every device gives the same labels for the same inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from .device import LabelConvergenceError, index_dtype, jump_pointers
from .flood import TIE_BREAK

__all__ = ["flood_rest", "flood_within", "rim_of"]

_FAR = 2**31 - 1  # steps of a voxel not yet reached in its zone


def _shifts(shape: torch.Size) -> Iterator[tuple[int, int, int, int]]:
    """Each face direction as ``(axis, here, there, n)``: ``narrow(axis, here, n)`` views the voxels whose
    neighbour ``narrow(axis, there, n)`` views, in z-, z+, y-, y+, x-, x+ order."""
    for axis in range(3):
        n = shape[axis] - 1
        if n > 0:
            yield axis, 1, 0, n
            yield axis, 0, 1, n


@torch.no_grad()
def flood_within(image: torch.Tensor, seeds: torch.Tensor, region: torch.Tensor, /, *,
                 max_rounds: int | None = None) -> torch.Tensor:
    """Flood ``image`` (lowest first) from ``seeds`` inside ``region`` (see the module docstring).

    Args:
        image: ``(Z, Y, X)`` real values, any device.
        seeds: ``(Z, Y, X)`` integer ids, 0 = none; seeds outside ``region`` are ignored.
        region: ``(Z, Y, X)`` bool: where the flood may go.
        max_rounds: cap on the rounds of each pass (default: the voxel count).

    Returns:
        int32 seed ids on the region's voxels a seed reaches, 0 elsewhere (what
        ``skimage.segmentation.watershed(image, seeds, mask=region)`` gives, ties aside).

    Raises:
        LabelConvergenceError: a pass did not settle within ``max_rounds``.
    """
    if not (image.shape == seeds.shape == region.shape) or image.ndim != 3:
        raise ValueError(f"image, seeds and region must be one (Z, Y, X) shape, got {tuple(image.shape)}, "
                         f"{tuple(seeds.shape)}, {tuple(region.shape)}")
    if region.dtype != torch.bool or not image.is_floating_point():
        raise ValueError(f"region must be bool and image floating, got {region.dtype} and {image.dtype}")
    cap = max(1, image.numel()) if max_rounds is None else int(max_rounds)
    labels = torch.where(region, seeds, torch.zeros((), dtype=seeds.dtype, device=seeds.device)).to(torch.int32)
    seeded = labels > 0
    level = torch.where(seeded, image, torch.full((), float("inf"), dtype=image.dtype, device=image.device))
    _settle(lambda: _lower_levels(image, region, level), cap, "levels")
    steps = torch.where(seeded | _entries(image, level), 0, _FAR).to(torch.int32)
    _settle(lambda: _fewer_steps(level, steps), cap, "steps")
    pointer = _parents(image, level, steps, seeded)
    jump_pointers(pointer.view(-1), "flood_within")
    return torch.index_select(labels.view(-1), 0, pointer.view(-1)).view(labels.shape)


def _settle(step: Callable[[], bool], cap: int, what: str) -> None:
    for _ in range(cap):
        if not step():
            return
    raise LabelConvergenceError(f"flood_within: the {what} did not settle after {cap} rounds")


def _lower_levels(image: torch.Tensor, region: torch.Tensor, level: torch.Tensor) -> bool:
    """One round of pass 1, in place; True when a level fell."""
    changed = torch.zeros((), dtype=torch.bool, device=level.device)
    for axis, here, there, n in _shifts(level.shape):
        mine = level.narrow(axis, here, n)
        reach = torch.maximum(level.narrow(axis, there, n), image.narrow(axis, here, n))
        lower = (reach < mine) & region.narrow(axis, here, n)
        torch.where(lower, reach, mine, out=mine)
        changed |= lower.any()
    return bool(changed)


def _entries(image: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """Voxels reached at their level through a neighbour of a lower level."""
    entry = torch.zeros(level.shape, dtype=torch.bool, device=level.device)
    for axis, here, there, n in _shifts(level.shape):
        mine, theirs = level.narrow(axis, here, n), level.narrow(axis, there, n)
        entry.narrow(axis, here, n).logical_or_((theirs < mine) & (torch.maximum(theirs, image.narrow(axis, here, n)) == mine))
    return entry


def _fewer_steps(level: torch.Tensor, steps: torch.Tensor) -> bool:
    """One round of pass 2, in place (steps from a neighbour of the same, finite level); True when any fell."""
    changed = torch.zeros((), dtype=torch.bool, device=steps.device)
    for axis, here, there, n in _shifts(level.shape):
        mine, theirs = steps.narrow(axis, here, n), steps.narrow(axis, there, n)
        same = (level.narrow(axis, here, n) == level.narrow(axis, there, n)) & (theirs < _FAR)
        fewer = same & (theirs + 1 < mine)
        torch.where(fewer, theirs + 1, mine, out=mine)
        changed |= fewer.any()
    return bool(changed)


def _parents(image: torch.Tensor, level: torch.Tensor, steps: torch.Tensor, seeded: torch.Tensor) -> torch.Tensor:
    """Pass 3: each reached voxel's parent index (seeds and unreached voxels their own)."""
    index = torch.arange(level.numel(), dtype=index_dtype(level.numel()), device=level.device).view(level.shape)
    pointer, best_level, best_steps = index.clone(), torch.full_like(level, float("inf")), torch.full_like(steps, _FAR)
    for axis, here, there, n in _shifts(level.shape):
        mine, theirs, their_steps = level.narrow(axis, here, n), level.narrow(axis, there, n), steps.narrow(axis, there, n)
        reaches = (torch.maximum(theirs, image.narrow(axis, here, n)) == mine) & torch.isfinite(mine)
        reaches &= (theirs < mine) | (their_steps < steps.narrow(axis, here, n))
        bl, bs = best_level.narrow(axis, here, n), best_steps.narrow(axis, here, n)
        better = reaches & ~seeded.narrow(axis, here, n) & ((theirs < bl) | ((theirs == bl) & (their_steps < bs)))
        torch.where(better, theirs, bl, out=bl)
        torch.where(better, their_steps, bs, out=bs)
        p = pointer.narrow(axis, here, n)
        torch.where(better, index.narrow(axis, there, n), p, out=p)
    return pointer


@torch.no_grad()
def rim_of(region: torch.Tensor, /) -> torch.Tensor:
    """The voxels outside ``region`` with a face neighbour in it (as :func:`engine.labels.flood.rim`)."""
    grown = region.clone()
    for axis, here, there, n in _shifts(region.shape):
        grown.narrow(axis, here, n).logical_or_(region.narrow(axis, there, n))
    return grown & ~region


@torch.no_grad()
def flood_rest(image: torch.Tensor, resolved: torch.Tensor, descended: torch.Tensor, reached: torch.Tensor) -> torch.Tensor:
    """:func:`engine.labels.flood.flood_plateaus` in its box, as tensors: the voxels ``descended`` left 0
    flooded from their labelled rim with the same priorities (a rim voxel the full flood reached later,
    ``resolved`` 0 there, goes after one of its value reached earlier), by :func:`flood_within`."""
    rest = descended == 0
    edge = rim_of(rest)
    late = edge & (resolved == 0)
    priority = image.to(torch.float64)
    priority = torch.where(late, priority - (TIE_BREAK * (2.0 - reached)).to(torch.float64), priority)
    flooded = flood_within(priority, torch.where(edge, descended, torch.zeros_like(descended)), rest | edge)
    return torch.where(rest, flooded, descended)
