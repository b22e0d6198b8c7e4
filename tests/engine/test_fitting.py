"""Patch/batch fitting (measured once per device, cached) and the OOM back-off, exercised on the CPU with
stand-ins for the CUDA measurements."""

from __future__ import annotations

import json
import math

import pytest
import torch
from slab_helpers import ImageBackend

from engine.errors import InputError
from engine.fitting import BackoffRunner, fit_tiling


class TorchLike(ImageBackend):
    """Stands in for a torch backend (whose patch may grow); the measurements are faked."""

    name = "grows"
    can_grow_patch = True


class NamedTorchButFixed(ImageBackend):
    """Named like a torch backend but declaring a fixed patch: the capability decides, not the name."""

    name = "torch-named"


def fake_memory(base: float = 100e6, per_voxel: float = 400.0):
    """A stand-in for one CUDA forward pass: ``base + batch * voxels * per_voxel`` bytes, with a call log."""
    calls: list[tuple[tuple[int, int, int], int]] = []

    def measure(patch: tuple[int, int, int], batch: int) -> float:
        calls.append((patch, batch))
        return base + batch * math.prod(patch) * per_voxel

    return measure, calls


def test_cpu_keeps_the_bundles_patch_and_batch_one(tiny_bundle) -> None:
    fit = fit_tiling(tiny_bundle, ImageBackend(tiny_bundle), (100, 300, 300))
    assert (fit.patch_shape, fit.batch_size, fit.source) == ((16, 32, 32), 1, "bundle")
    fixed = fit_tiling(tiny_bundle, ImageBackend(tiny_bundle), (100, 300, 300), patch_shape=(8, 16, 16), batch_size=3)
    assert (fixed.patch_shape, fixed.batch_size, fixed.source) == ((8, 16, 16), 3, "options")


def test_largest_patch_and_batch_that_fit_are_chosen_and_cached(tiny_bundle, tmp_path) -> None:
    measure, calls = fake_memory()
    kw = {"cache_dir": tmp_path, "free_bytes": 2e9, "device_key": "fake-gpu-16GB"}
    fit = fit_tiling(tiny_bundle, TorchLike(tiny_bundle), (200, 512, 512), measure=measure, **kw)
    budget = 0.8 * 2e9
    voxels = math.prod(fit.patch_shape)
    assert fit.source == "measured"
    assert 100e6 + fit.batch_size * voxels * 400 <= budget < 100e6 + (fit.batch_size + 1) * voxels * 400 or fit.batch_size == 32
    assert voxels > math.prod((16, 32, 32))  # grew beyond the bundle's patch
    assert all(p % 4 == 0 for p in fit.patch_shape)
    # no larger candidate fits even one patch... or it was the largest candidate
    assert 100e6 + voxels * 400 <= budget
    again = fit_tiling(tiny_bundle, TorchLike(tiny_bundle), (200, 512, 512), measure=measure, **kw)
    assert again.source == "cache" and (again.patch_shape, again.batch_size) == (fit.patch_shape, fit.batch_size)
    assert len(calls) == len({c for c in calls})  # nothing measured twice
    cached = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert cached["key"]["device"] == "fake-gpu-16GB" and cached["key"]["backend"] == "grows"


def test_engines_built_for_a_patch_keep_it_and_cap_the_batch(tiny_bundle, tmp_path) -> None:
    measure, calls = fake_memory(per_voxel=1.0)
    fit = fit_tiling(tiny_bundle, ImageBackend(tiny_bundle), (200, 512, 512), measure=measure, free_bytes=8e9, cache_dir=tmp_path, device_key="x")
    assert fit.patch_shape == (16, 32, 32) and fit.batch_size == 8  # BackendOptions.max_batch
    assert {p for p, _ in calls} == {(16, 32, 32)}


def test_the_capability_not_the_name_decides_whether_the_patch_grows(tiny_bundle, tmp_path) -> None:
    measure, calls = fake_memory(per_voxel=1.0)
    fit = fit_tiling(tiny_bundle, NamedTorchButFixed(tiny_bundle), (200, 512, 512), measure=measure, free_bytes=8e9,
                     cache_dir=tmp_path, device_key="x")
    assert fit.patch_shape == (16, 32, 32) and fit.batch_size == 8 and {p for p, _ in calls} == {(16, 32, 32)}


