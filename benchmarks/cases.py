"""The benchmark's inputs: volume sizes, the model bundle, the volume on disk, and the fp32 reference.

Every method is timed on the same :class:`Case`: the same bundle (the shipped default bundle when it is
installed, else the issue's reference network -- a UNet3D with random, seeded weights, ``f_maps=16``, 4
levels), the same synthetic membrane volume (``engine.synthetic.make_membrane_volume``, seed 0) written as
an ImageJ TIFF, and the same fp32 reference against which each run's foreground Dice is taken.

The reference is the network in fp32 on the whole volume in one pass when that fits (no tiling, so no
blending or border effects to inherit); otherwise the engine's exact tiled inference in fp32 with patches
of :data:`REFERENCE_PATCH_VOXELS` at overlap 0.5.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tifffile
import torch
from numpy.typing import NDArray

from engine.bundle import DEFAULT_BUNDLE_DIR, Bundle, Normalization, OutputSpec, PostprocessSpec, load_bundle, make_bundle
from engine.errors import BundleError, InputError
from engine.io import read_volume
from engine.normalize import normalize
from engine.synthetic import make_membrane_volume
from engine.tiling import TilingConfig, sliding_window

from .measure import TimedNetwork, foreground_mask

__all__ = ["SIZES", "Case", "parse_sizes", "bench_bundle", "make_case", "largest_patch", "fitted_patch", "reference_probabilities"]

logger = logging.getLogger(__name__)

# name -> (Z, Y, X). small runs on a 2-core CPU in minutes; medium and large are for GPU hosts.
SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (16, 48, 48),
    "small": (64, 256, 256),
    "medium": (128, 512, 512),
    "large": (256, 1024, 1024),
}
REFERENCE_SEED = 0
# The whole-volume reference needs activations of (f_maps[0] * 3) x voxels; past these it is tiled.
WHOLE_VOLUME_MAX_ELEMENTS = 2**31 - 1
REFERENCE_PATCH_VOXELS = 2**24


def parse_sizes(text: str, /) -> list[str]:
    """``"small,medium"`` -> ``["small", "medium"]``; unknown names raise InputError listing the known ones."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in SIZES]
    if unknown or not names:
        raise InputError(f"unknown size(s) {unknown or text!r}; choose from {', '.join(SIZES)}")
    return names


def _reference_template(path: Path) -> Bundle:
    """The issue's reference network: UNet3D f_maps 16, 4 levels, one boundary channel, 64x128x128 patches."""
    return Bundle(
        path=path,
        name="bench-random-unet3d-f16",
        description="random seeded weights (benchmark timing reference; Dice only measures numerics and tiling)",
        architecture="UNet3D",
        arch_kwargs={"in_channels": 1, "out_channels": 1, "f_maps": 16, "num_levels": 4, "layer_order": "gcr"},
        in_channels=1,
        normalization=Normalization(kind="percentile", low=1.0, high=99.8),
        output=OutputSpec(kind="boundary", channel=0, names=("boundary",)),
        patch_shape=(64, 128, 128),
        overlap=0.25,
        postprocess=PostprocessSpec(method="watershed", threshold=0.5, min_dist=10, label_threshd=10),
    )


def bench_bundle(work_dir: Path, /, *, prefer_default: bool = True) -> tuple[Bundle, str]:
    """The bundle to benchmark and a one-line note on where it came from.

    Args:
        work_dir: where a random reference bundle is written when the default one is not installed.
        prefer_default: use ``engine/default_bundle`` when it loads.
    """
    if prefer_default:
        try:
            bundle = load_bundle(DEFAULT_BUNDLE_DIR)
            return bundle, f"shipped default bundle {bundle.name!r} ({DEFAULT_BUNDLE_DIR})"
        except BundleError as exc:
            logger.warning("%s: default bundle not usable (%s); benchmarking the random reference UNet3D", DEFAULT_BUNDLE_DIR, exc)
    out = work_dir / "bench_bundle"
    state = torch.random.get_rng_state()
    torch.manual_seed(REFERENCE_SEED)
    try:
        bundle = make_bundle(None, out, template=_reference_template(out))
    finally:
        torch.random.set_rng_state(state)
    return bundle, "random reference UNet3D (f_maps 16, 4 levels, seed 0): timing reference, not a trained model"


@dataclass
class Case:
    """One volume to benchmark on.

    Attributes:
        size: the size name (see :data:`SIZES`).
        shape: ``(Z, Y, X)``.
        tiff: the volume on disk (ImageJ uint16, 1 um voxels), input of every end-to-end run.
        image: the same volume in memory ``(Z, Y, X)`` uint16.
        truth: the generator's ground-truth cell labels ``(Z, Y, X)`` uint32.
        reference_mask: foreground mask of the fp32 reference, ``(Z, Y, X)`` bool (set by
            :func:`reference_probabilities`).
        reference_labels: the reference's labels after the engine's post-processing.
        notes: how the reference was made, and the like.
    """

    size: str
    shape: tuple[int, int, int]
    tiff: Path
    image: NDArray[np.uint16]
    truth: NDArray[np.uint32] | None = None
    reference_mask: NDArray[np.bool_] | None = None
    reference_labels: NDArray[np.uint32] | None = None
    notes: dict[str, object] = field(default_factory=dict)

    @property
    def voxels(self) -> int:
        return int(np.prod(self.shape))


