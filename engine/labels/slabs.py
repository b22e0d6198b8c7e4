"""Labelling a probability map slab by slab, with cells that cross slab borders stitched to one id.

:class:`SlabLabeler` takes the probability planes in z order and labels z-slabs ("cores") of ``depth``
planes as soon as the planes they need have arrived. Provisional ids are global from the start (a union-find
joins ids that turn out to be one cell); sizes are counted per id, so ``label_threshd`` and the final
consecutive numbering apply to whole cells at the end (:meth:`SlabLabeler.finish`).

Exactness, method by method:

- ``components``: exact. Each core is labelled on its own; ids of touching voxels on the two sides of a
  border are joined (the same face connectivity as ``scipy.ndimage.label``). The result equals
  :func:`label_cells` (the one-core case) on the whole volume up to a permutation of ids, for any depth.
- ``watershed``: seeds and flooding are not local (a distance-transform maximum depends on the nearest
  background, a flood on the whole basin), so each core is processed inside a window of ``halo`` extra
  planes on both sides (and, when planes are too wide for the memory budget, in xy tiles, each inside a
  window as far around it in y and x: the same rules below hold for tiles as for cores). Seeds found in
  a core are registered with global ids; the next window reuses them in its lower halo instead of
  recomputing them, and links the seeds it finds where the previous window saw seeds in its upper halo
  that flooded into the core (a cell crossing a border keeps its seed's id on both sides). The result equals the whole-volume watershed up to a permutation of ids when
  every distance maximum, seed-spacing decision and flood involved in a core lies within its window --
  in practice when the halo exceeds the cells' extent in z and ``min_dist`` -- and the flood meets no
  ties. Ties are common (saturated 0.0/1.0 boundary probabilities; distances, the square roots of
  integers, for foreground models), and skimage breaks them by the order of its priority queue over the
  whole window, so a voxel two cells reach at the same level can go to the other neighbour: the tests
  measure the same cells and at most 0.1% of the voxels assigned differently. None of this is
  guaranteed in general: an upper-halo seed that flooded into a core but that the next window does not
  confirm is counted in :attr:`SlabLabeler.orphan_seeds`, a sign that the halo is too small (zero
  orphans does not prove exactness). With one core spanning the whole volume the result is exactly
  ``label_cells``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import cc3d
import numpy as np
import torch
from numpy.typing import NDArray

from ..bundle import OutputSpec, PostprocessSpec
from .device import connected_components, faces, run_on
from .distance import available_cores
from .graph import EdgeTable, agglomerate
from .seeds import interior_mask
from .stores import FileLabelStore, MemoryLabelStore
from .union_find import UnionFind
from .window import open_window

__all__ = ["FileLabelStore", "FinalLabels", "MemoryLabelStore", "SlabLabeler", "label_cells"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinalLabels:
    """Provisional id -> final id (``0`` for dropped cells and background), and the number of cells."""

    lut: NDArray[np.uint32]
    n_cells: int


@dataclass(frozen=True)
class _Block:
    """The part of a core one window labels, ``[c0, c1) x [y0, y1) x [x0, x1)``; ``origin`` is the window's
    first voxel. Blocks are labelled in z, then y, then x order."""

    c0: int
    c1: int
    y0: int
    y1: int
    x0: int
    x1: int
    origin: NDArray[np.int64]

    def contains(self, at: NDArray[np.integer]) -> NDArray[np.bool_]:
        z, y, x = at.T
        return (z >= self.c0) & (z < self.c1) & (y >= self.y0) & (y < self.y1) & (x >= self.x0) & (x < self.x1)

    def done(self, at: NDArray[np.integer]) -> NDArray[np.bool_]:
        """Which of the points ``(n, 3)`` lie in blocks labelled before this one."""
        z, y, x = at.T
        return (z < self.c0) | ((z < self.c1) & ((y < self.y0) | ((y < self.y1) & (x < self.x0))))

    def in_window(self, at: NDArray[np.integer], shape: tuple[int, ...]) -> NDArray[np.bool_]:
        local = at - self.origin
        return np.all((local >= 0) & (local < np.asarray(shape)), axis=1)

    def local(self) -> tuple[slice, slice, slice]:
        """The block's slices in its window."""
        oz, oy, ox = self.origin.tolist()
        return slice(self.c0 - oz, self.c1 - oz), slice(self.y0 - oy, self.y1 - oy), slice(self.x0 - ox, self.x1 - ox)


