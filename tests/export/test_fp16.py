"""model.fp16.onnx: normalization stays fp32, I/O stays fp32, the accuracy gate against torch fp32."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from onnxconverter_common import float16

from engine.backends.gate import compare, load_sample
from engine.bundle import Bundle
from engine.metrics import foreground_dice
from export import fp16
from export.errors import ExportError
from export.fp16 import (
    _elem_types,
    _restore_fp32_outputs,
    convert_fp16,
    fp32_report,
    overflow_nodes,
)
from export.onnx_export import trace_model


def test_normalization_and_its_statistics_stay_fp32(exported: Bundle) -> None:
    model = onnx.load(str(exported.path / "model.fp16.onnx"))
    types = _elem_types(model)
    norms = [n for n in model.graph.node if n.op_type == "InstanceNormalization"]
    assert norms, "GroupNorm/InstanceNorm should export as InstanceNormalization"
    for node in norms:  # data, scale, bias and the normalized output: fp32
        assert all(types[name] == TensorProto.FLOAT for name in (*node.input, *node.output)), node.name
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert all(types[n.input[1]] == TensorProto.FLOAT16 for n in convs), "conv weights should be fp16"
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    report = fp32_report(model)
    assert report["normalization_nodes_fp32"] == len(norms) and report["conv_nodes_fp16"] == len(convs)
    assert exported.export["fp16"]["normalization_nodes_fp32"] == len(norms)


def test_groupnorm_lowering_is_reshape_instancenorm_reshape(exported: Bundle) -> None:
    if exported.architecture != "UNet3D":
        pytest.skip("only UNet3D has GroupNorm")
    model = onnx.load(str(exported.path / "model.fp16.onnx"))
    producers = {o: n for n in model.graph.node for o in n.output}
    for node in (n for n in model.graph.node if n.op_type == "InstanceNormalization"):
        upstream = producers[node.input[0]]
        while upstream.op_type == "Cast":
            upstream = producers[upstream.input[0]]
        assert upstream.op_type == "Reshape"  # (N, C, Z, Y, X) -> (N, groups, -1): group statistics in fp32


def test_fp16_gate_against_torch_fp32(exported: Bundle) -> None:
    gate = exported.export["fp16"]["gate"]
    assert gate["passed"] and gate["dice"] >= 0.99
    assert 0 < gate["max_prob_error"] < 0.05
    session = ort.InferenceSession(str(exported.path / "model.fp16.onnx"), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"input": np.zeros((1, 1, *exported.patch_shape), np.float32)})
    assert out.dtype == np.float32


def test_graph_output_left_fp16_is_restored_to_fp32() -> None:
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 2])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 2])
    graph = helper.make_graph([helper.make_node("Relu", ["input"], ["output"])], "g", [x], [y])
    model = float16.convert_float_to_float16(helper.make_model(graph), keep_io_types=False)
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    _restore_fp32_outputs(model)
    onnx.checker.check_model(model, full_check=True)
    (out,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"input": np.full((1, 2), 2.0, np.float16)}
    )
    assert out.dtype == np.float32


@pytest.mark.filterwarnings("ignore:the float32 number")
def test_fp32_report_refuses_fp16_normalization(exported: Bundle) -> None:
    _, model = trace_model(exported, opset=18, precision="fp32")
    bad = float16.convert_float_to_float16(model, keep_io_types=True)  # nothing blocked: InstanceNorm in fp16
    with pytest.raises(ExportError, match="must stay fp32"):
        fp32_report(bad)


def test_nodes_that_would_overflow_stay_fp32(exported_copy: Bundle, monkeypatch: pytest.MonkeyPatch) -> None:
    _, model = trace_model(exported_copy, opset=18, precision="fp32")
    sample = load_sample(exported_copy)
    hot, largest = overflow_nodes(model, sample, divisor=exported_copy.divisor, limit=1.0)
    assert hot and largest > 1.0
    assert set(hot) <= {n.name for n in model.graph.node}
    monkeypatch.setattr(fp16, "OVERFLOW_LIMIT", 1.0)
    record = convert_fp16(exported_copy, sample=sample, opset=18)
    converted = onnx.load(str(exported_copy.path / "model.fp16.onnx"))
    types = _elem_types(converted)
    kept = [n for n in converted.graph.node if n.name in set(record["fp32_nodes_overflow"])]
    assert kept and all(types[o] == TensorProto.FLOAT for n in kept for o in n.output)


def test_gate_compare_and_dice(exported: Bundle) -> None:
    rng = np.random.default_rng(0)
    k = len(exported.output.names)
    ref = rng.random((k, 4, 8, 8), dtype=np.float32)
    same = compare(exported, ref, ref.copy(), sample="s")
    assert same.passed and same.dice == 1.0 and same.max_prob_error == 0.0
    flipped = compare(exported, ref, 1.0 - ref, sample="s")
    assert not flipped.passed and flipped.dice < 0.99 and "FAILED" in flipped.summary()
    assert foreground_dice(np.zeros(3, bool), np.zeros(3, bool)) == 1.0
    with pytest.raises(ValueError, match="differ in shape"):
        compare(exported, ref, ref[:, :2], sample="s")


def test_sample_tif_in_the_bundle_is_used(exported_copy: Bundle, tmp_path: Path) -> None:
    import tifffile

    image = (np.random.default_rng(1).random((16, 32, 32)) * 1000).astype(np.uint16)
    tifffile.imwrite(exported_copy.path / "sample.tif", image)
    sample = load_sample(exported_copy)
    assert sample.source.endswith("sample.tif") and sample.data.shape == (1, 16, 32, 32)
