"""Tiling is exact: an identity model returns its input, every voxel is covered, shifts leave no seams."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.errors import InputError
from engine.tiling import SlabGrid, TilingConfig, fit_patch_shape, importance_map, patch_starts, plan_patches, sliding_window

CPU = torch.device("cpu")


def identity(batch: torch.Tensor) -> torch.Tensor:
    return batch.clone()


@pytest.mark.parametrize("shape", [(33, 65, 65), (16, 32, 32), (5, 7, 9), (1, 40, 3), (40, 17, 70)])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5])
@pytest.mark.parametrize("padding", ["reflect", "constant"])
def test_identity_model_reproduces_input(shape: tuple[int, int, int], overlap: float, padding: str) -> None:
    # Values in [0, 1), like the probabilities the engine blends: float32 accumulation then stays within 1e-6.
    volume = np.random.default_rng(0).random((2, *shape), dtype=np.float32)
    config = TilingConfig(patch_shape=(16, 16, 32), overlap=overlap, batch_size=3, padding=padding)  # type: ignore[arg-type]
    out = sliding_window(volume, identity, config=config, out_channels=2, device=CPU)
    assert out.shape == (2, *shape)
    assert np.abs(out.numpy() - volume).max() <= 1e-6


def test_scaling_model_is_exact_and_channels_can_change() -> None:
    volume = np.random.default_rng(1).random((1, 20, 50, 30)).astype(np.float32)

    def two_channels(batch: torch.Tensor) -> torch.Tensor:
        return torch.cat([2 * batch, -batch], dim=1)

    out = sliding_window(volume, two_channels, config=TilingConfig(patch_shape=(8, 16, 16), overlap=0.5), out_channels=2, device=CPU)
    assert np.abs(out[0].numpy() - 2 * volume[0]).max() <= 1e-6
    assert np.abs(out[1].numpy() + volume[0]).max() <= 1e-6


@pytest.mark.parametrize("size, patch, overlap", [(65, 16, 0.25), (100, 32, 0.5), (32, 32, 0.5), (33, 32, 0.0), (10, 16, 0.25)])
def test_every_voxel_covered(size: int, patch: int, overlap: float) -> None:
    starts = patch_starts(max(size, patch), patch, overlap)
    covered = np.zeros(max(size, patch), bool)
    for s in starts:
        covered[s : s + patch] = True
    assert covered.all()
    assert starts == sorted(set(starts))
    assert starts[-1] + patch == max(size, patch)


def test_plan_is_the_product_of_the_axes() -> None:
    config = TilingConfig(patch_shape=(16, 32, 32), overlap=0.25)
    corners = plan_patches((40, 64, 100), config)
    assert len(corners) == len(patch_starts(40, 16, 0.25)) * len(patch_starts(64, 32, 0.25)) * len(patch_starts(100, 32, 0.25))


def test_shift_model_leaves_no_seams() -> None:
    """A model that shifts its patch by one voxel in x: away from the patch edges the blend is the shifted input."""
    x = np.arange(64, dtype=np.float32)
    volume = np.broadcast_to(x, (1, 24, 24, 64)).copy()

    def shift(batch: torch.Tensor) -> torch.Tensor:
        return torch.roll(batch, shifts=1, dims=-1)

    out = sliding_window(volume, shift, config=TilingConfig(patch_shape=(24, 24, 32), overlap=0.5), out_channels=1, device=CPU)
    profile = out[0, 12, 12].numpy()
    # Interior voxels of every patch see x-1; only a patch's first voxel wraps. Gaussian weights make the
    # wrapped voxel's share tiny, so the blended profile is x-1 within a small tolerance everywhere inside.
    interior = profile[4:-4]
    assert np.abs(interior - (x[4:-4] - 1)).max() < 0.05
    assert np.all(np.diff(interior) > 0.9)  # monotone: no jump at patch seams


def test_importance_map_is_positive_and_peaks_in_the_centre() -> None:
    w = importance_map((8, 16, 16), sigma_scale=0.125, device=CPU)
    assert w.min().item() >= 1e-3 and w.max().item() == pytest.approx(1.0)
    assert w[4, 8, 8] > w[0, 0, 0]


def test_fit_patch_shape_shrinks_to_divisor_multiples() -> None:
    assert fit_patch_shape((33, 300, 20), (64, 128, 128), 16) == (48, 128, 32)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"overlap": 1.0}, "overlap"), ({"batch_size": 0}, "batch size"), ({"padding": "wrap"}, "padding"), ({"patch_shape": (0, 8, 8)}, "patch")],
)
def test_bad_config_rejected(kwargs: dict, match: str) -> None:
    with pytest.raises(InputError, match=match):
        TilingConfig(**{"patch_shape": (8, 8, 8), **kwargs})


@pytest.mark.parametrize("z, rows, depth, halo, expected", [
    (128, 1, 48, 12, (36, 84, 128)),  # the 128x1024x1024 plan: the middle core no longer waits for the last group
    (129, 1, 24, 12, (12, 36, 60, 84, 108, 129)),  # a last group one plane deep makes no one-plane core
    (128, 1, 200, 12, (128,)),
    (128, None, 48, 12, (48, 96, 128)),  # one group: nothing is final before the end, so every depth planes
])
def test_cores_end_where_groups_finish_planes(z, rows, depth, halo, expected) -> None:
    grid = SlabGrid((z, 64, 64), TilingConfig(patch_shape=(32, 64, 64), overlap=0.25), rows)
    ends = grid.core_ends(depth, halo)
    assert ends == expected
    cores = np.diff((0, *ends))
    assert cores.max() <= depth and (len(cores) == 1 or cores[:-1].min() >= depth / 2)
    final = [grid.final_range(g)[1] for g in grid.groups]
    for start, end in zip((0, *ends), ends[:-1]):  # labelled once the group finishing its halo has run, or full depth
        assert end + halo in final or end - start == depth