class SlabLabeler:
    """Label a probability map that arrives in z order, core by core (see the module docstring).

    Args:
        shape: ``(Z, Y, X)``.
        output: what the probability channels mean.
        spec: post-processing method and parameters.
        sampling: relative voxel size ``(z, y, x)`` for the distance transform, or None.
        depth: planes per core (at most, with ``ends``).
        ends: where each core ends (increasing, the last at ``shape[0]``; :meth:`engine.tiling.SlabGrid.core_ends`);
            None: every ``depth`` planes.
        halo: extra planes on each side of a core for the watershed (ignored for ``components``); in y and x
            the windows reach as far in the sampling's units.
        tile: the watershed labels a core in xy tiles of this side, each inside a window of the halo around
            it (None: whole planes), so a window's size stays bounded however wide the planes are.
        store: where the provisional labels of finished cores go (``write(z0, core)``).
        threads: threads inside a window (distance transform, the multi-seed split, the background beside
            the flood, the region graph's faces; None: every core). An attribute: the streamed pipeline sets
            it to 1 while the network runs on the CPU. The labels are the same for any number.
        device: the backend's device (None: the CPU); on a GPU each window's array steps
            (:class:`.window.DeviceWindow`) and the region graph's faces run there. Planes pushed as tensors
            are labelled on their own device whatever this says (a GPU run pushes them so: :meth:`push`).
        open_background: clear the opening of wide background regions (:func:`.distance.clear_background`);
            False: only their far voxels (a raw membrane image used as the boundary map, where wide
            not-interior regions are bright membranes rather than background).
    """

    def __init__(
        self,
        shape: tuple[int, int, int],
        /,
        *,
        output: OutputSpec,
        spec: PostprocessSpec,
        sampling: Sequence[float] | None,
        depth: int,
        halo: int,
        store: MemoryLabelStore | FileLabelStore,
        ends: Sequence[int] | None = None,
        tile: int | None = None,
        threads: int | None = None,
        device: torch.device | None = None,
        open_background: bool = True,
    ) -> None:
        self.shape, self.output, self.spec, self.sampling = shape, output, spec, sampling
        self.threads = threads
        self.device, self.open_background = device, open_background
        self.depth = max(1, int(depth))
        self.ends = tuple(ends) if ends else tuple(min(shape[0], k) for k in range(self.depth, shape[0] + self.depth, self.depth))
        if self.ends[-1] != shape[0] or any(b <= a for a, b in zip((0, *self.ends), self.ends)):
            raise ValueError(f"core ends must increase to {shape[0]}, got {self.ends}")
        self.halo = 0 if spec.method == "components" else max(0, int(halo))
        z_over_xy = float(sampling[0]) / min(float(sampling[1]), float(sampling[2])) if sampling is not None else 1.0
        self.halo_xy = math.ceil(self.halo * max(1.0, z_over_xy))
        self.tile = None if tile is None or tile >= max(shape[1:]) else max(1, int(tile))
        self.store = store
        self.ids = UnionFind()
        self.sizes = np.zeros(1024, dtype=np.int64)
        self.orphan_seeds = 0
        self.merged_regions = 0
        self.cores_done = 0
        self._chunks: list[tuple[int, NDArray[np.float32]]] = []
        self._received = 0
        self._last_plane: NDArray[np.int64] | None = None  # components: ids of the previous core's last plane
        self._registry = np.zeros((4, 0), dtype=np.int64)  # watershed: z, y, x, id of registered seed voxels
        self._pending = np.zeros((4, 0), dtype=np.int64)  # watershed: seed voxels seen in an upper halo
        merging = spec.method == "watershed" and spec.merge_threshold is not None and output.kind == "boundary"
        self.edges = EdgeTable() if merging else None  # region graph for the agglomeration at finish()
        self._edge_plane: tuple[NDArray[np.uint32], NDArray[np.float32]] | None = None

    @property
    def n_cores(self) -> int:
        return len(self.ends)

    def _core(self, k: int) -> tuple[int, int]:
        return (self.ends[k - 1] if k else 0), self.ends[k]

    def push(self, z0: int, probs: NDArray[np.float32] | torch.Tensor, /) -> int:
        """Add planes ``[z0, z0 + n)`` of the ``(K, n, Y, X)`` probabilities; label every core now complete.

        A tensor stays on its device, and the windows and faces of its planes are computed there (a GPU
        run's probabilities never come to the host whole: :mod:`.window`).

        Returns:
            Voxels labelled by this call (finished cores).
        """
        if z0 != self._received:
            raise ValueError(f"planes must arrive in order: expected z0={self._received}, got {z0}")
        channel = probs[self.output.channel]
        if isinstance(channel, torch.Tensor):
            self._chunks.append((z0, channel.to(torch.float32).contiguous()))
        else:
            self._chunks.append((z0, np.ascontiguousarray(channel, dtype=np.float32)))
        self._received = z0 + probs.shape[1]
        done = 0
        while self.cores_done < self.n_cores:
            c0, c1 = self._core(self.cores_done)
            if min(self.shape[0], c1 + self.halo) > self._received:
                break
            self._label_core(c0, c1)
            self.cores_done += 1
            done += (c1 - c0) * self.shape[1] * self.shape[2]
            self._drop_planes_below(c1 - self.halo)
        return done

    def _planes(self, a: int, b: int, ys: slice = slice(None), xs: slice = slice(None)) -> NDArray[np.float32] | torch.Tensor:
        """Planes ``[a, b)`` of the boundary channel, rows ``ys`` and columns ``xs``, cut from the chunks that
        hold them (a view when one chunk holds them all; a window of a tile is never copied as whole planes)."""
        parts = [chunk[max(a, z) - z : b - z, ys, xs] for z, chunk in self._chunks if z < b and z + len(chunk) > a]
        if len(parts) == 1:
            return parts[0]
        if not isinstance(parts[0], torch.Tensor):
            return np.concatenate(parts)
        try:
            return torch.cat(parts)
        except torch.cuda.OutOfMemoryError:  # this window on the host (open_window sends it back up if it can)
            logger.warning("labelling: %s out of memory joining planes %d-%d; taking them to the host", parts[0].device, a, b)
            return np.concatenate([p.cpu().numpy() for p in parts])

    def _drop_planes_below(self, z: int) -> None:
        self._chunks = [(z0, c) for z0, c in self._chunks if z0 + len(c) > z]

    def _label_core(self, c0: int, c1: int) -> None:
        if self.spec.method == "components":
            core = self._components(c0, c1)
        else:
            core = self._watershed(c0, c1)
        counts = np.bincount(core.ravel(), minlength=len(self.ids))
        if len(counts) > len(self.sizes):
            grown = np.zeros(max(len(counts), 2 * len(self.sizes)), dtype=np.int64)
            grown[: len(self.sizes)] = self.sizes
            self.sizes = grown
        self.sizes[: len(counts)] += counts
        self.store.write(c0, core)

    def _components(self, c0: int, c1: int) -> NDArray[np.uint32]:
        mask = interior_mask(self._planes(c0, c1), self.output.kind, self.spec.threshold)
        if isinstance(mask, torch.Tensor):  # the same numbering as cc3d's, where the planes lie
            labels = connected_components(mask).cpu().numpy()
        else:
            labels = cc3d.connected_components(mask, connectivity=6)
        del mask
        n = int(labels.max())
        lut = np.concatenate([[0], self.ids.add(n)]).astype(np.uint32)  # ids < 2**32 (UnionFind checks)
        core = lut[labels]
        del labels
        if self._last_plane is not None:
            both = (self._last_plane > 0) & (core[0] > 0)
            pairs = np.unique(np.stack([self._last_plane[both], core[0][both]]), axis=1)
            self.ids.union(pairs[0], pairs[1])
        self._last_plane = core[-1].astype(np.int64)
        return core

    def _tiles(self) -> list[tuple[int, int, int, int]]:
        """The core's xy tiles ``(y0, y1, x0, x1)`` in raster order (one tile: the whole plane)."""
        _, ny, nx = self.shape
        t = self.tile or max(ny, nx)
        return [(y0, min(ny, y0 + t), x0, min(nx, x0 + t)) for y0 in range(0, ny, t) for x0 in range(0, nx, t)]

    def _watershed(self, c0: int, c1: int) -> NDArray[np.uint32]:
        w0, w1 = max(0, c0 - self.halo), min(self.shape[0], c1 + self.halo)
        core = np.zeros((c1 - c0, *self.shape[1:]), dtype=np.uint32)
        h = self.halo_xy
        for y0, y1, x0, x1 in self._tiles():
            wy0, wx0 = max(0, y0 - h), max(0, x0 - h)
            window = _contiguous(self._planes(w0, w1, slice(wy0, y1 + h), slice(wx0, x1 + h)))
            block = _Block(c0, c1, y0, y1, x0, x1, origin=np.array([w0, wy0, wx0], dtype=np.int64))
            core[:, y0:y1, x0:x1] = self._watershed_block(window, block)
        self._registry = self._registry[:, self._registry[0] >= c1 - self.halo]
        if self.edges is not None:
            self._add_edges(self.edges, core, c0)
        return core

    def _watershed_block(self, image: NDArray[np.float32], block: _Block) -> NDArray[np.uint32]:
        """Label one block from its window: seeds in blocks done before are the registered ones (one
        window over the whole volume: ``label_cells`` exactly); seeds found elsewhere get ids now and are
        confirmed, or counted as orphans, when their own block is labelled."""
        window, peaks = open_window(image, kind=self.output.kind, threshold=self.spec.threshold, sampling=self.sampling,
                                    threads=self.threads or available_cores(), device=self.device,
                                    min_dist=max(1, int(self.spec.min_dist)))
        peaks = peaks[~block.done(peaks + block.origin)]  # where blocks are done, their registered seeds stand
        inside = block.in_window(self._registry[:3].T, image.shape)
        registry = self._registry[:, inside]
        local = registry[:3].T - block.origin
        at = window.place(np.concatenate([peaks, local]))
        lut = self._marker_ids(window.n_markers, registry[3], window.markers_at(local))
        self._link_pending(window.markers_at, lut, block)
        ids = lut[window.markers_at(at)]
        flooded = window.flood(boundary=self.output.kind == "boundary", open_background=self.open_background,
                               needed=block.local())
        del window
        in_block = flooded[block.local()]
        labels = lut.astype(np.uint32)[in_block]
        at += block.origin
        mine = block.contains(at)
        self._registry = np.concatenate([self._registry, np.vstack([at[mine].T, ids[mine]])], axis=1)
        # Seeds of blocks not yet done matter only where they flooded into this one; their blocks confirm them.
        present = lut[np.flatnonzero(np.bincount(in_block.ravel(), minlength=len(lut)))]  # ids in the block
        later = ~mine & ~block.done(at) & np.isin(ids, present)
        self._pending = np.concatenate([self._pending, np.vstack([at[later].T, ids[later]])], axis=1)
        return labels

    def _add_edges(self, edges: EdgeTable, core: NDArray[np.uint32], c0: int, /, *, planes: int = 16) -> None:
        """The faces of the core starting at plane ``c0``, and those to the plane before it, into the region
        graph, ``planes`` planes at a time (their boundary planes cut from the chunks, never the whole core's);
        where the planes lie when they are tensors, else on the backend's GPU when there is one (numpy is as
        fast on a CPU)."""
        for a in range(0, len(core), planes):
            labels, boundary = core[a : a + planes], self._planes(c0 + a, c0 + min(len(core), a + planes))
            on = boundary.device if isinstance(boundary, torch.Tensor) else self.device
            if isinstance(boundary, torch.Tensor) or (on is not None and on.type != "cpu"):
                boundary = torch.as_tensor(boundary)
                edges.add_faces(*run_on(on, faces, labels, boundary))
                if self._edge_plane is not None:
                    below, below_p = self._edge_plane
                    between = partial(faces, axes=(0,))
                    edges.add_faces(*run_on(on, between, np.stack([below, labels[0]]), torch.stack([below_p, boundary[0]])))
            else:
                edges.add_piece(labels, boundary, threads=self.threads or available_cores())
                if self._edge_plane is not None:
                    edges.add_between(self._edge_plane[0], self._edge_plane[1], labels[0], boundary[0])
            self._edge_plane = (labels[-1].copy(), boundary[-1].clone() if isinstance(boundary, torch.Tensor) else boundary[-1].copy())

    def _merge_regions(self, edges: EdgeTable, threshold: float) -> None:
        """Average-linkage agglomeration over the whole volume's region graph (ids joined across cores)."""
        roots = self.ids.roots()
        sizes = np.bincount(roots, weights=self.sizes[: len(roots)].astype(np.float64), minlength=len(roots))
        graph = edges.remapped(lambda ids: roots[ids])
        merges = agglomerate(graph, sizes, threshold=threshold, min_size=self.spec.merge_min_size)
        self.merged_regions = len(merges)
        if merges:
            pairs = np.array(merges, dtype=np.int64)
            self.ids.union(pairs[:, 0], pairs[:, 1])

    def _marker_ids(self, n: int, registered: NDArray[np.int64], at: NDArray[np.int32]) -> NDArray[np.int64]:
        """Global id of each window marker: the registered id it contains (``registered[i]`` lies in marker
        ``at[i]``), else a new one (in marker order)."""
        lut = np.zeros(n + 1, dtype=np.int64)
        if len(registered):
            lut[at] = registered
            self.ids.union(registered, lut[at])  # one marker holding several registered ids: one cell
        fresh = np.flatnonzero(lut[1:] == 0) + 1
        lut[fresh] = self.ids.add(len(fresh))
        return lut

    def _link_pending(self, markers_at: Callable[[NDArray[np.int64]], NDArray[np.int32]], lut: NDArray[np.int64], block: _Block) -> None:
        """Join the seeds earlier windows saw in this block with the markers found here."""
        here = block.contains(self._pending[:3].T)
        pending, self._pending = self._pending[:, here], self._pending[:, ~here]
        if not pending.shape[1]:
            return
        local = markers_at(pending[:3].T - block.origin)
        hit = local > 0
        self.ids.union(pending[3][hit], lut[local[hit]])
        self.orphan_seeds += len(np.setdiff1d(np.unique(pending[3]), pending[3][hit]))

    def finish(self) -> FinalLabels:
        """Join, drop cells under ``label_threshd`` voxels, number the rest ``1..n``.

        Raises:
            ValueError: not every plane was pushed.
        """
        if self.cores_done < self.n_cores:
            raise ValueError(f"only {self._received} of {self.shape[0]} planes arrived")
        if self.edges is not None and self.spec.merge_threshold is not None:
            self._merge_regions(self.edges, self.spec.merge_threshold)
        roots = self.ids.roots()
        sizes = np.bincount(roots, weights=self.sizes[: len(roots)].astype(np.float64), minlength=len(roots))
        keep = sizes >= max(1, self.spec.label_threshd)
        keep[0] = False
        final_of_root = (np.cumsum(keep) * keep).astype(np.uint32)
        return FinalLabels(lut=final_of_root[roots], n_cells=int(keep.sum()))


