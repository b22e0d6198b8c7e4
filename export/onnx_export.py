"""Bundle -> ``model.onnx``: fp32, dynamic batch and spatial axes, one self-contained file, checked.

The network is traced with torch's TorchScript-based exporter (``dynamo=False``): it needs no extra package
and lowers GroupNorm to ``Reshape -> InstanceNormalization -> Reshape -> Mul -> Add``, so the fp16 step can
keep every normalization's statistics in fp32 by blocking one op type (see ``export/fp16.py``). In
``model.onnx`` each InstanceNormalization is then rewritten with per-axis reductions
(``export/normalization.py``): ONNX Runtime's own kernel sums whole groups in one fp32 accumulator and
misses torch by 5e-3 on the shipped model.

The file is kept only if ``onnx.checker`` (full check) passes and ONNX Runtime on the CPU matches torch
fp32 within ``MAX_ABS_ERR`` on a random batch and on the bundle's sample volume.
"""

from __future__ import annotations

import io
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from numpy.typing import NDArray

from engine.atomic import atomic_write_bytes
from engine.backends.engine_key import INPUT_NAME, ONNX_FILE, OUTPUT_NAME, sha256_file
from engine.backends.gate import Sample, probabilities
from engine.bundle import Bundle
from engine.errors import InputError

from .errors import ExportError
from .normalization import stabilize_normalization

__all__ = ["DEFAULT_OPSET", "MAX_ABS_ERR", "OPSETS", "export_onnx", "ort_cpu_runner", "trace_model", "write_model"]

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 18
OPSETS = (18, 19, 20)
MAX_ABS_ERR = 1e-4
RANDOM_BATCH = 2
RANDOM_SIDE = 64
_DYNAMIC = {0: "batch", 2: "depth", 3: "height", 4: "width"}
_MAX_PROTO_BYTES = 2**31 - 1  # protobuf's limit for a single-file model


def _trace(model: torch.nn.Module, example: torch.Tensor, opset: int) -> onnx.ModelProto:
    buffer = io.BytesIO()
    with warnings.catch_warnings(record=True) as caught, torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("always")
        torch.onnx.export(  # the TorchScript exporter writes to a file object too
            model, (example,), buffer,  # type: ignore[arg-type]
            dynamo=False, opset_version=opset, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: _DYNAMIC, OUTPUT_NAME: _DYNAMIC}, do_constant_folding=True, export_params=True,
        )
    for item in caught:  # tracer chatter (deprecation of the TorchScript exporter, shape-as-bool notes)
        logger.debug("torch.onnx.export: %s", str(item.message).splitlines()[0])
    return onnx.load_from_string(buffer.getvalue())


def _annotate(proto: onnx.ModelProto, bundle: Bundle, *, model_sha256: str, precision: str) -> None:
    """Record where the graph came from in the model's metadata (ONNX Runtime shows it as ``custom_metadata_map``)."""
    meta = {
        "cellseg3d.bundle": bundle.name,
        "cellseg3d.architecture": bundle.architecture,
        "cellseg3d.model_sha256": model_sha256,
        "cellseg3d.precision": precision,
    }
    kept = [p for p in proto.metadata_props if p.key not in meta]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    proto.doc_string = f"cellseg3d bundle {bundle.name!r} ({bundle.architecture}), {precision}"


def trace_model(bundle: Bundle, /, *, opset: int, precision: str) -> tuple[torch.nn.Module, onnx.ModelProto]:
    """The bundle's model (fp32, CPU, eval) and its traced graph, annotated with where it came from.

    Raises:
        InputError: an unsupported opset.
    """
    if opset not in OPSETS:
        raise InputError(f"opset must be one of {list(OPSETS)}, got {opset}")
    model = bundle.load_model()
    side = 2 * bundle.divisor
    proto = _trace(model, torch.rand((1, bundle.in_channels, side, side, side)), opset)
    _annotate(proto, bundle, model_sha256=sha256_file(bundle.weights_path), precision=precision)
    return model, proto


