"""The seeded watershed of one labelling window, its volume steps on the host or on the network's device.

:class:`SlabLabeler <engine.labels.slabs.SlabLabeler>` decides which seeds a window floods from (its own
distance maxima outside the blocks labelled before, and the registered seeds of those blocks); a window
does the voxel work around that choice: interior mask, distance transform, components, maxima, markers,
the flood and the background. :class:`HostWindow` runs it with numpy, cc3d, edt and skimage;
:class:`DeviceWindow` runs the array steps as torch ops (:mod:`engine.labels.device`) where the network
ran, and gives the same labels (the tests compare them on the CPU). On a GPU its two floods (the split of
the interior components that hold several seeds, 14-17% of a window's voxels on the default model's
output, and the flood of plateaus) run there too (:mod:`engine.labels.device_flood`: the host's labels
where nothing ties, the lowest-level seed by a stated rule where something does), so what comes back is
labels, seed points and the interior mask: the host keeps the thinning of seeds and the background
clearing. On a CPU the floods stay skimage's (5-10x faster there), and a device window that floods on the
host gets back only the floats those floods read, with a mask. A GPU run's probabilities arrive here as
tensors on the GPU (:mod:`engine.streaming`); a host array goes up once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import TypeVar

import cc3d
import numpy as np
import torch
from numpy.typing import NDArray

from . import device as dev
from .device_flood import flood_rest, flood_within
from .distance import EDT_BOUNDS, background_of, clear_background, distance_transform, edt_distance, is_unit
from .flood import fill, flood_plateaus, resolve_components, rim, seat_components, split_shared
from .seeds import find_seeds, interior_mask, seed_radius, seeds_from_peaks

__all__ = ["DeviceWindow", "HostWindow", "open_window"]

logger = logging.getLogger(__name__)
Box = tuple[slice, ...]
T = TypeVar("T")


class HostWindow:
    """A window's arrays on the host: ``image`` (what the flood floods), the interior ``mask``, its
    ``distance`` transform and ``components``; :meth:`place` adds the seed ``markers``."""

    def __init__(self, image: NDArray[np.float32], mask: NDArray[np.bool_], distance: NDArray[np.float32],
                 components: NDArray[np.int32], /, *, sampling: Sequence[float] | None, threads: int) -> None:
        self.image, self.mask, self.distance, self.components = image, mask, distance, components
        self.sampling, self.threads = sampling, threads
        self.markers: NDArray[np.int32] | None = None  # set by place()
        self.n_markers = 0

    @classmethod
    def compute(cls, image: NDArray[np.float32], /, *, kind: str, threshold: float, sampling: Sequence[float] | None,
                threads: int) -> HostWindow:
        """Interior, distances and components of the probability window ``image``."""
        mask = interior_mask(image, kind, threshold)
        distance = distance_transform(mask, sampling=sampling, threads=threads)
        components = cc3d.connected_components(mask, connectivity=6).astype(np.int32, copy=False)
        return cls(image, mask, distance, components, sampling=sampling, threads=threads)

    def peaks(self, min_dist: int) -> NDArray[np.intp]:
        """The window's own seed candidates (:func:`engine.labels.seeds.find_seeds`), strongest first."""
        return find_seeds(self.distance, self.components, min_dist=min_dist, sampling=self.sampling)

    def place(self, points: NDArray[np.integer], /) -> NDArray[np.intp]:
        """Seed ``points`` (touching ones make one marker); returns the seed voxels in scan order."""
        seeds = np.zeros(self.mask.shape, dtype=bool)
        seeds[tuple(np.asarray(points).T)] = True
        self.markers = cc3d.connected_components(seeds, connectivity=6).astype(np.int32, copy=False)
        self.n_markers = int(self.markers.max(initial=0))
        return np.argwhere(seeds)

    def markers_at(self, points: NDArray[np.integer], /) -> NDArray[np.int32]:
        """The marker at each of ``points`` ``(n, 3)`` (after :meth:`place`)."""
        assert self.markers is not None, "place() the seeds first"
        return self.markers[tuple(np.asarray(points).reshape(-1, 3).T)]

    def flood(self, *, boundary: bool, open_background: bool, needed: Box | None = None) -> NDArray[np.int32]:
        """The flooded window (after :meth:`place`): boundary models fill every voxel then lose the
        background (found from the mask, on a thread of its own while the flood runs when ``threads`` > 1);
        foreground models flood the negated distance inside the interior. Drops the window's arrays as it
        goes (the window's peak memory). ``needed``: the box the caller reads; plateaus outside it may stay
        unlabelled (:func:`engine.labels.flood.flood_plateaus`)."""
        assert self.markers is not None, "place() the seeds first"
        image, markers, components = self.image if boundary else -self.distance, self.markers, self.components
        del self.distance, self.markers, self.components  # each array goes as soon as it is done with: the peak
        if not boundary:
            return resolve_components(image, markers, components, threads=self.threads)
        find_background = partial(background_of, self.mask, sampling=self.sampling, threads=self.threads,
                                  open_wide=open_background)
        with ThreadPoolExecutor(1) as pool:
            background = pool.submit(find_background) if self.threads > 1 else None
            resolved = resolve_components(image, markers, components, threads=self.threads)
            del markers, components, image
            flooded = fill(self.image, resolved, needed=needed)
            del resolved
            flooded[find_background() if background is None else background.result()] = 0
        return flooded


