"""Patch and batch fitted to the device, and recovery when the device runs out of memory.

The network is fully convolutional, so a larger patch wastes less compute on overlap. On CUDA the largest
patch (a multiple of the network's divisor, no larger than the volume needs; torch backends only, engines
built for a patch keep it: ``Backend.can_grow_patch``) and batch that fit the free device memory with a margin are chosen from
measurements: one forward pass at batch 1 and 2 per candidate
patch gives ``bytes(batch) = base + batch * per_patch``. Measurements are cached per device, backend,
precision and bundle in a small JSON file, so only the first run on a device pays for them. On the CPU the
bundle's patch is kept (bigger patches are not faster there) and the batch is 1; when the host memory given
to the network is known (:mod:`engine.run_plan` gives it), a volume the patch covers keeps it at batch 1 if
its activations fit, else is cut along its longest side into as few patches as fit; any other volume has
its patch halved, one side at a time, until :data:`CPU_BATCH` patches' activations fit, and the batch is
:data:`CPU_BATCH`. Activations are counted per voxel as every layer's output alive at once
(:func:`activation_bytes_per_voxel`: 966 bytes for the default model, whose measured peak is ~700, so a
64x256x256 patch alone takes ~2.9 GB), an upper bound.

:class:`BackoffRunner` wraps a backend's ``run``: on ``torch.cuda.OutOfMemoryError`` it halves the batch and
runs the same patches again in halves, so nothing already blended is lost, and keeps the smaller batch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from .backends import Backend
from .bundle import Bundle
from .errors import InputError
from .models import build_model
from .tiling import fit_patch_shape, patch_starts

__all__ = ["MEMORY_MARGIN", "BackoffRunner", "Fit", "activation_bytes_per_voxel", "default_cache_dir", "fit_tiling"]

logger = logging.getLogger(__name__)

MEMORY_MARGIN = 0.8  # use at most this fraction of the free device memory
MAX_BATCH = 32
MAX_PATCH_VOXELS = 256**3
MIN_CPU_PATCH = (32, 64, 64)  # a patch shrunk to the host memory keeps at least this (the training crop)
# Patches per CPU call when the host memory allows: with one patch, torch takes its slow im2col 3D convolution
# for inputs whose channels x depth x height are under 20480 (aten's use_mkldnn), ~10x slower than oneDNN's.
CPU_BATCH = 2
_SCALES_YX = (1.0, 1.5, 2.0, 3.0, 4.0)
_SCALES_Z = (1.0, 1.5, 2.0)
_CACHE_VERSION = 1

Measure = Callable[[tuple[int, int, int], int], float]


@dataclass(frozen=True)
class Fit:
    """The chosen patch and batch, and where they came from.

    Attributes:
        patch_shape: ``(z, y, x)``.
        batch_size: patches per network call.
        source: ``options`` (the caller fixed both), ``bundle`` (CPU: the bundle's patch), ``host memory``
            (CPU: the bundle's patch shrunk to the host memory), ``measured`` or ``cache`` (CUDA: fitted to the
            free memory).
    """

    patch_shape: tuple[int, int, int]
    batch_size: int
    source: str


def default_cache_dir() -> Path:
    """``$CELLSEG3D_CACHE/fit``, else ``~/.cache/cellseg3d/fit``."""
    root = os.environ.get("CELLSEG3D_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "cellseg3d")
    return Path(root) / "fit"


def _candidates(base: Sequence[int], volume_shape: Sequence[int], divisor: int) -> list[tuple[int, int, int]]:
    """Patches grown from the bundle's, no larger than the volume needs, smallest first."""
    found = set()
    for sz in _SCALES_Z:
        for syx in _SCALES_YX:
            raw = (base[0] * sz, base[1] * syx, base[2] * syx)
            patch = tuple(max(divisor, round(p / divisor) * divisor) for p in raw)
            fitted = fit_patch_shape(volume_shape, patch, divisor)
            if math.prod(fitted) <= MAX_PATCH_VOXELS:
                found.add(fitted)
    return sorted(found, key=lambda p: (math.prod(p), p))


def activation_bytes_per_voxel(bundle: Bundle, /) -> float:
    """Host bytes per patch voxel the network's activations take at most: every layer's output counted as
    alive at once, from forward hooks on the bundle's architecture over a small input (a few ms; 966 bytes
    for the default model, whose measured peak is ~700)."""
    model = build_model(bundle.architecture, bundle.arch_kwargs).eval()
    total = 0

    def count(_module: torch.nn.Module, _inputs: object, output: object) -> None:
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += output.numel() * output.element_size()

    hooks = [m.register_forward_hook(count) for m in model.modules() if not list(m.children())]
    x = torch.zeros(1, bundle.in_channels, 2 * bundle.divisor, 4 * bundle.divisor, 4 * bundle.divisor)
    try:
        with torch.inference_mode():
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return total / (x.numel() / bundle.in_channels)


def _within_host_memory(patch: tuple[int, int, int], cost: Callable[[tuple[int, int, int]], float], host_bytes: float,
                        divisor: int) -> tuple[int, int, int]:
    """``patch`` with one side at a time halved (to a multiple of ``divisor``), whichever saves the most
    ``cost``, until the cost fits ``host_bytes`` or no side can shrink below :data:`MIN_CPU_PATCH` (the
    network needs that much context)."""
    floor = [min(p, max(divisor, m)) for p, m in zip(patch, MIN_CPU_PATCH)]
    while cost(patch) > host_bytes:
        halved = [tuple(max(floor[a], math.ceil(s / 2 / divisor) * divisor) if a == axis else s for a, s in enumerate(patch))
                  for axis in range(3) if patch[axis] > floor[axis]]
        if not halved:
            break
        best = min(halved, key=lambda p: (cost(p), max(p)))  # on a tie, the squarer patch
        patch = (best[0], best[1], best[2])
    return patch


def _bundle_fingerprint(bundle: Bundle) -> str:
    digest = hashlib.sha256(json.dumps(bundle.to_json(), sort_keys=True, default=str).encode())
    if bundle.weights_path.is_file():
        digest.update(str(bundle.weights_path.stat().st_size).encode())
        digest.update(str(bundle.weights_path.stat().st_mtime_ns).encode())
    return digest.hexdigest()[:16]


def _measure_cuda(backend: Backend, channels: int) -> Measure:
    """Peak device bytes of one forward pass: torch's allocator peak, or the drop in free memory for
    backends that allocate outside torch (ONNX Runtime, TensorRT)."""
    device = backend.device

    def measure(patch: tuple[int, int, int], batch: int) -> float:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        free_before = torch.cuda.mem_get_info(device)[0]
        allocated = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        try:
            out = backend.run(torch.zeros((batch, channels, *patch), device=device))
            torch.cuda.synchronize(device)
            del out
        except backend.oom_errors:
            torch.cuda.empty_cache()
            return math.inf
        peak = torch.cuda.max_memory_allocated(device) - allocated
        outside = free_before - torch.cuda.mem_get_info(device)[0] - (torch.cuda.memory_reserved(device) - allocated)
        return float(max(peak, outside))

    return measure


def _device_key(backend: Backend) -> str:
    props = torch.cuda.get_device_properties(backend.device)
    return f"{props.name}|{props.total_memory}|{torch.__version__}"


def fit_tiling(
    bundle: Bundle,
    backend: Backend,
    volume_shape: Sequence[int],
    /,
    *,
    patch_shape: tuple[int, int, int] | None = None,
    batch_size: int | None = None,
    reserve_bytes: Callable[[tuple[int, int, int]], float] = lambda patch: 0.0,
    host_bytes: float | None = None,
    overlap: float | None = None,
    cache_dir: Path | None = None,
    measure: Measure | None = None,
    free_bytes: float | None = None,
    device_key: str | None = None,
) -> Fit:
    """Choose the patch and batch for ``backend`` on a volume of ``volume_shape`` ``(Z, Y, X)``.

    Args:
        bundle: gives the default patch and the network's divisor.
        backend: the loaded backend; only CUDA backends are measured.
        volume_shape: ``(Z, Y, X)``.
        patch_shape, batch_size: fixed by the caller (None: fitted).
        reserve_bytes: device bytes needed beside the network for a patch, e.g. the slab accumulator.
        host_bytes: on the CPU, the host memory the network's activations and ``reserve_bytes`` may take
            together (None: no limit); torch backends only, the others keep the patch they were built for.
        overlap: the tiling's overlap (None: the bundle's), for a volume one patch covers that must be cut.
        cache_dir: where measurements are cached (None: :func:`default_cache_dir`).
        measure, free_bytes, device_key: test hooks standing in for the CUDA measurement, the free device
            memory and the device's identity.

    Raises:
        InputError: a fixed patch is not made of multiples of the divisor.
    """
    divisor = bundle.divisor
    if patch_shape is not None and (len(patch_shape) != 3 or any(int(p) <= 0 or int(p) % divisor for p in patch_shape)):
        raise InputError(f"patch shape must be 3 positive multiples of {divisor}, got {patch_shape!r}")
    on_cuda = backend.device.type == "cuda" or measure is not None
    if not on_cuda or (patch_shape is not None and batch_size is not None):
        return _fit_unmeasured(
            bundle, backend, volume_shape, patch_shape=patch_shape, batch_size=batch_size, reserve_bytes=reserve_bytes,
            host_bytes=host_bytes, overlap=bundle.overlap if overlap is None else overlap,
        )
    if measure is None:
        measure = _measure_cuda(backend, bundle.in_channels)
    if free_bytes is None:
        free_bytes = float(torch.cuda.mem_get_info(backend.device)[0])
    key = {
        "version": _CACHE_VERSION,
        "device": device_key or _device_key(backend),
        "backend": backend.name,
        "precision": backend.precision,
        "bundle": _bundle_fingerprint(bundle),
    }
    path = (cache_dir or default_cache_dir()) / (hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20] + ".json")
    table, cached = _load_cache(path, key)
    if patch_shape is not None or not backend.can_grow_patch:
        # engines built for a patch (ONNX Runtime's TensorRT EP, TensorRT) keep it: only the batch is fitted
        candidates = [fit_patch_shape(volume_shape, patch_shape or bundle.patch_shape, divisor)]
    else:
        candidates = _candidates(bundle.patch_shape, volume_shape, divisor)
    max_batch = MAX_BATCH if backend.can_grow_patch else min(MAX_BATCH, backend.options.max_batch)
    best, measured = _largest_fit(candidates, table, measure, budget=free_bytes * MEMORY_MARGIN, reserve_bytes=reserve_bytes, max_batch=max_batch)
    _save_cache(path, key, table)
    source = "cache" if cached and not measured else "measured"
    if best is None:
        logger.warning("patch %s does not fit the free device memory (%.2f GiB); trying batch 1", candidates[0], free_bytes / 2**30)
        return Fit(candidates[0], 1, source)
    return Fit(best[0], batch_size or best[1], source)


