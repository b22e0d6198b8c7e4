"""The peers this engine is measured against, each reduced to ``(volume, network) -> probabilities``.

All three take the same normalized input and the same network callable (so model, precision and the
FLOP/time accounting are shared with the engine's runs) and return ``(K, Z, Y, X)`` float32 on the host:

- :func:`monai_sliding_window`: MONAI ``sliding_window_inference`` with gaussian blending, its default
  overlap 0.25 and ``sw_batch_size=4``, the roi being the bundle's patch. MONAI is an optional benchmark
  dependency; install it with ``pip install --no-deps monai`` (its requirements would replace the CPU torch
  wheel with a CUDA one); it needs only numpy and torch at run time.
- :func:`pytorch3dunet_predictor`: pytorch-3dunet's ``StandardPredictor`` settings: the volume is mirror-
  padded by the halo, patches of ``patch`` are taken on a ``stride`` grid (the last one shifted back to the
  border, as its ``SliceBuilder`` does), each extended by the halo on every side, the halo is cut from the
  prediction, which is copied to the host and averaged where patches overlap. Re-implemented here (its
  predictor reads HDF5 through a DataLoader); the package itself is not needed.
- :func:`original_loop`: the original BisQue module's loop: 16-slice z chunks over the whole x-y plane, no
  overlap, each chunk's output copied to the host.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from numpy.typing import NDArray

__all__ = ["monai_unavailable_reason", "monai_sliding_window", "pytorch3dunet_halo", "pytorch3dunet_predictor", "original_loop", "slice_starts"]

Network = Callable[[torch.Tensor], torch.Tensor]


def monai_unavailable_reason() -> str | None:
    """Why MONAI cannot run here (with the install command), or None."""
    try:
        from monai.inferers import sliding_window_inference  # noqa: F401
    except ImportError as exc:
        return f"monai is not installed ({exc}); pip install --no-deps monai"
    return None


def monai_sliding_window(
    volume: NDArray[np.float32], net: Network, /, *, roi_size: tuple[int, int, int], device: torch.device, overlap: float = 0.25, sw_batch_size: int = 4
) -> NDArray[np.float32]:
    """MONAI's sliding window with gaussian blending.

    Args:
        volume: ``(C, Z, Y, X)`` normalized float32 on the host.
        net: ``(N, C, z, y, x)`` -> ``(N, K, z, y, x)`` probabilities on ``device``.
        roi_size: patch ``(z, y, x)``.
        device: where the network runs and MONAI blends (the input is moved there first, as users do).
        overlap: MONAI's overlap (its default 0.25).
        sw_batch_size: patches per network call.
    """
    from monai.inferers import sliding_window_inference

    x = torch.from_numpy(np.ascontiguousarray(volume))[None].to(device)
    with torch.inference_mode():
        out = sliding_window_inference(x, roi_size, sw_batch_size, net, overlap=overlap, mode="gaussian")
    return out[0].float().cpu().numpy()


def slice_starts(size: int, patch: int, stride: int, /) -> list[int]:
    """pytorch-3dunet ``SliceBuilder`` starts along one axis: a ``stride`` grid, the last patch at the border."""
    if size <= patch:
        return [0]
    starts = list(range(0, size - patch + 1, stride))
    if starts[-1] + patch < size:
        starts.append(size - patch)
    return starts


def pytorch3dunet_halo(patch: tuple[int, int, int], divisor: int, /) -> tuple[int, int, int]:
    """About an eighth of the patch on each side, so that ``patch + 2 * halo`` is a multiple of ``divisor``."""
    halo = [max(1, p // 8) for p in patch]
    halo = [math.ceil(2 * h / divisor) * divisor // 2 if (p + 2 * h) % divisor else h for p, h in zip(patch, halo)]
    return (halo[0], halo[1], halo[2])


def pytorch3dunet_predictor(
    volume: NDArray[np.float32],
    net: Network,
    /,
    *,
    patch: tuple[int, int, int],
    halo: tuple[int, int, int],
    device: torch.device,
    out_channels: int,
    stride: tuple[int, int, int] | None = None,
) -> NDArray[np.float32]:
    """Patch + halo prediction, averaged on the host.

    Args:
        volume: ``(C, Z, Y, X)`` normalized float32 on the host.
        net: the network (input sides ``patch + 2 * halo`` must suit it).
        patch: core patch ``(z, y, x)`` written back per prediction.
        halo: context added on each side of the core and cut from the prediction.
        device: where the network runs.
        out_channels: channels the network returns.
        stride: grid step; defaults to ``patch`` (abutting cores; the shifted last patch overlaps).
    """
    stride = stride or patch
    shape = volume.shape[1:]
    core = tuple(min(p, s) for p, s in zip(patch, shape))
    pad = [(0, 0)] + [(h, h) for h in halo]
    padded = np.pad(volume, pad, mode="reflect")
    grid = [slice_starts(s, c, st) for s, c, st in zip(shape, core, stride)]
    out = np.zeros((out_channels, *shape), dtype=np.float32)
    count = np.zeros(shape, dtype=np.uint8)
    with torch.inference_mode():
        for z in grid[0]:
            for y in grid[1]:
                for x in grid[2]:
                    window = padded[:, z : z + core[0] + 2 * halo[0], y : y + core[1] + 2 * halo[1], x : x + core[2] + 2 * halo[2]]
                    pred = net(torch.from_numpy(np.ascontiguousarray(window))[None].to(device))
                    pred = pred[0, :, halo[0] : halo[0] + core[0], halo[1] : halo[1] + core[1], halo[2] : halo[2] + core[2]]
                    region = (slice(z, z + core[0]), slice(y, y + core[1]), slice(x, x + core[2]))
                    out[(slice(None), *region)] += pred.float().cpu().numpy()
                    count[region] += 1
    out /= count
    return out


def original_loop(
    volume: NDArray[np.float32], net: Network, /, *, divisor: int, device: torch.device, out_channels: int, chunk: int = 16
) -> NDArray[np.float32]:
    """The original module's 16-slice chunks over the whole plane, no overlap.

    Args:
        volume: ``(C, Z, Y, X)`` normalized float32 on the host.
        net: the network.
        divisor: the network's size divisor; x-y (and a short last chunk) are reflect-padded up to it.
        device: where the network runs.
        out_channels: channels the network returns.
        chunk: slices per chunk (the original's 16).
    """
    c, depth, height, width = volume.shape
    size = [max(divisor, math.ceil(s / divisor) * divisor) for s in (chunk, height, width)]
    out = np.empty((out_channels, depth, height, width), dtype=np.float32)
    with torch.inference_mode():
        for z in range(0, depth, chunk):
            block = volume[:, z : z + chunk]
            n = block.shape[1]
            pads = [(0, 0), (0, size[0] - n), (0, size[1] - height), (0, size[2] - width)]
            if any(p[1] for p in pads):
                mode = "reflect" if min(block.shape[1:]) > 1 and all(p[1] < s for p, s in zip(pads[1:], block.shape[1:])) else "edge"
                block = np.pad(block, pads, mode=mode)
            pred = net(torch.from_numpy(np.ascontiguousarray(block))[None].to(device))
            out[:, z : z + n] = pred[0, :, :n, :height, :width].float().cpu().numpy()
    return out