class DeviceWindow:
    """The same window with its volumes as tensors on ``device`` (see the module docstring).

    A step that runs out of device memory hands the window to the host (:class:`HostWindow`, its state copied
    back, the device's tensors let go) and every later step runs there.
    """

    def __init__(self, image: NDArray[np.float32] | torch.Tensor, /, *, kind: str, threshold: float,
                 sampling: Sequence[float] | None, threads: int, device: torch.device, floods_on_device: bool | None = None) -> None:
        self.sampling, self.threads, self.device = sampling, threads, device
        # the two floods (:mod:`.device_flood`) on the device (default: a GPU's; on a CPU skimage is faster)
        self.floods_on_device = device.type != "cpu" if floods_on_device is None else floods_on_device
        self.image_t = (image if isinstance(image, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(image))).to(device)
        self.shape = tuple(self.image_t.shape)
        self.mask_t = interior_mask(self.image_t, kind, threshold)
        self.distance_t = self._distance(self.mask_t)
        self.components_t = dev.connected_components(self.mask_t)
        self.n_components = int(self.components_t.max()) if self.components_t.numel() else 0
        self.markers_t: torch.Tensor | None = None  # set by place()
        self.n_markers = 0
        self._host: HostWindow | None = None  # set when the device ran out of memory

    def _distance(self, mask: torch.Tensor) -> torch.Tensor:
        if is_unit(self.sampling):
            for bound in EDT_BOUNDS:
                distance = dev.bounded_distance(mask, bound=bound)
                if distance is not None:
                    return distance
        host = edt_distance(mask.cpu().numpy(), sampling=self.sampling, threads=self.threads)  # farther or anisotropic
        return torch.from_numpy(host).to(self.device)

    def _on_device(self, what: str, step: Callable[[], T], on_host: Callable[[HostWindow], T]) -> T:
        """``step`` on the device, or ``on_host`` on the host window once the device has run out of memory."""
        if self._host is None:
            try:
                return step()
            except torch.cuda.OutOfMemoryError:  # handled below, once the traceback (and its tensors) are gone
                logger.warning("labelling: %s out of memory for %s in a %s window; finishing the window on the host",
                               self.device, what, "x".join(map(str, self.shape)))
            self._host = self._to_host()
        return on_host(self._host)

    def _to_host(self) -> HostWindow:
        host = HostWindow(self.image_t.cpu().numpy(), self.mask_t.cpu().numpy(), self.distance_t.cpu().numpy(),
                          self.components_t.cpu().numpy(), sampling=self.sampling, threads=self.threads)
        if self.markers_t is not None:
            host.markers, host.n_markers = self.markers_t.cpu().numpy(), self.n_markers
        del self.image_t, self.mask_t, self.distance_t, self.components_t, self.markers_t
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # give the memory back to the network's streams
        return host

    def peaks(self, min_dist: int) -> NDArray[np.intp]:
        """As :meth:`HostWindow.peaks`: the maxima on the device, their points ordered and thinned on the host."""
        return self._on_device("seed maxima", lambda: self._peaks(min_dist), lambda host: host.peaks(min_dist))

    def _peaks(self, min_dist: int) -> NDArray[np.intp]:
        if not self.n_components:
            return np.empty((0, 3), dtype=np.intp)
        peak = dev.peaks(self.distance_t, self.mask_t, radius=seed_radius(min_dist, self.sampling))
        piece = dev.connected_components(peak)[peak]
        points, strength, component = torch.nonzero(peak), self.distance_t[peak], self.components_t[peak]
        return seeds_from_peaks(*(t.cpu().numpy() for t in (points, piece, strength, component)), min_dist=min_dist,
                                sampling=self.sampling)

    def place(self, points: NDArray[np.integer], /) -> NDArray[np.intp]:
        """As :meth:`HostWindow.place`."""
        return self._on_device("seed markers", lambda: self._place(points), lambda host: host.place(points))

    def _place(self, points: NDArray[np.integer]) -> NDArray[np.intp]:
        seeds = torch.zeros(self.mask_t.shape, dtype=torch.bool, device=self.device)
        if len(points):
            seeds[tuple(torch.from_numpy(np.asarray(points, dtype=np.int64).T).to(self.device))] = True
        self.markers_t = dev.connected_components(seeds)
        self.n_markers = int(self.markers_t.max()) if self.markers_t.numel() else 0
        return torch.nonzero(seeds).cpu().numpy().astype(np.intp, copy=False)

    def markers_at(self, points: NDArray[np.integer], /) -> NDArray[np.int32]:
        """The marker at each of ``points`` ``(n, 3)`` (after :meth:`place`)."""
        return self._on_device("seed lookups", lambda: self._markers_at(points), lambda host: host.markers_at(points))

    def _markers_at(self, points: NDArray[np.integer]) -> NDArray[np.int32]:
        assert self.markers_t is not None, "place() the seeds first"
        index = torch.from_numpy(np.asarray(points, dtype=np.int64).reshape(-1, 3).T).to(self.device)
        return self.markers_t[tuple(index)].cpu().numpy()

    def flood(self, *, boundary: bool, open_background: bool, needed: Box | None = None) -> NDArray[np.int32]:
        """As :meth:`HostWindow.flood`, the array steps on the device (which floods every plateau)."""
        return self._on_device("the flood", lambda: self._flood(boundary=boundary, open_background=open_background),
                               lambda host: host.flood(boundary=boundary, open_background=open_background, needed=needed))

    def _flood(self, *, boundary: bool, open_background: bool) -> NDArray[np.int32]:
        if not boundary:
            return self._resolve(-self.distance_t).cpu().numpy()
        resolved = self._resolve(self.image_t)
        if bool((resolved == 0).any()):
            descended, reached = dev.descend(self.image_t, resolved)
            rest = descended == 0
            if bool(rest.any()):
                box = _box(rest, margin=1)
                descended[box] = self._plateaus(box, resolved[box], descended[box], reached[box])
            resolved = descended
        flooded = resolved.cpu().numpy()
        clear_background(flooded, self.mask_t.cpu().numpy(), sampling=self.sampling, threads=self.threads,
                         open_wide=open_background)
        return flooded

    def _plateaus(self, box: Box, resolved: torch.Tensor, descended: torch.Tensor, reached: torch.Tensor) -> torch.Tensor:
        """:func:`engine.labels.flood.flood_plateaus` in ``box``: on the device, or on the host from the floats it reads."""
        if self.floods_on_device:
            return flood_rest(self.image_t[box], resolved, descended, reached)
        labels = [resolved.cpu().numpy(), descended.cpu().numpy()]
        read = labels[1] == 0
        read = torch.from_numpy(read | rim(read)).to(self.device)  # what the plateau flood reads: its voxels, their rim
        flooded = flood_plateaus(_values_at(self.image_t[box], read), *labels, _values_at(reached, read))
        return torch.from_numpy(flooded).to(self.device)

    def _resolve(self, image: torch.Tensor) -> torch.Tensor:
        """:func:`engine.labels.flood.resolve_components` with the components' lookups on the device and the
        split of shared components (a flood of ``image`` inside them) in their box, on the device or the host."""
        assert self.markers_t is not None, "place() the seeds first"
        at = self.markers_t > 0
        region_of_comp, shared = seat_components(self.markers_t[at].cpu().numpy(), self.components_t[at].cpu().numpy(),
                                                 self.n_components)
        flat = self.components_t.view(-1)
        resolved = torch.index_select(torch.from_numpy(region_of_comp).to(self.device), 0, flat).view(self.components_t.shape)
        if shared.any():
            inside = torch.index_select(torch.from_numpy(shared).to(self.device), 0, flat).view(self.components_t.shape)
            box = _box(inside)
            inside, markers = inside[box], self.markers_t[box]
            if self.floods_on_device:
                resolved[box] = torch.where(inside, flood_within(image[box], markers, inside), resolved[box])
            else:
                parts = (t.cpu().numpy() for t in (markers, self.components_t[box], inside, resolved[box]))
                split = split_shared(_values_at(image[box], inside), *parts, threads=self.threads)
                resolved[box] = torch.from_numpy(split).to(self.device)
        return resolved


