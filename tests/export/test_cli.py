"""``cellseg3d export``: exit codes, output lines, checkpoints, the TensorRT step where TensorRT is missing."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from tiny_bundles import make_tiny_bundle

from engine.bundle import load_bundle
from engine.cli import main
from engine.errors import BundleError
from engine.models import build_model
from export.checkpoint import bundle_from_checkpoint, infer_architecture

HAS_TRT_AND_GPU = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()


def test_export_cli_writes_both_onnx_files_and_records(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bundle = make_tiny_bundle("UNet3D", tmp_path / "b")
    assert main(["export", str(bundle.path), "--no-trt", "--opset", "18"]) == 0
    out = capsys.readouterr().out
    assert "model.onnx: fp32, opset 18" in out and "model.fp16.onnx: fp16" in out and "gate passed" in out
    doc = json.loads((bundle.path / "bundle.json").read_text())
    assert set(doc["export"]) == {"onnx", "fp16", "tensorrt"} and doc["export"]["tensorrt"] == {"skipped": "--no-trt given"}
    load_bundle(bundle.path)  # still a valid bundle


def test_export_cli_out_copies_the_bundle(tmp_path: Path) -> None:
    bundle = make_tiny_bundle("Modified3DUNet", tmp_path / "src")
    assert main(["export", str(bundle.path), "--out", str(tmp_path / "dst"), "--no-trt"]) == 0
    assert (tmp_path / "dst" / "model.fp16.onnx").is_file() and not (bundle.path / "model.onnx").exists()


@pytest.mark.skipif(HAS_TRT_AND_GPU, reason="checks the skip path, which a TensorRT + GPU host does not take")
def test_export_without_tensorrt_skips_the_plan_with_the_reason(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bundle = make_tiny_bundle("UNet3D", tmp_path / "b")
    assert main(["export", str(bundle.path)]) == 0
    out = capsys.readouterr().out
    assert "TensorRT plan: skipped" in out and "first run on a GPU host" in out
    assert load_bundle(bundle.path).export["tensorrt"]["skipped"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["export", "/nonexistent/bundle"], "no such bundle folder or checkpoint"),
        (["export", "{ckpt}"], "needs --out"),
        (["export", "{bundle}", "--max-batch", "0", "--no-trt"], "--max-batch must be >= 1"),
    ],
)
def test_export_cli_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    bundle = make_tiny_bundle("UNet3D", tmp_path / "b")
    argv = [a.format(ckpt=bundle.weights_path, bundle=bundle.path) for a in argv]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_corrupt_checkpoint_is_refused_with_its_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["export", str(bad), "--out", str(tmp_path / "b"), "--no-trt"]) == 2
    assert "bad.pt: cannot load checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("arch", "kwargs", "wrap"),
    [
        ("UNet3D", {"in_channels": 2, "out_channels": 3, "f_maps": [8, 16, 32]}, "model_state_dict"),
        ("Modified3DUNet", {"in_channels": 1, "n_classes": 2, "base_n_filter": 4}, "state_dict"),
    ],
)
def test_checkpoint_architecture_is_inferred(tmp_path: Path, arch: str, kwargs: dict, wrap: str) -> None:
    model = build_model(arch, kwargs)
    ckpt = tmp_path / "ckpt.pytorch"
    torch.save({wrap: model.state_dict(), "epoch": 3}, ckpt)
    bundle = bundle_from_checkpoint(ckpt, tmp_path / "b")
    assert bundle.architecture == arch
    assert {k: bundle.arch_kwargs[k] for k in kwargs} == kwargs
    loaded = bundle.load_model()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)


def test_unknown_state_dict_is_refused() -> None:
    with pytest.raises(BundleError, match="neither UNet3D"):
        infer_architecture({"fc.weight": torch.zeros(2, 2)}, where=Path("x.pt"))
