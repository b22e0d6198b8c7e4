"""The slab loop: a volume streamed through normalization, inference and labelling in z-slabs, pipelined.

Three stages run at once, joined by bounded queues (so memory holds a fixed number of slabs, never the
volume):

1. a reader thread reads the next planes (memory-mapped or page by page, see :mod:`engine.io`) and
   normalizes them with statistics taken over the whole volume beforehand;
2. the calling thread runs the network over the global patch plan, one group of patch rows at a time
   (:func:`engine.tiling.sliding_window_slabs`), blending on the backend's device and passing on each run
   of final probability planes (on a GPU as tensors there: they reach the host only for a probability output);
3. a post-processing thread writes the probabilities (if wanted) and labels finished cores
   (:class:`engine.labels.SlabLabeler`, where the planes lie), storing provisional labels.

The slab sizes come from the run plan (:func:`engine.run_plan.plan_slabs`); this module only runs the threads.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from .bundle import Normalization
from .normalize import normalization_stats
from .progress import ProgressTracker
from .labels import SlabLabeler
from .tiling import SlabGrid, sliding_window_slabs

__all__ = ["ArraySource", "Source", "StreamTimings", "normalize_with", "prefetched", "stream", "volume_stats"]

logger = logging.getLogger(__name__)

class Source(Protocol):
    """A ``(C, Z, Y, X)`` volume readable by z-slabs (:class:`engine.io.VolumeReader` is one)."""

    shape: tuple[int, int, int, int]

    def read(self, z0: int, z1: int, /) -> np.ndarray: ...


class ArraySource:
    """An in-memory (or memory-mapped) ``(C, Z, Y, X)`` array as a :class:`Source`."""

    def __init__(self, data: np.ndarray, /) -> None:
        self.data = data
        self.shape: tuple[int, int, int, int] = tuple(data.shape)  # type: ignore[assignment]
        self.dtype = data.dtype

    def read(self, z0: int, z1: int, /) -> np.ndarray:
        return self.data[:, z0:z1]


class _LazyChannel:
    """One channel of a :class:`Source`, read only where indexed (for the strided statistics sample)."""

    def __init__(self, source: Source, channel: int, dtype: np.dtype) -> None:
        self._source, self._channel, self.dtype = source, channel, dtype
        self.shape = tuple(source.shape[1:])
        self.ndim, self.size = 3, int(np.prod(self.shape))

    def __getitem__(self, key: tuple[slice, slice, slice]) -> np.ndarray:
        zs = range(*key[0].indices(self.shape[0]))
        planes = [self._source.read(z, z + 1)[self._channel, 0][key[1], key[2]] for z in zs]
        return np.stack(planes)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        data = self._source.read(0, self.shape[0])[self._channel]
        return data if dtype is None else data.astype(dtype)


def volume_stats(source: Source, spec: Normalization, /, *, dtype: np.dtype) -> list[tuple[float, float]]:
    """:func:`engine.normalize.normalization_stats` of a streamed volume: the same voxels, read lazily.

    Small volumes are read whole; above the normalization's exact limit only the strided sample's planes
    are read.
    """
    from .normalize import MAX_EXACT_VOXELS

    c, z, y, x = source.shape
    if z * y * x <= MAX_EXACT_VOXELS:
        return normalization_stats(source.read(0, z), spec)
    return normalization_stats([_LazyChannel(source, i, dtype) for i in range(c)], spec)  # type: ignore[arg-type]


def normalize_with(raw: np.ndarray, stats: list[tuple[float, float]], /) -> np.ndarray:
    """``(x - offset) / scale`` per channel, float32, with the same arithmetic as :func:`engine.normalize.normalize`."""
    out = np.empty(raw.shape, dtype=np.float32)
    for ch, (offset, scale) in enumerate(stats):
        np.subtract(raw[ch], offset, out=out[ch], dtype=np.float32)
        out[ch] *= np.float32(1.0 / scale)
    return out


class _Stopped(Exception):
    """Another stage failed; this one stops quietly (the first error is the one raised)."""


@dataclass
class StreamTimings:
    """Busy seconds per stage (stages overlap, so they can sum to more than the wall time)."""

    seconds: dict[str, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds


class _Pipeline:
    """Bounded queues between stage threads; the first exception anywhere stops every stage."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self._threads: list[threading.Thread] = []

    def channel(self, size: int = 2) -> queue.Queue[Any]:
        return queue.Queue(maxsize=size)

    def put(self, q: queue.Queue[Any], item: Any) -> None:
        while True:
            if self.stop.is_set():
                raise _Stopped
            try:
                q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def get(self, q: queue.Queue[Any], *, idle: Callable[[], None] | None = None) -> Any:
        while True:
            if self.stop.is_set():
                raise _Stopped
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                if idle is not None:
                    idle()

    def start(self, name: str, target: Callable[[], None]) -> None:
        def body() -> None:
            try:
                target()
            except _Stopped:
                pass
            except BaseException as exc:  # handed to the calling thread by check()
                self.fail(exc)

        thread = threading.Thread(target=body, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        self.stop.set()

    def join(self, *, idle: Callable[[], None] | None = None) -> None:
        try:
            for thread in self._threads:
                while thread.is_alive():
                    thread.join(timeout=0.2)
                    if idle is not None:
                        idle()
        except BaseException as exc:  # a signal while waiting: stop every stage before it propagates
            self.fail(exc)
            for thread in self._threads:
                thread.join()
            raise
        if self.error is not None:
            raise self.error


def stream(
    source: Source,
    /,
    *,
    stats: list[tuple[float, float]],
    run: Callable[[torch.Tensor], torch.Tensor],
    grid: SlabGrid,
    out_channels: int,
    device: torch.device,
    labeler: SlabLabeler,
    write_probs: Callable[[int, np.ndarray], None] | None,
    tracker: ProgressTracker,
    timings: StreamTimings,
) -> None:
    """Run the three stages over ``source`` until every core is labelled (see the module docstring).

    Args:
        source: the raw ``(C, Z, Y, X)`` volume.
        stats: per-channel ``(offset, scale)`` from :func:`volume_stats`.
        run: the (back-off wrapped) backend run.
        grid: the patch plan and its grouping.
        out_channels: channels the network returns.
        device: where the blend accumulates.
        labeler: receives the probability planes and stores provisional labels.
        write_probs: ``write_probs(z0, chunk)`` receives each ``(K, n, Y, X)`` float32 probability chunk, in
            z order, or None.
        tracker: progress.
        timings: busy seconds per stage are added here.

    Raises:
        Whatever a stage raised first; the other stages stop.
    """
    pipe = _Pipeline()
    inputs, outputs = pipe.channel(2), pipe.channel(2)

    def reader() -> None:
        for a, b in grid.read_ranges():
            start = time.perf_counter()
            raw = source.read(a, b) if b > a else None
            mid = time.perf_counter()
            data = normalize_with(raw, stats) if raw is not None else None
            timings.add("read", mid - start)
            timings.add("normalize", time.perf_counter() - mid)
            pipe.put(inputs, (a, b, data))

    def postprocessor() -> None:
        while (item := pipe.get(outputs)) is not None:
            z0, probs = item
            start = time.perf_counter()
            if write_probs is not None:
                write_probs(z0, probs.cpu().numpy() if isinstance(probs, torch.Tensor) else probs)
            tracker.voxels(labeler.push(z0, probs))
            timings.add("postprocess", time.perf_counter() - start)

    def read(a: int, b: int) -> np.ndarray:
        got_a, got_b, data = pipe.get(inputs, idle=tracker.report)
        if (got_a, got_b) != (a, b):
            raise RuntimeError(f"reader out of step: planes {got_a}..{got_b} arrived, {a}..{b} expected")
        return data

    labelling_threads = labeler.threads
    if device.type == "cpu":  # while the network runs there its threads take every core: label on one
        labeler.threads = 1

    def emit(item: tuple[int, np.ndarray | torch.Tensor]) -> None:
        if item[0] + item[1].shape[1] >= labeler.shape[0]:  # the network's last planes: label the rest on every core
            labeler.threads = labelling_threads
        pipe.put(outputs, item)

    pipe.start("cellseg3d-read", reader)
    pipe.start("cellseg3d-postprocess", postprocessor)
    try:
        _infer(
            read, run=run, grid=grid, out_channels=out_channels, device=device, tracker=tracker, timings=timings, emit=emit,
        )
        pipe.put(outputs, None)
    except _Stopped:
        pass
    except BaseException as exc:
        pipe.fail(exc)
    pipe.join(idle=tracker.report)


def _infer(
    read: Callable[[int, int], np.ndarray],
    /,
    *,
    run: Callable[[torch.Tensor], torch.Tensor],
    grid: SlabGrid,
    out_channels: int,
    device: torch.device,
    tracker: ProgressTracker,
    timings: StreamTimings,
    emit: Callable[[tuple[int, np.ndarray | torch.Tensor]], None],
) -> None:
    """Inference on the calling thread; the time spent waiting on the other stages is not counted."""
    waited = 0.0

    def timed_read(a: int, b: int) -> np.ndarray:
        nonlocal waited
        start = time.perf_counter()
        try:
            return read(a, b)
        finally:
            waited += time.perf_counter() - start

    slabs: Iterator[tuple[int, torch.Tensor]] = sliding_window_slabs(
        timed_read, run, grid=grid, out_channels=out_channels, device=device, progress=tracker.patches
    )
    start = time.perf_counter()
    for z0, probs in slabs:
        # on a GPU the planes stay there for the labeller (only labels come back); a host copy is made only
        # for a probability output (the postprocessor's sink)
        planes = probs.numpy().copy() if probs.device.type == "cpu" else probs.contiguous()
        before = time.perf_counter()
        emit((z0, planes))
        waited += time.perf_counter() - before
    timings.add("infer", max(0.0, time.perf_counter() - start - waited))


def prefetched(items: Iterator[Any], /, *, depth: int = 2) -> Iterator[Any]:
    """``items``, produced on a background thread up to ``depth`` ahead (e.g. relabelling the next label
    planes while the current ones are compressed). The producer's exception is raised here."""
    pipe = _Pipeline()
    q = pipe.channel(depth)
    end = object()

    def produce() -> None:
        for item in items:
            pipe.put(q, item)
        pipe.put(q, end)

    pipe.start("cellseg3d-prefetch", produce)
    try:
        while True:
            try:
                item = pipe.get(q)
            except _Stopped:
                break
            if item is end:
                break
            yield item
    finally:
        pipe.stop.set()
        pipe.join()