def _fit_unmeasured(
    bundle: Bundle,
    backend: Backend,
    volume_shape: Sequence[int],
    /,
    *,
    patch_shape: tuple[int, int, int] | None,
    batch_size: int | None,
    reserve_bytes: Callable[[tuple[int, int, int]], float],
    host_bytes: float | None,
    overlap: float,
) -> Fit:
    """The CPU's (or a fully fixed) patch and batch: the bundle's or the caller's, shrunk to ``host_bytes``; a
    volume the patch covers runs at batch 1, in as few patches as fit (:func:`_fewest_patches`)."""
    patch = fit_patch_shape(volume_shape, patch_shape or bundle.patch_shape, bundle.divisor)
    source = "options" if patch_shape and batch_size else "bundle"
    default_batch = 1 if backend.device.type == "cpu" else 4
    if host_bytes is not None and backend.can_grow_patch:
        per_voxel = activation_bytes_per_voxel(bundle)
        cost = lambda p, batch: batch * per_voxel * math.prod(p) + reserve_bytes(p)  # noqa: E731
        if patch_shape is None and batch_size is None and all(p >= v for p, v in zip(patch, volume_shape)):
            cut = _fewest_patches(patch, volume_shape, partial(cost, batch=1), host_bytes, bundle.divisor, overlap)
            if cut is not None:
                return Fit(cut, 1, source if cut == patch else "host memory")
        batched = partial(cost, batch=batch_size or CPU_BATCH)
        fitted = patch if patch_shape is not None else _within_host_memory(patch, batched, host_bytes, bundle.divisor)
        default_batch = CPU_BATCH if batched(fitted) <= host_bytes else 1
        source, patch = (source if fitted == patch else "host memory"), fitted
    return Fit(patch, batch_size or default_batch, source)


