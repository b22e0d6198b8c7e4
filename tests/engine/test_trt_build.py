"""The TensorRT builder's API use, against a stand-in module built from the real 11.4 bindings' enums and
signatures (tests/engine/trt_api_snapshot.json, checked against the wheels in test_trt_real_packages.py), and
the 2**31-element activation limit. The real build runs in test_trt_backend.py on a GPU.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import pytest
from api_names import load_snapshot, snapshot_enum
from tiny_bundles import make_tiny_bundle

from engine.backends.engine_key import Profile
from engine.backends.trt_build import (
    BuildSettings,
    build_serialized_plan,
    check_max_batch,
    import_tensorrt,
    max_batch_for,
)
from engine.errors import BackendUnavailableError, BundleError, InputError

PROFILE = Profile(channels=1, patch_shape=(16, 32, 32), min_spatial=(4, 4, 4), opt_batch=2, max_batch=4)


def test_activation_limit_caps_the_batch(tmp_path: Path) -> None:
    bundle = make_tiny_bundle("UNet3D", tmp_path / "tiny")
    # largest activation: 16 channels at full resolution (decoder input 8 + 16 -> 24 channels); 2**31 / (24 * 256**3) = 5
    assert max_batch_for(bundle, (256, 256, 256)) == (2**31 - 1) // (24 * 256**3)
    check_max_batch(bundle, (16, 32, 32), 64)
    with pytest.raises(InputError, match=r"--max-batch \d+ or less"):
        check_max_batch(bundle, (256, 256, 256), 64)


_REAL = load_snapshot()["tensorrt"]  # the real 11.x bindings' enums and signatures (checked in CI)


def _checked(cls_name: str, name: str, fn: Any) -> Any:
    """Wrap a stand-in method so a call with a keyword or arity the real method lacks fails the test."""
    params = _REAL["methods"][f"{cls_name}.{name}"]

    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        assert len(args) <= len(params) and set(kwargs) <= set(params), f"{cls_name}.{name}{args, kwargs} vs {params}"
        return fn(self, *args, **kwargs)

    return call


def _standin_class(cls_name: str, methods: dict[str, Any]) -> type:
    return type(cls_name, (), {name: _checked(cls_name, name, fn) for name, fn in methods.items()})


class _FakeTRT(types.ModuleType):
    """TensorRT 11.4's builder surface: enums with the real values, methods with the real parameter names."""

    def __init__(self, *, parse_ok: bool = True, build_ok: bool = True, cuda_ok: bool = True) -> None:
        super().__init__("tensorrt")
        self.__version__ = _REAL["version"]
        self.calls: list[tuple[Any, ...]] = []
        calls = self.calls
        for name in _REAL["enums"]:
            if "." not in name:
                setattr(self, name, snapshot_enum(_REAL, name))
        severity = snapshot_enum(_REAL, "ILogger.Severity")

        class ILogger:
            Severity = severity

            def __init__(self) -> None:
                pass

        def create_timing_cache(self: Any, data: bytes) -> Any:
            calls.append(("create_timing_cache", bytes(data)))
            if data and not bytes(data).startswith(b"TC"):
                return None  # what the real config gives for a corrupt cache
            return types.SimpleNamespace(data=bytes(data), serialize=lambda: b"TC+timings")

        def set_timing_cache(self: Any, cache: Any, ignore_mismatch: bool) -> bool:
            self.cache = cache
            return True

        config = _standin_class("IBuilderConfig", {
            "set_memory_pool_limit": lambda self, pool, pool_size: calls.append(("set_memory_pool_limit", pool, pool_size)),
            "set_flag": lambda self, flag: calls.append(("set_flag", flag)),
            "add_optimization_profile": lambda self, profile: calls.append(("add_optimization_profile", profile.shape)),
            "create_timing_cache": create_timing_cache, "set_timing_cache": set_timing_cache,
            "get_timing_cache": lambda self: self.cache,
        })
        profile = _standin_class("IOptimizationProfile", {"set_shape": lambda self, input, min, opt, max: setattr(self, "shape", (input, min, opt, max))})
        builder = _standin_class("Builder", {
            "create_network": lambda self, flags: calls.append(("create_network", flags)) or "network",
            "create_builder_config": lambda self: config(), "create_optimization_profile": lambda self: profile(),
            "build_serialized_network": lambda self, network, config: b"PLAN" if build_ok else None,
        })

        def make_builder(trt_logger: Any) -> Any:
            assert isinstance(trt_logger, ILogger)
            if not cuda_ok:
                raise TypeError("pybind11::init(): factory function returned nullptr")
            return builder()

        parser = _standin_class("OnnxParser", {
            "parse_from_file": lambda self, model: calls.append(("parse_from_file", model)) or parse_ok,
            "get_error": lambda self, index: "In node 3 (Conv): unsupported",
        })
        parser.num_errors = 0 if parse_ok else 1
        self.ILogger, self.Builder, self.OnnxParser = ILogger, make_builder, lambda network, trt_logger: parser()


