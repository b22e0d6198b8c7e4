"""The traced model -> ``model.fp16.onnx``: fp16 weights and activations, fp32 inputs/outputs, normalization in fp32.

Converter: ``onnxconverter_common.float16.convert_float_to_float16`` (Microsoft's ONNX converter toolkit,
pure Python, runs on a CPU CI). NVIDIA ModelOpt's AutoCast is what TensorRT 11's migration guide names,
but its ONNX extra pins onnxruntime-gpu, cupy and an older onnx; ONNX Runtime's own
``onnxruntime.transformers.float16`` is a fork of the same code tuned for transformer graphs, and on these
UNets it leaves the graph unsorted (``onnx.checker`` rejects it).

What stays fp32 (DESIGN.md: fp16 normalization overflows and is the known cause of wrong fp16 3D-UNet
engines):

- every normalization op: ``InstanceNormalization`` (also what the exporter lowers GroupNorm to, so the
  group statistics are computed in fp32), ``GroupNormalization``, ``LayerNormalization``, and the ops a
  decomposed normalization computes its statistics with (``ReduceMean``, ``ReduceSumSquare``, ``Pow``,
  ``Sqrt``), should another exporter produce them;
- the final ``Sigmoid``/``Softmax``, so probabilities are not quantized to fp16;
- any node whose fp32 output on the sample volume exceeds ``OVERFLOW_LIMIT`` (a quarter of fp16's range),
  found by running the fp32 graph with every intermediate exposed;
- the converter's own block list (``Resize`` among others).

:func:`fp32_report` reads the converted graph back and fails unless every normalization node's inputs and
outputs are fp32; the accuracy gate (``engine/backends/gate.py``) then compares it with torch fp32.
"""

from __future__ import annotations

import logging
import time
import warnings
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper
from onnxconverter_common import __version__ as converter_version
from onnxconverter_common import float16

from engine.backends.engine_key import FP16_FILE, INPUT_NAME, sha256_file
from engine.backends.gate import Sample
from engine.bundle import Bundle

from .errors import ExportError
from .onnx_export import check_and_serialize, trace_model, write_model

__all__ = ["NORMALIZATION_OPS", "OP_BLOCK_LIST", "OVERFLOW_LIMIT", "convert_fp16", "fp32_report", "overflow_nodes"]

logger = logging.getLogger(__name__)

NORMALIZATION_OPS = ("InstanceNormalization", "GroupNormalization", "LayerNormalization")
_STATISTICS_OPS = ("ReduceMean", "ReduceSumSquare", "Pow", "Sqrt")
_PROBABILITY_OPS = ("Sigmoid", "Softmax")
OP_BLOCK_LIST = [*float16.DEFAULT_OP_BLOCK_LIST, *NORMALIZATION_OPS, *_STATISTICS_OPS, *_PROBABILITY_OPS]
OVERFLOW_LIMIT = 2.0**14
_PROBE_SIDE = 32


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every named value in the graph (inputs, outputs, initializers, inferred values)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.output, *graph.value_info)}
    types.update({init.name: init.data_type for init in graph.initializer})
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    types[node.output[0]] = attr.t.data_type
    return types