def _fewest_patches(patch: tuple[int, int, int], volume_shape: Sequence[int], cost: Callable[[tuple[int, int, int]], float],
                    host_bytes: float, divisor: int, overlap: float) -> tuple[int, int, int] | None:
    """For a volume ``patch`` covers: ``patch`` at batch 1 if its ``cost`` fits ``host_bytes``, else the patch cut
    along the volume's longest side to the fewest patches that fit (as short as that count allows), else None.
    Halving every side for two patches a call costs their overlap: a 64x256x256 volume ran 2.3x its voxels in
    45 pairs of 32x64x128 (11.0 s against 6.5-6.9 s as one patch), 1.25x in four of 64x256x80 (6.5-7.1 s)."""
    if cost(patch) <= host_bytes:
        return patch
    axis = max(range(3), key=lambda a: (volume_shape[a], a))
    size, floor = volume_shape[axis], max(divisor, min(patch[axis], MIN_CPU_PATCH[axis]))
    cut = lambda side: tuple(side if a == axis else p for a, p in enumerate(patch))  # noqa: E731
    sides = [side for side in range(patch[axis] - divisor, floor - 1, -divisor) if cost(cut(side)) <= host_bytes]
    if not sides:
        return None
    count = len(patch_starts(size, sides[0], overlap))
    return cut(min(side for side in sides if len(patch_starts(size, side, overlap)) == count))