def _values_at(volume: torch.Tensor, where: torch.Tensor, /) -> NDArray[np.float32]:
    """``volume`` on the host where ``where`` is set, 0 elsewhere: a host flood reads no other voxel, so
    only these floats come back (and ``where``, one byte a voxel)."""
    at = where.cpu().numpy()
    out = np.zeros(at.shape, dtype=np.float32)
    out[at] = volume[where].cpu().numpy()
    return out


def _box(mask: torch.Tensor, /, *, margin: int = 0) -> Box:
    """:func:`engine.labels.flood.box_of` of a tensor with some voxels set."""
    box = []
    for axis, n in enumerate(mask.shape):
        hit = torch.nonzero(mask.movedim(axis, 0).reshape(n, -1).any(dim=1)).view(-1)  # torch >= 2.1
        box.append(slice(max(0, int(hit[0]) - margin), min(n, int(hit[-1]) + 1 + margin)))
    return tuple(box)


def open_window(image: NDArray[np.float32] | torch.Tensor, /, *, kind: str, threshold: float,
                sampling: Sequence[float] | None, threads: int, device: torch.device | None,
                min_dist: int) -> tuple[HostWindow | DeviceWindow, NDArray[np.intp]]:
    """The window and its own seed candidates. A tensor is labelled where it lies (a GPU run's probabilities
    stay on the GPU; a CPU tensor takes the same path, which the tests use); a host array on ``device`` when
    that is not the CPU (there numpy measured faster), else on the host. A device out of memory: the host."""
    window: HostWindow | DeviceWindow | None = None
    on = image.device if isinstance(image, torch.Tensor) else device
    if on is not None and (on.type != "cpu" or isinstance(image, torch.Tensor)):
        try:
            window = DeviceWindow(image, kind=kind, threshold=threshold, sampling=sampling, threads=threads, device=on)
        except torch.cuda.OutOfMemoryError:
            logger.warning("labelling: %s out of memory for a %s window; labelling it on the host", on,
                           "x".join(map(str, image.shape)))
    if window is None:
        host = image.cpu().numpy() if isinstance(image, torch.Tensor) else image
        window = HostWindow.compute(host, kind=kind, threshold=threshold, sampling=sampling, threads=threads)
    return window, window.peaks(min_dist)