def test_builder_uses_strong_typing_one_profile_workspace_and_timing_cache(tmp_path: Path) -> None:
    trt = _FakeTRT()
    cache = tmp_path / "timing.cache"
    settings = BuildSettings(workspace_bytes=1 << 30, timing_cache=cache)
    assert build_serialized_plan(trt, tmp_path / "m.onnx", PROFILE, settings=settings) == b"PLAN"
    assert ("create_network", 1 << 0) in trt.calls  # STRONGLY_TYPED is 0 in 11.x
    assert ("set_memory_pool_limit", trt.MemoryPoolType.WORKSPACE, 1 << 30) in trt.calls
    assert ("add_optimization_profile", ("input", *PROFILE.shapes())) in trt.calls
    assert not any(c[0] == "set_flag" for c in trt.calls)
    assert ("create_timing_cache", b"") in trt.calls and cache.read_bytes() == b"TC+timings"
    build_serialized_plan(trt, tmp_path / "m.onnx", PROFILE, settings=settings)  # second build reuses the cache
    assert ("create_timing_cache", b"TC+timings") in trt.calls


def test_corrupt_timing_cache_is_replaced_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    trt = _FakeTRT()
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"\x00garbage")
    assert build_serialized_plan(trt, tmp_path / "m.onnx", PROFILE, settings=BuildSettings(timing_cache=cache)) == b"PLAN"
    assert ("create_timing_cache", b"\x00garbage") in trt.calls and ("create_timing_cache", b"") in trt.calls
    assert "timing cache is corrupt" in caplog.text and cache.read_bytes() == b"TC+timings"


def test_lean_build_is_version_compatible_and_embeds_the_lean_runtime(tmp_path: Path) -> None:
    trt = _FakeTRT()
    build_serialized_plan(trt, tmp_path / "m.onnx", PROFILE, settings=BuildSettings(version_compatible=True))
    flags = [c[1] for c in trt.calls if c[0] == "set_flag"]
    assert flags == [trt.BuilderFlag.VERSION_COMPATIBLE]  # no EXCLUDE_LEAN_RUNTIME: no load_runtime needed to run it


def test_builder_failures_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=r"m\.onnx: TensorRT 11\.4\.0\.106 cannot parse it: In node 3"):
        build_serialized_plan(_FakeTRT(parse_ok=False), tmp_path / "m.onnx", PROFILE, settings=BuildSettings())
    with pytest.raises(RuntimeError, match=r"m\.onnx: TensorRT 11\.4\.0\.106 failed to build"):
        build_serialized_plan(_FakeTRT(build_ok=False), tmp_path / "m.onnx", PROFILE, settings=BuildSettings())
    with pytest.raises(BackendUnavailableError, match="cannot create its builder.*nullptr"):
        build_serialized_plan(_FakeTRT(cuda_ok=False), tmp_path / "m.onnx", PROFILE, settings=BuildSettings())


def test_lean_runtime_alone_is_found_and_cannot_build(monkeypatch: pytest.MonkeyPatch) -> None:
    lean = types.ModuleType("tensorrt_lean")
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setitem(sys.modules, "tensorrt_lean", lean)
    assert import_tensorrt() == (lean, False)
    monkeypatch.setitem(sys.modules, "tensorrt_lean", None)
    assert import_tensorrt() == (None, False)
