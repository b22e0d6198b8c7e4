"""Test-time flip averaging: the mean of the eight mirror images, whatever the backend does with its buffers."""

from __future__ import annotations

import itertools

import numpy as np
import tifffile
import torch

from engine import SegmentOptions, segment, segment_file
from engine.flips import FLIPS, FlipAveraged


def _cumsum_x(batch: torch.Tensor) -> torch.Tensor:
    """A run no flip leaves alone: running sums along x."""
    return torch.cumsum(batch, dim=4)


def test_flips_are_every_mirror_image_once() -> None:
    assert FLIPS[0] == () and len(set(FLIPS)) == 8
    assert set(FLIPS) == {c for k in range(4) for c in itertools.combinations((2, 3, 4), k)}


def test_a_flip_equivariant_run_is_unchanged() -> None:
    batch = torch.from_numpy(np.random.default_rng(0).random((2, 1, 4, 6, 8), dtype=np.float32))
    np.testing.assert_allclose(FlipAveraged(torch.sigmoid)(batch).numpy(), torch.sigmoid(batch).numpy(), rtol=0, atol=1e-6)


def test_output_is_the_mean_over_mirror_images() -> None:
    a = np.random.default_rng(1).random((2, 1, 3, 5, 7), dtype=np.float32)
    expected = np.mean([np.flip(np.cumsum(np.flip(a, f), axis=4), f) for f in FLIPS], axis=0)
    got = FlipAveraged(_cumsum_x)(torch.from_numpy(a)).numpy()
    assert not np.allclose(got, np.cumsum(a, axis=4), atol=1e-3)  # the flips changed the answer
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_a_reused_output_buffer_is_not_overwritten() -> None:
    """A run that writes every answer into one buffer (a guard: no backend may be relied on not to)."""
    batch = torch.from_numpy(np.random.default_rng(2).random((1, 1, 4, 4, 4), dtype=np.float32))
    buffer = torch.empty_like(batch)

    def into_buffer(b: torch.Tensor) -> torch.Tensor:
        return torch.cumsum(b, dim=4, out=buffer)

    np.testing.assert_allclose(FlipAveraged(into_buffer)(batch).numpy(), FlipAveraged(_cumsum_x)(batch).numpy(), atol=1e-6)


def test_segment_averages_the_mirror_images_of_the_stack(tiny_bundle) -> None:
    """One patch covers the stack, so flipping each patch is flipping the stack: the run with ``tta`` equals
    the mean of eight plain runs on the flipped stack, flipped back (fp32, float32 sums: 1e-5)."""
    volume = np.random.default_rng(3).random((16, 32, 32)).astype(np.float32)
    plain = SegmentOptions(patch_shape=(16, 32, 32), batch_size=1, precision="fp32", rescale="off")
    runs = [np.flip(segment(np.flip(volume, tuple(a - 2 for a in f)).copy(), bundle=tiny_bundle, options=plain).probabilities,
                    tuple(a - 1 for a in f)) for f in FLIPS]
    result = segment(volume, bundle=tiny_bundle, options=SegmentOptions(**{**plain.__dict__, "tta": True}))
    assert result.report.tta and "tta=flips8" in result.report.summary()
    assert result.labels.shape == volume.shape
    assert np.abs(runs[1] - runs[0]).max() > 1e-3  # the random network is not flip invariant
    np.testing.assert_allclose(result.probabilities, np.mean(runs, axis=0), rtol=0, atol=1e-5)


def test_streamed_file_with_tta_equals_the_in_memory_run(tiny_bundle, tmp_path) -> None:
    """The flips wrap the backend under the slab loop: a stack streamed in 4-plane slabs gets the same
    probabilities as the whole stack in memory (the same patches, blended in the same order)."""
    volume = (np.random.default_rng(4).random((20, 40, 44)) * 1000).astype(np.uint16)
    stack = tmp_path / "in.tif"
    tifffile.imwrite(stack, volume)
    opts = SegmentOptions(patch_shape=(8, 16, 16), batch_size=2, precision="fp32", rescale="off", tta=True)
    whole = segment(volume, bundle=tiny_bundle, options=opts)
    streamed = segment_file(stack, tmp_path / "labels.tif", bundle=tiny_bundle, prob_path=tmp_path / "prob.tif",
                            options=SegmentOptions(**{**opts.__dict__, "slab_depth": 4}))
    assert streamed.report.n_slabs > 1 and streamed.report.tta
    probs = np.moveaxis(tifffile.imread(tmp_path / "prob.tif"), 1, 0)  # written as ZCYX
    np.testing.assert_array_equal(probs, whole.probabilities)
    plain = segment(volume, bundle=tiny_bundle, options=SegmentOptions(**{**opts.__dict__, "tta": False}))
    assert np.abs(plain.probabilities - probs).max() > 1e-3  # the streamed run did average the flips