def test_less_free_memory_gives_a_smaller_fit_from_the_same_cache(tiny_bundle, tmp_path) -> None:
    measure, _ = fake_memory()
    kw = {"cache_dir": tmp_path, "device_key": "fake"}
    roomy = fit_tiling(tiny_bundle, TorchLike(tiny_bundle), (200, 512, 512), measure=measure, free_bytes=8e9, **kw)
    tight = fit_tiling(tiny_bundle, TorchLike(tiny_bundle), (200, 512, 512), measure=measure, free_bytes=3e8, **kw)
    assert math.prod(tight.patch_shape) * tight.batch_size < math.prod(roomy.patch_shape) * roomy.batch_size


def test_a_fixed_patch_gets_a_fitted_batch_and_volume_caps_the_patch(tiny_bundle, tmp_path) -> None:
    measure, calls = fake_memory()
    fit = fit_tiling(tiny_bundle, TorchLike(tiny_bundle), (200, 512, 512), patch_shape=(32, 64, 64), measure=measure,
                     free_bytes=2e9, cache_dir=tmp_path, device_key="fake")
    assert fit.patch_shape == (32, 64, 64) and fit.batch_size > 1
    assert {p for p, _ in calls} == {(32, 64, 64)}
    small = fit_tiling(tiny_bundle, TorchLike(tiny_bundle), (10, 30, 30), measure=measure, free_bytes=2e9, cache_dir=tmp_path, device_key="fake")
    assert small.patch_shape == (12, 32, 32)  # never larger than the volume needs


def test_oom_during_measurement_stops_the_growth(tiny_bundle, tmp_path) -> None:
    def measure(patch, batch):
        return math.inf if math.prod(patch) > 16 * 32 * 32 * 4 else 1e6 * batch

    fit = fit_tiling(tiny_bundle, TorchLike(tiny_bundle), (200, 512, 512), measure=measure, free_bytes=1e12, cache_dir=tmp_path, device_key="x")
    assert math.prod(fit.patch_shape) <= 16 * 32 * 32 * 4


def test_bad_fixed_patch(tiny_bundle) -> None:
    with pytest.raises(InputError, match="multiples of 4"):
        fit_tiling(tiny_bundle, ImageBackend(tiny_bundle), (20, 20, 20), patch_shape=(6, 8, 8))


def test_backoff_halves_the_batch_and_loses_nothing() -> None:
    seen: list[int] = []
    limit = [3]

    def run(batch: torch.Tensor) -> torch.Tensor:
        seen.append(batch.shape[0])
        if batch.shape[0] > limit[0]:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return batch * 2

    runner = BackoffRunner(run, batch_size=8)
    x = torch.arange(8, dtype=torch.float32).reshape(8, 1, 1, 1, 1)
    torch.testing.assert_close(runner(x), 2 * x)
    assert seen == [8, 4, 2, 2, 2, 2] and runner.batch_size == 2 and runner.oom_retries == 2
    torch.testing.assert_close(runner(x[:5]), 2 * x[:5])  # the smaller batch is kept
    assert seen[6:] == [2, 2, 1]
    limit[0] = 0
    with pytest.raises(torch.cuda.OutOfMemoryError, match="single patch.*smaller --patch"):
        runner(x[:1])


class DeviceFull(RuntimeError):
    """A backend's own out-of-memory error (as ``Backend.oom_errors`` declares it)."""


def test_backoff_honours_the_backends_own_oom_errors() -> None:
    def run(batch: torch.Tensor) -> torch.Tensor:
        if batch.shape[0] > 1:
            raise DeviceFull("no room")
        return batch

    x = torch.zeros((4, 1, 1, 1, 1))
    with pytest.raises(DeviceFull):
        BackoffRunner(run, batch_size=4)(x)
    runner = BackoffRunner(run, batch_size=4, oom_errors=(DeviceFull,))
    assert runner(x).shape == x.shape and runner.batch_size == 1


