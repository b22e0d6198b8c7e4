"""The TensorRT builder's API use, against a stand-in module with TensorRT 11's surface (no FP16 flag, no
EXPLICIT_BATCH), and the 2**31-element activation limit. The real build runs in test_trt_backend.py on a GPU.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import pytest
from tiny_bundles import make_tiny_bundle

from engine.backends.engine_key import Profile
from engine.backends.trt_build import BuildSettings, build_serialized_plan, check_max_batch, import_tensorrt, max_batch_for
from engine.errors import BundleError, InputError

PROFILE = Profile(channels=1, patch_shape=(16, 32, 32), min_spatial=(4, 4, 4), opt_batch=2, max_batch=4)


def test_activation_limit_caps_the_batch(tmp_path: Path) -> None:
    bundle = make_tiny_bundle("UNet3D", tmp_path / "tiny")
    # largest activation: 16 channels at full resolution (decoder input 8 + 16 -> 24 channels); 2**31 / (24 * 256**3) = 5
    assert max_batch_for(bundle, (256, 256, 256)) == (2**31 - 1) // (24 * 256**3)
    check_max_batch(bundle, (16, 32, 32), 64)
    with pytest.raises(InputError, match=r"--max-batch \d+ or less"):
        check_max_batch(bundle, (256, 256, 256), 64)


class _FakeTRT(types.ModuleType):
    def __init__(self, *, parse_ok: bool = True, build_ok: bool = True) -> None:
        super().__init__("tensorrt")
        self.__version__ = "11.4.0.106"
        self.calls: list[tuple[Any, ...]] = []
        calls, fake = self.calls, self

        class Logger:
            WARNING = 2

            def __init__(self, level: int) -> None:
                calls.append(("Logger", level))

        class Cache:
            def __init__(self, data: bytes) -> None:
                self.data = data

            def serialize(self) -> bytes:
                return self.data + b"+timings"

        class Config:
            def set_memory_pool_limit(self, pool: str, size: int) -> None:
                calls.append(("set_memory_pool_limit", pool, size))

            def set_flag(self, flag: str) -> None:
                calls.append(("set_flag", flag))

            def add_optimization_profile(self, profile: Any) -> None:
                calls.append(("add_optimization_profile", profile.shape))

            def create_timing_cache(self, data: bytes) -> Cache:
                calls.append(("create_timing_cache", bytes(data)))
                return Cache(bytes(data))

            def set_timing_cache(self, cache: Cache, ignore_mismatch: bool) -> bool:
                self.cache = cache
                return True

            def get_timing_cache(self) -> Cache:
                return self.cache

        class OptimizationProfile:
            def set_shape(self, name: str, lo: tuple, opt: tuple, hi: tuple) -> None:
                self.shape = (name, lo, opt, hi)

        class Builder:
            def __init__(self, logger: Logger) -> None:
                pass

            def create_network(self, flags: int) -> str:
                calls.append(("create_network", flags))
                return "network"

            def create_builder_config(self) -> Config:
                return Config()

            def create_optimization_profile(self) -> OptimizationProfile:
                return OptimizationProfile()

            def build_serialized_network(self, network: str, config: Config) -> bytes | None:
                return b"PLAN" if fake.build_ok else None

        class OnnxParser:
            num_errors = 0 if parse_ok else 1

            def __init__(self, network: str, logger: Logger) -> None:
                pass

            def parse_from_file(self, path: str) -> bool:
                calls.append(("parse_from_file", path))
                return fake.parse_ok

            def get_error(self, i: int) -> str:
                return "In node 3 (Conv): unsupported"

        self.parse_ok, self.build_ok = parse_ok, build_ok
        self.Logger, self.Builder, self.OnnxParser = Logger, Builder, OnnxParser
        self.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=1)
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
        self.BuilderFlag = types.SimpleNamespace(VERSION_COMPATIBLE="VERSION_COMPATIBLE", EXCLUDE_LEAN_RUNTIME="EXCLUDE_LEAN_RUNTIME")


def test_builder_uses_strong_typing_one_profile_workspace_and_timing_cache(tmp_path: Path) -> None:
    trt = _FakeTRT()
    cache = tmp_path / "timing.cache"
    settings = BuildSettings(workspace_bytes=1 << 30, timing_cache=cache)
    assert build_serialized_plan(trt, tmp_path / "m.onnx", PROFILE, settings=settings) == b"PLAN"
    assert ("create_network", 1 << 1) in trt.calls
    assert ("set_memory_pool_limit", "WORKSPACE", 1 << 30) in trt.calls
    assert ("add_optimization_profile", ("input", *PROFILE.shapes())) in trt.calls
    assert not any(c[0] == "set_flag" for c in trt.calls)
    assert ("create_timing_cache", b"") in trt.calls and cache.read_bytes() == b"+timings"
    build_serialized_plan(trt, tmp_path / "m.onnx", PROFILE, settings=settings)  # second build reuses the cache
    assert ("create_timing_cache", b"+timings") in trt.calls


def test_lean_build_is_version_compatible_without_the_lean_runtime(tmp_path: Path) -> None:
    trt = _FakeTRT()
    build_serialized_plan(trt, tmp_path / "m.onnx", PROFILE, settings=BuildSettings(version_compatible=True))
    assert ("set_flag", "VERSION_COMPATIBLE") in trt.calls and ("set_flag", "EXCLUDE_LEAN_RUNTIME") in trt.calls


def test_builder_failures_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=r"m\.onnx: TensorRT 11\.4\.0\.106 cannot parse it: In node 3"):
        build_serialized_plan(_FakeTRT(parse_ok=False), tmp_path / "m.onnx", PROFILE, settings=BuildSettings())
    with pytest.raises(RuntimeError, match=r"m\.onnx: TensorRT 11\.4\.0\.106 failed to build"):
        build_serialized_plan(_FakeTRT(build_ok=False), tmp_path / "m.onnx", PROFILE, settings=BuildSettings())


def test_lean_runtime_alone_is_found_and_cannot_build(monkeypatch: pytest.MonkeyPatch) -> None:
    lean = types.ModuleType("tensorrt_lean")
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setitem(sys.modules, "tensorrt_lean", lean)
    assert import_tensorrt() == (lean, False)
    monkeypatch.setitem(sys.modules, "tensorrt_lean", None)
    assert import_tensorrt() == (None, False)
