"""Normalization uses whole-volume statistics and refuses volumes it cannot normalize."""

from __future__ import annotations

import numpy as np
import pytest

from engine.bundle import Normalization
from engine.errors import InputError
from engine.normalize import normalize


def test_percentile_maps_low_high_to_0_1() -> None:
    vol = np.arange(1000, dtype=np.uint16).reshape(1, 10, 10, 10)
    out = normalize(vol, Normalization(kind="percentile", low=0.0, high=100.0))
    assert out.dtype == np.float32
    assert out.min() == pytest.approx(0.0) and out.max() == pytest.approx(1.0)


def test_zscore_is_zero_mean_unit_std_per_channel() -> None:
    rng = np.random.default_rng(0)
    vol = np.stack([rng.normal(5, 2, (8, 8, 8)), rng.normal(-3, 7, (8, 8, 8))]).astype(np.float32)
    out = normalize(vol, Normalization(kind="zscore"))
    assert np.abs(out.mean(axis=(1, 2, 3))).max() < 1e-5
    assert np.abs(out.std(axis=(1, 2, 3)) - 1).max() < 1e-4


def test_statistics_are_over_the_whole_volume_not_a_part() -> None:
    vol = np.zeros((1, 4, 4, 4), np.float32)
    vol[0, 2:] = 10.0
    out = normalize(vol, Normalization(kind="percentile", low=0.0, high=100.0))
    assert out[0, :2].max() == 0.0 and out[0, 2:].min() == 1.0


@pytest.mark.parametrize(
    "vol, match",
    [
        (np.full((1, 4, 4, 4), 7, np.uint8), "constant"),
        (np.where(np.arange(64).reshape(1, 4, 4, 4) == 5, np.nan, 1.0).astype(np.float32), "NaN"),
    ],
)
def test_unusable_volumes(vol: np.ndarray, match: str) -> None:
    with pytest.raises(InputError, match=match):
        normalize(vol, Normalization())