def _contiguous(planes: NDArray[np.float32] | torch.Tensor) -> NDArray[np.float32] | torch.Tensor:
    """Host or device planes, contiguous (a copy only when they are not)."""
    return planes.contiguous() if isinstance(planes, torch.Tensor) else np.ascontiguousarray(planes)


def label_cells(
    probs: NDArray[np.float32] | torch.Tensor,
    /,
    *,
    output: OutputSpec,
    spec: PostprocessSpec,
    sampling: Sequence[float] | None = None,
    threads: int | None = None,
    device: torch.device | None = None,
    open_background: bool = True,
) -> NDArray[np.uint32]:
    """Label cells in a whole probability map: the one-core case of :class:`SlabLabeler`.

    Args:
        probs: ``(K, Z, Y, X)`` float32 network output on the host, or a tensor (labelled on its device).
        output: what the channels mean.
        spec: method, threshold, min_dist, label_threshd, merging.
        sampling: voxel size ``(z, y, x)`` in the units of ``spec.min_dist`` (the model's voxels, see
            :mod:`engine.scale`); isotropic voxels when None.
        threads: threads for the distance transform (None: every core this process may use).
        device, open_background: as for :class:`SlabLabeler`.

    Returns:
        ``(Z, Y, X)`` uint32 labels, 0 = background, cells 1..n.
    """
    shape = (int(probs.shape[1]), int(probs.shape[2]), int(probs.shape[3]))
    store = MemoryLabelStore(shape)
    labeler = SlabLabeler(shape, output=output, spec=spec, sampling=sampling, depth=shape[0], halo=0, store=store, threads=threads,
                          device=device, open_background=open_background)
    labeler.push(0, probs)
    final = labeler.finish()
    for _ in store.relabel(final.lut, chunk=shape[0]):
        pass
    return store.result()