def make_case(size: str, work_dir: Path, /, *, shape: tuple[int, int, int] | None = None) -> Case:
    """Generate the seeded membrane volume for ``size`` and write it to ``work_dir/<size>.tif``."""
    shape = shape or SIZES[size]
    volume = make_membrane_volume(shape, seed=REFERENCE_SEED)
    path = work_dir / f"{size}.tif"
    tifffile.imwrite(path, volume.image, imagej=True, metadata={"axes": "ZYX", "spacing": 1.0, "unit": "um"}, resolution=(1.0, 1.0))
    return Case(size=size, shape=shape, tiff=path, image=volume.image, truth=volume.labels)


def largest_patch(shape: tuple[int, ...], divisor: int, /, *, max_voxels: int) -> tuple[int, int, int]:
    """The largest patch (sides multiples of ``divisor``) covering ``shape`` with at most ``max_voxels``.

    Sides are rounded up to the divisor; while over the budget the longest side is halved (rounded up to
    the divisor), so a 64x256x256 stack with a 2**23 budget is one 64x256x256 patch.
    """
    patch = [max(divisor, math.ceil(s / divisor) * divisor) for s in shape[-3:]]
    while math.prod(patch) > max_voxels and max(patch) > divisor:
        i = patch.index(max(patch))
        patch[i] = max(divisor, math.ceil(patch[i] / 2 / divisor) * divisor)
    return (patch[0], patch[1], patch[2])


def fitted_patch(shape: tuple[int, ...], patch: tuple[int, int, int], divisor: int, overlap: float, /) -> tuple[int, int, int]:
    """Per axis, the smallest patch (multiple of ``divisor``, at most ``patch``) that still covers the axis
    with as few patches as ``patch`` needs, neighbours sharing at least ``overlap * patch`` voxels.

    For 64x256x256, a 64x128x128 patch at overlap 0.25 and divisor 8 that is 64x112x112: the same 3x3 grid,
    1.72x the stack's voxels through the network instead of 2.25x.
    """
    out = []
    for size, top in zip(shape[-3:], patch):
        if size <= top:
            out.append(max(divisor, math.ceil(size / divisor) * divisor))
            continue
        need = math.ceil(overlap * top)
        n = math.ceil((size - need) / (top - need))
        out.append(min(top, math.ceil((size + (n - 1) * need) / n / divisor) * divisor))
    return (out[0], out[1], out[2])


def _whole_volume_fits(bundle: Bundle, shape: tuple[int, int, int], device: torch.device) -> bool:
    f0 = bundle.arch_kwargs.get("f_maps", 64)
    f0 = f0[0] if isinstance(f0, list) else int(f0)
    elements = 3 * f0 * math.prod(shape)
    if elements > WHOLE_VOLUME_MAX_ELEMENTS:
        return False
    need = 12 * f0 * math.prod(shape) * 4  # a handful of fp32 activations alive at once
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return need < 0.7 * free
    return need < 16 * 2**30


def reference_probabilities(case: Case, bundle: Bundle, /, *, device: torch.device) -> NDArray[np.float32]:
    """fp32 probabilities ``(K, Z, Y, X)`` of the reference run; also stores the mask on ``case``.

    The input goes through the engine's own reading and normalization, as in every other run.
    """
    data = read_volume(case.tiff, channels=bundle.in_channels).data
    net_input = normalize(data, bundle.normalization)
    model = bundle.load_model().to(device)
    divisor = bundle.divisor
    start = time.perf_counter()
    with torch.inference_mode():
        if _whole_volume_fits(bundle, case.shape, device):
            patch = largest_patch(case.shape, divisor, max_voxels=math.prod(case.shape) * 2)
            how = "fp32, whole volume in one pass"
        else:
            patch = largest_patch(case.shape, divisor, max_voxels=REFERENCE_PATCH_VOXELS)
            how = f"fp32, tiled {'x'.join(map(str, patch))} at overlap 0.5 (volume too large for one pass)"
        net = TimedNetwork(lambda b: model(b).float(), device)
        config = TilingConfig(patch_shape=patch, overlap=0.5, batch_size=1)
        out = sliding_window(net_input, net, config=config, out_channels=len(bundle.output.names), device=device)
        probs = out.cpu().numpy()
    case.notes["reference"] = how
    case.notes["reference_seconds"] = round(time.perf_counter() - start, 3)
    case.reference_mask = foreground_mask(probs, bundle)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return probs


def scratch_dir(prefix: str = "cellseg3d-bench-") -> Path:
    """A new temporary folder for the bundle and volumes of one run."""
    return Path(tempfile.mkdtemp(prefix=prefix))
