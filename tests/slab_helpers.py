"""Helpers for the streaming tests: a cheap deterministic backend, label comparison, probability volumes."""

from __future__ import annotations

import threading
import time
from typing import ClassVar

import numpy as np
import torch
from scipy import ndimage

from engine.backends import Backend, BackendOptions
from engine.bundle import Bundle
from engine.synthetic import make_membrane_volume, make_nuclei_volume

__all__ = ["ImageBackend", "same_up_to_permutation", "differing_fraction", "membrane_probs", "nuclei_probs"]


class ImageBackend(Backend):
    """A trivially cheap, deterministic "network": boundary probability = a sigmoid of the normalized image.

    On a membrane-stained image that is a fair membrane map, so the watershed finds real cells; every
    patch of a voxel gives the same value, so slabbing cannot change the blend.

    Args:
        oom_once: the first call with more than one patch raises ``torch.cuda.OutOfMemoryError``.
        fail_after: raise ``RuntimeError`` on this call (1-based), to test failure handling.
        delay: seconds each call sleeps (to test that stages overlap).
    """

    name: ClassVar[str] = "image-test"
    precisions: ClassVar[tuple[str, ...]] = ("fp32",)

    def __init__(
        self, bundle: Bundle, /, *, oom_once: bool = False, fail_after: int | None = None, delay: float = 0.0
    ) -> None:
        super().__init__(bundle, options=BackendOptions(precision="fp32"))
        self.oom_once, self.fail_after, self.delay = oom_once, fail_after, delay
        self.batches: list[int] = []
        self.threads: set[int] = set()

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return None

    def forward(self, batch: torch.Tensor, /) -> torch.Tensor:
        self.batches.append(batch.shape[0])
        self.threads.add(threading.get_ident())
        if self.fail_after is not None and len(self.batches) >= self.fail_after:
            raise RuntimeError("backend exploded")
        if self.oom_once and batch.shape[0] > 1:
            self.oom_once = False
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        if self.delay:
            time.sleep(self.delay)
        p = torch.sigmoid(8.0 * (batch[:, :1] - 0.35))
        return torch.cat([p, 1.0 - p], dim=1)


def same_up_to_permutation(a: np.ndarray, b: np.ndarray) -> bool:
    """True when ``b`` is ``a`` with its ids renamed one-to-one (0 stays 0)."""
    if a.shape != b.shape:
        return False
    pairs = np.unique(np.stack([np.asarray(a).ravel().astype(np.int64), np.asarray(b).ravel().astype(np.int64)]), axis=1)
    one_to_one = len(np.unique(pairs[0])) == pairs.shape[1] == len(np.unique(pairs[1]))
    background_kept = all((x == 0) == (y == 0) for x, y in pairs.T)
    return bool(one_to_one and background_kept)


def differing_fraction(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of voxels outside a greedy one-to-one matching of the ids of ``a`` and ``b`` (0: identical)."""
    pairs, counts = np.unique(np.stack([np.asarray(a).ravel(), np.asarray(b).ravel()]), axis=1, return_counts=True)
    used_a, used_b, matched = set(), set(), 0
    for i in np.argsort(-counts):
        x, y = int(pairs[0, i]), int(pairs[1, i])
        if x not in used_a and y not in used_b:
            used_a.add(x)
            used_b.add(y)
            matched += int(counts[i])
    return 1.0 - matched / a.size


def membrane_probs(shape: tuple[int, int, int], seed: int, *, ties: bool = False) -> np.ndarray:
    """``(2, Z, Y, X)`` float32: a blurred boundary map of synthetic space-filling cells, and its complement.

    ``ties=False``: a sigmoid of the map plus a little noise, so no two voxels share a value. ``ties=True``:
    the map clipped to [0, 1], so about a quarter of the voxels (the membranes) are exactly 1.0, like a
    saturated network output.
    """
    labels = make_membrane_volume(shape, seed=seed).labels
    edges = np.zeros(shape, dtype=bool)
    for axis in range(3):
        cut = [slice(None)] * 3
        cut[axis] = slice(1, None)
        edges[tuple(cut)] |= np.diff(labels, axis=axis) != 0
    rng = np.random.default_rng(seed)
    raw = ndimage.gaussian_filter(edges.astype(np.float32), 1.0) * 2.5 + rng.normal(0.0, 0.05, shape)
    if ties:
        boundary = np.clip(raw, 0, 1)
    else:
        boundary = 1.0 / (1.0 + np.exp(-6.0 * (raw - 0.5))) + rng.uniform(0, 1e-4, shape)
    boundary = boundary.astype(np.float32)
    return np.stack([boundary, 1.0 - boundary])


def nuclei_probs(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """``(1, Z, Y, X)`` float32: a blurred foreground map of synthetic nuclei (touching ones included)."""
    labels = make_nuclei_volume(shape, seed=seed).labels
    return ndimage.gaussian_filter((labels > 0).astype(np.float32), 1.0)[np.newaxis].astype(np.float32)
