"""The one accuracy gate for reduced precision: a candidate runner against torch fp32 on the bundle's sample.

Both run the engine's own tiled inference (same normalization, patches, blending) over the sample; the gate
compares the cell-interior masks (interior probability above the bundle's threshold) by Dice
(:func:`engine.metrics.foreground_dice`) and reports the largest and mean probability differences. A
candidate passes with Dice >= ``GATE_MIN_DICE`` (0.99). ``cellseg3d export`` gates its fp16 ONNX and plans
with it, and so does the TensorRT backend when it builds a plan on a GPU host.

The sample is ``sample.tif`` in the bundle when there is one (or the file ``bundle.json``'s
``validation.sample`` names), else a seeded synthetic volume of the bundle's kind (membranes for boundary
models, nuclei for foreground models) one patch in size.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from numpy.typing import NDArray

from .. import io
from ..bundle import Bundle
from ..errors import BundleError
from ..labels import interior_probability
from ..metrics import foreground_dice
from ..normalize import normalize
from ..tiling import TilingConfig, fit_patch_shape, sliding_window

__all__ = ["GATE_MIN_DICE", "GateResult", "Sample", "compare", "load_sample", "probabilities", "torch_probabilities"]

GATE_MIN_DICE = 0.99
SAMPLE_FILE = "sample.tif"
SAMPLE_SEED = 0

Runner = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Sample:
    """A normalized sample volume: ``data`` is ``(C, Z, Y, X)`` float32 network input on the host."""

    data: NDArray[np.float32]
    source: str


@dataclass(frozen=True)
class GateResult:
    """How a candidate's probabilities compare with torch fp32 on the sample."""

    dice: float
    max_prob_error: float
    mean_prob_error: float
    threshold: float
    min_dice: float
    passed: bool
    sample: str
    shape: tuple[int, ...]
    seconds: float = 0.0

    def to_json(self) -> dict[str, object]:
        return {**asdict(self), "shape": list(self.shape)}

    def summary(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        return (
            f"gate {verdict}: foreground Dice {self.dice:.5f} (min {self.min_dice}), max prob error "
            f"{self.max_prob_error:.2e}, mean {self.mean_prob_error:.2e} on {self.sample}"
        )


def _synthetic(bundle: Bundle) -> tuple[np.ndarray, str]:
    z, y, x = (max(8, p) for p in bundle.patch_shape)
    shape = (z, y, x)
    try:
        from .. import synthetic
    except ImportError:  # an engine without the generator: a seeded smooth random volume still exercises the model
        from scipy.ndimage import gaussian_filter

        rng = np.random.default_rng(SAMPLE_SEED)
        smooth = gaussian_filter(rng.random((bundle.in_channels, *shape), dtype=np.float32), sigma=(0, 2, 2, 2))
        return smooth, f"smooth random volume {shape} seed {SAMPLE_SEED}"
    if bundle.output.kind == "boundary":
        volume, kind = synthetic.make_membrane_volume(shape, seed=SAMPLE_SEED), "membrane"
    else:
        volume, kind = synthetic.make_nuclei_volume(shape, seed=SAMPLE_SEED), "nuclei"
    image = np.repeat(volume.image[np.newaxis], bundle.in_channels, axis=0)
    return image, f"synthetic {kind} volume {shape} seed {SAMPLE_SEED}"


def load_sample(bundle: Bundle, /) -> Sample:
    """The bundle's sample volume, normalized as the bundle says.

    Raises:
        BundleError: ``validation.sample`` names a file that is not there.
        InputError: the sample cannot be read or normalized.
    """
    named = bundle.validation.get("sample")
    path = bundle.path / (named if isinstance(named, str) else SAMPLE_FILE)
    if isinstance(named, str) and not path.is_file():
        raise BundleError(f"{bundle.path / 'bundle.json'}: validation.sample names {named!r}, which is not in the bundle")
    if path.is_file():
        raw = io.read_volume(path, channels=bundle.in_channels).data
        source = str(path)
    else:
        raw, source = _synthetic(bundle)
    if raw.ndim == 3:
        raw = raw[np.newaxis]
    return Sample(data=normalize(raw, bundle.normalization), source=source)


def probabilities(bundle: Bundle, sample: Sample, run: Runner, /, *, device: torch.device, batch_size: int = 1) -> NDArray[np.float32]:
    """``(K, Z, Y, X)`` probabilities of ``run`` over the sample, tiled and blended as the engine does."""
    config = TilingConfig(
        patch_shape=fit_patch_shape(sample.data.shape[1:], bundle.patch_shape, bundle.divisor),
        overlap=bundle.overlap,
        batch_size=batch_size,
    )
    out = sliding_window(sample.data, run, config=config, out_channels=len(bundle.output.names), device=device)
    return out.cpu().numpy()


def torch_probabilities(bundle: Bundle, sample: Sample, /, *, device: torch.device | None = None) -> NDArray[np.float32]:
    """The reference: the bundle's model in fp32 (no TF32, no autocast) on ``device`` (None: the CPU)."""
    device = device or torch.device("cpu")
    model = bundle.load_model().to(device)

    def run(batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(batch).float()

    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        return probabilities(bundle, sample, run, device=device)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32


def compare(
    bundle: Bundle, reference: NDArray[np.float32], candidate: NDArray[np.float32], /, *, sample: str,
    min_dice: float = GATE_MIN_DICE, started: float | None = None,
) -> GateResult:
    """Gate ``candidate`` against ``reference`` (both ``(K, Z, Y, X)`` float32 probabilities)."""
    if reference.shape != candidate.shape:
        raise ValueError(f"probability maps differ in shape: {reference.shape} vs {candidate.shape}")
    threshold = bundle.postprocess.threshold
    ref_mask = interior_probability(reference, bundle.output) > threshold
    cand_mask = interior_probability(candidate, bundle.output) > threshold
    diff = np.abs(reference.astype(np.float64) - candidate.astype(np.float64))
    score = foreground_dice(ref_mask, cand_mask)
    return GateResult(
        dice=round(score, 6), max_prob_error=float(diff.max()), mean_prob_error=float(diff.mean()),
        threshold=threshold, min_dice=min_dice, passed=score >= min_dice, sample=sample,
        shape=tuple(reference.shape), seconds=round(time.perf_counter() - started, 3) if started else 0.0,
    )