def _largest_fit(
    candidates: list[tuple[int, int, int]], table: dict[str, list[float]], measure: Measure, *, budget: float,
    reserve_bytes: Callable[[tuple[int, int, int]], float], max_batch: int,
) -> tuple[tuple[tuple[int, int, int], int] | None, bool]:
    """The largest candidate patch (smallest first) that fits ``budget``, with its batch; measures what
    ``table`` lacks (``bytes(batch) = base + batch * per_patch``) and says whether it measured anything."""
    best: tuple[tuple[int, int, int], int] | None = None
    measured = False
    for patch in candidates:
        name = "x".join(map(str, patch))
        if name not in table:
            measured = True
            one, two = measure(patch, 1), measure(patch, 2)
            table[name] = [one - (two - one), two - one] if math.isfinite(two) else [one, math.inf]
        base, per = table[name]
        room = budget - reserve_bytes(patch) - base
        if not math.isfinite(per) or room < per:
            break  # larger patches need more
        best = (patch, max(1, int(min(max_batch, room // per)) if per > 0 else max_batch))
    return best, measured


def _load_cache(path: Path, key: dict[str, object]) -> tuple[dict[str, list[float]], bool]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}, False
    if doc.get("key") != key or not isinstance(doc.get("bytes"), dict):
        return {}, False
    return {k: [float(v[0]), float(v[1])] for k, v in doc["bytes"].items()}, True


def _save_cache(path: Path, key: dict[str, object], table: dict[str, list[float]]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, "bytes": {k: [v[0], v[1] if math.isfinite(v[1]) else None] for k, v in table.items()}}, indent=1))
        os.replace(tmp, path)
    except OSError as exc:  # a read-only home must not stop a run
        logger.warning("%s: cannot cache patch/batch measurements (%s)", path, exc)


class BackoffRunner:
    """``run`` with the batch halved on CUDA out-of-memory.

    A batch larger than :attr:`batch_size` is run in pieces; when a piece runs out of device memory the
    batch size is halved, the allocator cache emptied and the same patches run again in halves, so no
    finished work is lost. The smaller batch is kept for the rest of the run.

    Args:
        run: the backend's ``run``.
        batch_size: the largest batch to try.
        oom_errors: what counts as running out of device memory (the backend's ``oom_errors``).
    """

    def __init__(
        self, run: Callable[[torch.Tensor], torch.Tensor], /, *, batch_size: int,
        oom_errors: tuple[type[BaseException], ...] = (torch.cuda.OutOfMemoryError,),
    ) -> None:
        self._run = run
        self.batch_size = batch_size
        self.oom_errors = oom_errors
        self.oom_retries = 0

    def __call__(self, batch: torch.Tensor, /) -> torch.Tensor:
        n = batch.shape[0]
        if n > self.batch_size:
            parts, start = [], 0
            while start < n:  # the batch size may shrink on the way; every patch runs exactly once
                size = self.batch_size
                parts.append(self(batch[start : start + size]))
                start += size
            return torch.cat(parts)
        try:
            return self._run(batch)
        except self.oom_errors as exc:
            if n == 1:
                raise torch.cuda.OutOfMemoryError(
                    f"out of device memory with a single patch of {tuple(batch.shape[2:])}; pass a smaller --patch ({exc})"
                ) from exc
            self.oom_retries += 1
            self.batch_size = max(1, n // 2)
            logger.warning("out of device memory at batch %d; retrying at batch %d", n, self.batch_size)
            if batch.is_cuda:
                torch.cuda.empty_cache()
            return self(batch)