def check_and_serialize(proto: onnx.ModelProto, path: Path, /) -> bytes:
    """Full ``onnx.checker`` pass and serialization to one file's bytes.

    Raises:
        ExportError: the checker rejects the graph, or it would not fit one file.
    """
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"{path}: onnx.checker rejects the exported graph: {exc}") from exc
    data = proto.SerializeToString()
    if len(data) > _MAX_PROTO_BYTES:
        raise ExportError(f"{path}: {len(data)} bytes exceed the 2 GiB single-file ONNX limit")
    return data


def write_model(path: Path, data: bytes, /) -> str:
    """Write ``data`` to ``path`` atomically; returns its sha256."""
    atomic_write_bytes(path, data)
    return sha256_file(path)


def ort_cpu_runner(model: bytes | str, /) -> Any:
    """A function ``(N, C, Z, Y, X)`` CPU tensor -> probabilities tensor, running ``model`` on ONNX Runtime's CPU EP."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])

    def run(batch: torch.Tensor) -> torch.Tensor:
        (y,) = session.run([OUTPUT_NAME], {INPUT_NAME: batch.detach().float().contiguous().numpy()})
        return torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32))

    return run


def _random_error(model: torch.nn.Module, run: Any, bundle: Bundle, seed: int) -> float:
    generator = torch.Generator().manual_seed(seed)
    side = max(RANDOM_SIDE, bundle.divisor)  # a batch of small patches: the sample check covers the full patch
    spatial = tuple(min(p, side) for p in bundle.patch_shape)
    x = torch.randn((RANDOM_BATCH, bundle.in_channels, *spatial), generator=generator)
    with torch.inference_mode():
        expected = model(x).numpy()
    return float(np.abs(run(x).numpy() - expected).max())


def export_onnx(
    bundle: Bundle, /, *, sample: Sample, reference: NDArray[np.float32], opset: int = DEFAULT_OPSET, seed: int = 0
) -> dict[str, Any]:
    """Write ``<bundle>/model.onnx`` and return its export record (for ``bundle.json``'s ``export.onnx``).

    Args:
        bundle: the bundle to export; its ``model.pt`` is traced on the CPU in fp32.
        sample: the normalized sample volume (``engine.backends.gate.load_sample``).
        reference: torch fp32 probabilities ``(K, Z, Y, X)`` on ``sample`` (``engine.backends.gate.torch_probabilities``).
        opset: ONNX opset, one of ``OPSETS``.
        seed: seed of the random comparison batch.

    Raises:
        InputError: an unsupported opset.
        ExportError: checker failure, or ONNX Runtime differs from torch by more than ``MAX_ABS_ERR``;
            nothing is written then.
    """
    started = time.perf_counter()
    path = bundle.path / ONNX_FILE
    model, proto = trace_model(bundle, opset=opset, precision="fp32")
    model_sha = sha256_file(bundle.weights_path)
    rewritten = stabilize_normalization(proto)
    data = check_and_serialize(proto, path)
    run = ort_cpu_runner(data)
    errors = {
        "random": _random_error(model, run, bundle, seed),
        "sample": float(np.abs(probabilities(bundle, sample, run, device=torch.device("cpu")) - reference).max()),
    }
    worst = max(errors.values())
    if not worst <= MAX_ABS_ERR:
        raise ExportError(
            f"{path}: ONNX Runtime differs from torch fp32 by {worst:.2e} (random {errors['random']:.2e}, "
            f"sample {errors['sample']:.2e}) > {MAX_ABS_ERR}; not written"
        )
    sha = write_model(path, data)
    logger.info("%s: written (opset %d, max abs error %.2e)", path, opset, worst)
    return {
        "file": ONNX_FILE, "sha256": sha, "model_sha256": model_sha, "opset": opset, "bytes": len(data),
        "dynamic_axes": {INPUT_NAME: list(_DYNAMIC.values()), OUTPUT_NAME: list(_DYNAMIC.values())},
        "max_abs_err": errors, "tolerance": MAX_ABS_ERR, "sample": sample.source,
        "normalization": f"{rewritten} InstanceNormalization node(s) computed with per-axis fp32 reductions (export/normalization.py)",
        "exporter": f"torch {torch.__version__} (TorchScript exporter)",
        "checked_with": f"onnx {onnx.__version__}, onnxruntime {ort.__version__} CPU",
        "seconds": round(time.perf_counter() - started, 2),
    }
