"""The benchmark's method list: unique names on every CPU kind, emulated precisions skipped with the reason."""

from __future__ import annotations

import pytest

import benchmarks.measure as measure
from benchmarks.methods import default_methods, unavailable_reason


@pytest.mark.parametrize("native_bf16", [False, True])
def test_method_names_are_unique(monkeypatch: pytest.MonkeyPatch, native_bf16: bool) -> None:
    monkeypatch.setattr(measure, "cpu_has_native_bf16", lambda: native_bf16)
    for gpu in (False, True):
        names = [m.name for m in default_methods(gpu=gpu)]
        assert len(names) == len(set(names)), names
        assert "original-loop fp32" in names and "monai fp32" in names


def test_emulated_bf16_rows_are_skipped_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(measure, "cpu_has_native_bf16", lambda: False)
    methods = {m.name: m for m in default_methods(gpu=False)}
    assert "monai bf16" not in methods and "engine torch-cpu fp32 peer-patch" in methods
    reason = unavailable_reason(methods["engine torch-cpu bf16"])
    assert reason is not None and "emulated" in reason
    assert unavailable_reason(methods["model torch-cpu bf16"]) == reason
    assert unavailable_reason(methods["original-loop fp32"]) is None
    assert measure.native_precisions(measure.torch.device("cpu")) == ("fp32",)


def test_native_bf16_rows_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(measure, "cpu_has_native_bf16", lambda: True)
    methods = {m.name: m for m in default_methods(gpu=False)}
    assert "monai bf16" in methods and "engine torch-cpu bf16 peer-patch" in methods
    assert unavailable_reason(methods["engine torch-cpu bf16"]) is None