def test_cpu_patch_shrinks_to_the_host_memory_and_keeps_the_training_context() -> None:
    """The default model's 64x256x256 patch needs ~4 GB of activations by the hooks' count: with 1 GiB
    for the network it shrinks, never below MIN_CPU_PATCH, and only for backends that take any patch."""
    from engine.bundle import load_bundle
    from engine.fitting import CPU_BATCH, MIN_CPU_PATCH, activation_bytes_per_voxel

    bundle = load_bundle(None)
    per_voxel = activation_bytes_per_voxel(bundle)
    assert 500 < per_voxel < 2000  # 16 feature maps at full resolution, a few alive at once
    reserve = lambda p: 16.0 * p[0] * 1024 * 1024  # noqa: E731 - one patch row's accumulators on 1024x1024 planes
    fit = fit_tiling(bundle, TorchLike(bundle), (128, 1024, 1024), reserve_bytes=reserve, host_bytes=2**30)
    assert fit.source == "host memory" and fit.batch_size == CPU_BATCH  # two patches a call: oneDNN's convolutions
    assert CPU_BATCH * per_voxel * math.prod(fit.patch_shape) + reserve(fit.patch_shape) <= 2**30
    assert all(p >= m for p, m in zip(fit.patch_shape, MIN_CPU_PATCH)) and fit.patch_shape[0] == 32
    roomy = fit_tiling(bundle, TorchLike(bundle), (128, 1024, 1024), reserve_bytes=reserve, host_bytes=64 * 2**30)
    assert (roomy.patch_shape, roomy.source, roomy.batch_size) == (bundle.patch_shape, "bundle", CPU_BATCH)
    unknown = fit_tiling(bundle, TorchLike(bundle), (128, 1024, 1024), reserve_bytes=reserve)
    assert (unknown.patch_shape, unknown.batch_size) == (bundle.patch_shape, 1)  # no host budget: as the bundle says
    fixed = fit_tiling(bundle, ImageBackend(bundle), (128, 1024, 1024), reserve_bytes=reserve, host_bytes=2**30)
    assert fixed.patch_shape == bundle.patch_shape  # an engine built for its patch keeps it


def test_activation_count_grows_with_the_feature_maps(tiny_bundle) -> None:
    from dataclasses import replace

    from engine.fitting import activation_bytes_per_voxel

    wide = replace(tiny_bundle, arch_kwargs={**tiny_bundle.arch_kwargs, "f_maps": 2 * tiny_bundle.arch_kwargs["f_maps"]})
    assert activation_bytes_per_voxel(wide) > 1.6 * activation_bytes_per_voxel(tiny_bundle)


def test_a_volume_the_patch_covers_is_cut_along_its_longest_side_into_the_fewest_patches() -> None:
    """At batch 1, the fewest patches that fit, each as short as that count allows: two patches of 64x256x148
    run 1.16x the voxels of 64x256x256, where halving sides for two patches a call ran 2.3x."""
    from engine.bundle import load_bundle
    from engine.fitting import activation_bytes_per_voxel
    from engine.tiling import patch_starts

    bundle = load_bundle(None)
    per_voxel = activation_bytes_per_voxel(bundle)
    whole = per_voxel * 64 * 256 * 256
    roomy = fit_tiling(bundle, TorchLike(bundle), (64, 256, 256), host_bytes=whole)
    assert (roomy.patch_shape, roomy.batch_size, roomy.source) == ((64, 256, 256), 1, "bundle")
    cut = fit_tiling(bundle, TorchLike(bundle), (64, 256, 256), host_bytes=0.95 * whole, overlap=0.25)
    assert (cut.patch_shape, cut.batch_size, cut.source) == ((64, 256, 148), 1, "host memory")
    assert len(patch_starts(256, 148, 0.25)) == 2 and len(patch_starts(256, 144, 0.25)) == 3
    tall = fit_tiling(bundle, TorchLike(bundle), (64, 200, 256), host_bytes=0.5 * whole, overlap=0.25)
    assert tall.patch_shape[:2] == (64, 200) and tall.batch_size == 1  # the longest side (x) is the one cut
    assert per_voxel * math.prod(tall.patch_shape) <= 0.5 * whole
    three = fit_tiling(bundle, TorchLike(bundle), (64, 256, 256), host_bytes=0.42 * whole, overlap=0.25)
    assert three.patch_shape == (64, 256, 104) and len(patch_starts(256, 104, 0.25)) == 3  # 100 would take 4
    assert len(patch_starts(256, 100, 0.25)) == 4