def overflow_nodes(
    model: onnx.ModelProto, sample: Sample, /, *, divisor: int, limit: float = OVERFLOW_LIMIT
) -> tuple[list[str], float]:
    """Nodes of the fp32 ``model`` whose outputs exceed ``limit`` in magnitude on a central crop of the sample.

    The crop is at most ``_PROBE_SIDE`` voxels a side (a multiple of the network's ``divisor``), so every
    intermediate of one small patch fits in memory at once.

    Returns:
        ``(node names, largest magnitude seen)``.
    """
    types = _elem_types(model)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    outputs = {o.name for o in probe.graph.output}
    producers: dict[str, str] = {}
    for node in probe.graph.node:
        for name in node.output:
            if name and types.get(name) == TensorProto.FLOAT and name not in outputs and node.op_type != "Constant":
                probe.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
                producers[name] = node.name
    sides = [(min(s, max(_PROBE_SIDE, divisor)) // divisor) * divisor for s in sample.data.shape[1:]]
    if min(sides) == 0:
        return [], 0.0
    crop = tuple(slice((s - c) // 2, (s - c) // 2 + c) for s, c in zip(sample.data.shape[1:], sides))
    x = np.ascontiguousarray(sample.data[(slice(None), *crop)][np.newaxis])
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(probe.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    hot, largest = [], 0.0
    for name, value in zip(names, session.run(names, {INPUT_NAME: x})):
        peak = float(np.abs(value).max()) if value.size else 0.0
        largest = max(largest, peak)
        if peak > limit and name in producers:
            hot.append(producers[name])
    return sorted(set(hot)), largest


def _drop_identities(model: onnx.ModelProto) -> None:
    """Remove ``Identity`` nodes (the TorchScript exporter emits them for shared constants).

    The converter types an Identity's output inconsistently when a node reading it is blocked, which
    ``onnx.checker`` rejects; an Identity computes nothing, so its readers read its input instead.
    """
    graph = model.graph
    outputs = {o.name for o in graph.output}
    for node in [n for n in graph.node if n.op_type == "Identity" and n.output[0] not in outputs]:
        source, target = node.input[0], node.output[0]
        graph.node.remove(node)
        for other in graph.node:
            other.input[:] = [source if i == target else i for i in other.input]
        kept = [v for v in graph.value_info if v.name != target]
        del graph.value_info[:]
        graph.value_info.extend(kept)


def _restore_fp32_outputs(model: onnx.ModelProto) -> None:
    """Make graph outputs fp32 again where the converter left them fp16 (it does when their producer is blocked).

    Such an output is produced by a ``Cast(to=FLOAT16)`` of an fp32 value; the cast is dropped and the fp32
    value is renamed to the output.
    """
    graph = model.graph
    for output in graph.output:
        if output.type.tensor_type.elem_type != TensorProto.FLOAT16:
            continue
        producer = next((n for n in graph.node if output.name in n.output), None)
        to = next((a.i for a in producer.attribute if a.name == "to"), None) if producer is not None else None
        if producer is not None and producer.op_type == "Cast" and to == TensorProto.FLOAT16:
            source = producer.input[0]
            graph.node.remove(producer)
            for node in graph.node:
                node.output[:] = [output.name if o == source else o for o in node.output]
                node.input[:] = [output.name if i == source else i for i in node.input]
            kept = [v for v in graph.value_info if v.name != source]
            del graph.value_info[:]
            graph.value_info.extend(kept)
        else:
            cast_in = f"{output.name}_fp16"
            for node in graph.node:
                node.output[:] = [cast_in if o == output.name else o for o in node.output]
                node.input[:] = [cast_in if i == output.name else i for i in node.input]
            graph.node.append(helper.make_node("Cast", [cast_in], [output.name], to=TensorProto.FLOAT, name=f"{output.name}_to_fp32"))
        output.type.tensor_type.elem_type = TensorProto.FLOAT


def fp32_report(model: onnx.ModelProto, /) -> dict[str, Any]:
    """Check the converted graph: normalization in fp32, fp32 graph inputs/outputs, the rest mostly fp16.

    Raises:
        ExportError: a normalization node reads or writes a non-fp32 tensor, or an input/output is not fp32.
    """
    types = _elem_types(model)
    wrong = []
    norm_nodes = [n for n in model.graph.node if n.op_type in NORMALIZATION_OPS]
    for node in norm_nodes:
        for name in (*node.input, *node.output):
            if name and types.get(name) != TensorProto.FLOAT:
                wrong.append(f"{node.name or node.op_type}:{name} is {TensorProto.DataType.Name(types.get(name, 0))}")
    for value in (*model.graph.input, *model.graph.output):
        if value.type.tensor_type.elem_type != TensorProto.FLOAT:
            wrong.append(f"graph {value.name} is {TensorProto.DataType.Name(value.type.tensor_type.elem_type)}")
    if wrong:
        raise ExportError(f"{FP16_FILE}: values that must stay fp32 are not: {', '.join(wrong[:6])}")
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    fp16_convs = sum(types.get(n.input[0]) == TensorProto.FLOAT16 for n in convs)
    return {
        "normalization_nodes_fp32": len(norm_nodes),
        "conv_nodes_fp16": fp16_convs,
        "conv_nodes": len(convs),
        "casts": sum(n.op_type == "Cast" for n in model.graph.node),
    }


def convert_fp16(bundle: Bundle, /, *, sample: Sample, opset: int) -> dict[str, Any]:
    """Write ``<bundle>/model.fp16.onnx`` and return its record (without the gate).

    The source is the model traced again at ``opset`` (the graph ``model.onnx`` holds before its
    normalization rewrite): InstanceNormalization stays one op, which TensorRT runs as its own
    normalization kernel, in fp32 here.

    Raises:
        ExportError: the converted graph fails the checker or :func:`fp32_report`; nothing is written.
    """
    started = time.perf_counter()
    path = bundle.path / FP16_FILE
    _, model = trace_model(bundle, opset=opset, precision="fp16")
    _drop_identities(model)
    hot, largest = overflow_nodes(model, sample, divisor=bundle.divisor, limit=OVERFLOW_LIMIT)
    if hot:
        logger.warning("%s: %d node(s) exceed %g on the sample and stay fp32: %s", path, len(hot), OVERFLOW_LIMIT, ", ".join(hot[:8]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = float16.convert_float_to_float16(model, keep_io_types=True, op_block_list=OP_BLOCK_LIST, node_block_list=hot)
    if caught:  # "the float32 number 1e-08 will be truncated to 1e-07": weights below fp16's useful range
        logger.info("%s: converter clamped %d tiny constant(s) (e.g. %s)", path, len(caught), str(caught[0].message))
    _restore_fp32_outputs(converted)
    model_sha = sha256_file(bundle.weights_path)
    data = check_and_serialize(converted, path)
    report = fp32_report(converted)
    sha = write_model(path, data)
    return {
        "file": FP16_FILE, "sha256": sha, "model_sha256": model_sha, "source": f"torch trace, opset {opset}",
        "bytes": len(data), "converter": f"onnxconverter-common {converter_version} convert_float_to_float16(keep_io_types=True)",
        "op_block_list_extra": [op for op in OP_BLOCK_LIST if op not in float16.DEFAULT_OP_BLOCK_LIST],
        "fp32_nodes_overflow": hot, "max_abs_activation": largest, "overflow_limit": OVERFLOW_LIMIT, **report,
        "seconds": round(time.perf_counter() - started, 2),
    }
