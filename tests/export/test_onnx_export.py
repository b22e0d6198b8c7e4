"""model.onnx: checker, accuracy against torch, dynamic axes, one file, refusal of bad exports."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from tiny_bundles import make_tiny_bundle

from engine.backends.gate import load_sample, torch_probabilities
from engine.bundle import DEFAULT_BUNDLE_DIR, Bundle, load_bundle, write_bundle_json
from engine.errors import InputError
from export import onnx_export
from export.bundle_export import ExportOptions, export_bundle
from export.errors import ExportError
from export.onnx_export import MAX_ABS_ERR, export_onnx


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_export_writes_checked_single_file_onnx(exported: Bundle) -> None:
    path = exported.path / "model.onnx"
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == 18
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    assert sorted(p.name for p in exported.path.iterdir()) == ["bundle.json", "model.fp16.onnx", "model.onnx", "model.pt"]
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 1, "depth", "height", "width"]
    meta = {p.key: p.value for p in model.metadata_props}
    record = exported.export["onnx"]
    assert meta["cellseg3d.model_sha256"] == record["model_sha256"]
    assert record["max_abs_err"]["random"] <= MAX_ABS_ERR and record["max_abs_err"]["sample"] <= MAX_ABS_ERR
    assert record["tolerance"] == MAX_ABS_ERR and record["sample"].startswith("synthetic")


def test_onnx_matches_torch_on_other_shapes(exported: Bundle) -> None:
    """Spatial axes are dynamic: shapes other than the traced one match torch within 1e-4."""
    session = _session(exported.path / "model.onnx")
    model = exported.load_model()
    d = exported.divisor
    x = torch.randn((2, 1, 2 * d, 3 * d, d), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = model(x).numpy()
    (got,) = session.run(None, {"input": x.numpy()})
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= MAX_ABS_ERR


@pytest.mark.parametrize("name", ["model.onnx", "model.fp16.onnx"])
def test_dynamic_batch_gives_the_same_per_sample_results(exported: Bundle, name: str) -> None:
    session = _session(exported.path / name)
    x = np.random.default_rng(2).standard_normal((4, 1, *exported.patch_shape)).astype(np.float32)
    (whole,) = session.run(None, {"input": x})
    for n in (1, 2, 3):
        (part,) = session.run(None, {"input": x[:n]})
        np.testing.assert_allclose(part, whole[:n], rtol=0, atol=1e-5)  # kernels may differ by batch: float noise only
    singles = np.concatenate([session.run(None, {"input": x[i : i + 1]})[0] for i in range(4)])
    np.testing.assert_allclose(singles, whole, rtol=0, atol=1e-5)


@pytest.mark.parametrize("opset", [19, 20])
def test_other_opsets(tmp_path: Path, opset: int) -> None:
    bundle = make_tiny_bundle("UNet3D", tmp_path / "b")
    sample = load_sample(bundle)
    record = export_onnx(bundle, sample=sample, reference=torch_probabilities(bundle, sample), opset=opset)
    assert onnx.load(str(bundle.path / "model.onnx")).opset_import[0].version == opset
    assert record["opset"] == opset


def test_unsupported_opset_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="opset must be one of"):
        ExportOptions(opset=17)
    bundle = make_tiny_bundle("UNet3D", tmp_path / "b")
    with pytest.raises(InputError, match="opset"):
        export_onnx(bundle, sample=load_sample(bundle), reference=np.zeros(1, np.float32), opset=13)


def test_inaccurate_export_is_refused_and_not_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = make_tiny_bundle("UNet3D", tmp_path / "b")
    monkeypatch.setattr(onnx_export, "MAX_ABS_ERR", 0.0)
    sample = load_sample(bundle)
    with pytest.raises(ExportError, match=r"model\.onnx: ONNX Runtime differs from torch"):
        export_onnx(bundle, sample=sample, reference=torch_probabilities(bundle, sample))
    assert not (bundle.path / "model.onnx").exists()


@pytest.mark.skipif(not (DEFAULT_BUNDLE_DIR / "bundle.json").is_file(), reason="the shipped default bundle (engine/default_bundle) is not there yet")
def test_export_of_the_shipped_default_bundle(tmp_path: Path) -> None:
    from export.bundle_export import resolve_source

    bundle = resolve_source(DEFAULT_BUNDLE_DIR, out=tmp_path / "default")
    # the shipped weights and architecture on a smaller patch: the same graph, an eighth of the CPU time
    bundle = dataclasses.replace(bundle, patch_shape=tuple(min(p, q) for p, q in zip(bundle.patch_shape, (32, 64, 64))))
    write_bundle_json(bundle)
    summary = export_bundle(load_bundle(bundle.path), options=ExportOptions(tensorrt=False))
    exported = load_bundle(bundle.path)
    assert summary.ok, summary.lines
    assert max(exported.export["onnx"]["max_abs_err"].values()) <= MAX_ABS_ERR
    gate = exported.export["fp16"]["gate"]
    assert gate["passed"] and gate["dice"] >= 0.99


def test_model_onnx_computes_normalization_with_staged_reductions(exported: Bundle) -> None:
    from export.normalization import TAG

    model = onnx.load(str(exported.path / "model.onnx"))
    ops = [n.op_type for n in model.graph.node]
    assert "InstanceNormalization" not in ops
    reductions = [n for n in model.graph.node if n.op_type == "ReduceMean"]
    assert reductions and all(TAG in n.name for n in reductions)
    assert all(len(onnx.numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == n.input[1]))) == 1 for n in reductions)


def test_staged_normalization_is_exact_where_instance_norm_is_not() -> None:
    """ONNX Runtime's InstanceNormalization sums a whole group in one fp32 accumulator; the rewrite does not."""
    from export.normalization import stabilize_normalization
    from export.onnx_export import _trace

    norm = torch.nn.GroupNorm(4, 8).eval()
    x = torch.randn((1, 8, 32, 64, 64), generator=torch.Generator().manual_seed(0)) * 0.5 + 20.0
    plain = _trace(norm, x, 18)
    staged = onnx.ModelProto()
    staged.CopyFrom(plain)
    assert stabilize_normalization(staged) == 1
    with torch.no_grad():
        exact = norm.double()(x.double()).numpy()
    errors = {}
    for name, proto in (("plain", plain), ("staged", staged)):
        (y,) = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})
        errors[name] = float(np.abs(y - exact).max())
    assert errors["staged"] < 2e-5 < errors["plain"], errors
