from __future__ import annotations

import json

import numpy as np
import pytest
from skimage.metrics import adapted_rand_error

from engine.errors import InputError
from engine.metrics import InstanceScores, foreground_dice, match_instances


def _blocks() -> np.ndarray:
    """Ground truth (ZYX uint16): four 4x10x10 boxes side by side (ids 1..4) and a background margin."""
    gt = np.zeros((6, 12, 44), dtype=np.uint16)
    for i in range(4):
        gt[1:5, 1:11, 1 + 10 * i : 11 + 10 * i] = i + 1
    return gt


def test_identical_labelings_are_perfect() -> None:
    gt = _blocks()
    scores = match_instances(gt, gt)
    assert (scores.n_pred, scores.n_gt, scores.tp, scores.fp, scores.fn) == (4, 4, 4, 0, 0)
    assert scores.precision == scores.recall == scores.f1 == 1.0
    assert scores.mean_matched_iou == pytest.approx(1.0)
    assert scores.adapted_rand_error == pytest.approx(0.0)


@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.uint64])
def test_permuted_ids_score_the_same(dtype) -> None:
    gt = _blocks()
    lut = np.array([0, 70, 3, 250, 9], dtype=dtype)
    scores = match_instances(lut[gt], gt)
    assert scores == match_instances(gt, gt)


def test_huge_ids_take_the_sorting_path() -> None:
    gt = _blocks()
    lut = np.array([0, 2**40, 5, 2**62, 17], dtype=np.uint64)
    assert match_instances(lut[gt], gt) == match_instances(gt, gt)


@pytest.mark.parametrize(("cut", "expected"), [(7, (5, 4, 1, 0)), (6, (5, 3, 2, 1))])
def test_split_cell(cut: int, expected) -> None:
    gt = _blocks()
    pred = gt.astype(np.int32)
    # split cell 1 (x 1..10) into x < cut and x >= cut
    pred[1:5, 1:11, cut:11] = 9
    scores = match_instances(pred, gt)
    assert (scores.n_pred, scores.tp, scores.fp, scores.fn) == expected
    # an exact 50/50 split gives IoU 0.5 for both halves: not > 0.5, so cell 1 is unmatched
    best = 0.6 if cut == 7 else 0.5
    assert scores.mean_matched_iou == pytest.approx((3 + best) / 4)


def test_merged_cells() -> None:
    gt = _blocks()
    pred = gt.copy()
    pred[pred == 2] = 1  # cells 1 and 2 merged, each IoU 0.5 with the merged object
    scores = match_instances(pred, gt)
    assert (scores.n_pred, scores.n_gt, scores.tp, scores.fp, scores.fn) == (3, 4, 2, 1, 2)
    assert scores.precision == pytest.approx(2 / 3)
    assert scores.recall == pytest.approx(0.5)
    assert scores.f1 == pytest.approx(4 / 7)
    assert scores.mean_matched_iou == pytest.approx((0.5 + 0.5 + 1 + 1) / 4)
    loose = match_instances(pred, gt, iou_threshold=0.3)  # now the merged object matches one of them
    assert (loose.tp, loose.fp, loose.fn) == (3, 0, 1)


def test_low_threshold_uses_optimal_not_greedy_matching() -> None:
    gt = np.zeros((1, 1, 40), dtype=np.int32)
    gt[..., :20], gt[..., 20:] = 1, 2
    pred = np.zeros_like(gt)
    pred[..., 6:30] = 1  # IoU 14/30 with gt 1, 10/34 with gt 2
    pred[..., :6] = 2  # IoU 6/20 with gt 1 only
    # greedy by IoU takes (1, 1) first and leaves pred 2 alone; the best matching has two pairs
    scores = match_instances(pred, gt, iou_threshold=0.25)
    assert (scores.tp, scores.fp, scores.fn) == (2, 0, 0)
    assert match_instances(pred, gt, iou_threshold=0.4).tp == 1


def test_empty_prediction() -> None:
    gt = _blocks()
    scores = match_instances(np.zeros_like(gt), gt)
    assert (scores.n_pred, scores.n_gt, scores.tp, scores.fp, scores.fn) == (0, 4, 0, 0, 4)
    assert scores.precision == scores.recall == scores.f1 == scores.mean_matched_iou == 0.0
    expected_are, _, _ = adapted_rand_error(gt, np.zeros_like(gt))
    assert scores.adapted_rand_error == pytest.approx(expected_are)


def test_empty_ground_truth_and_both_empty() -> None:
    gt = _blocks()
    only_pred = match_instances(gt, np.zeros_like(gt))
    assert (only_pred.tp, only_pred.fp, only_pred.fn) == (0, 4, 0)
    assert only_pred.precision == only_pred.f1 == only_pred.mean_matched_iou == 0.0
    assert only_pred.adapted_rand_error == 1.0
    both = match_instances(np.zeros_like(gt), np.zeros_like(gt))
    assert (both.n_pred, both.n_gt, both.tp) == (0, 0, 0)
    assert both.precision == both.recall == both.f1 == both.mean_matched_iou == 1.0
    assert both.adapted_rand_error == 0.0


def test_adapted_rand_error_matches_skimage() -> None:
    rng = np.random.default_rng(0)
    gt = np.repeat(rng.integers(0, 6, size=(4, 10, 10)), 2, axis=2)
    pred = gt.copy()
    noise = rng.random(gt.shape) < 0.2
    pred[noise] = rng.integers(0, 9, size=int(noise.sum()))
    scores = match_instances(pred, gt)
    expected, _, _ = adapted_rand_error(gt, pred)
    assert scores.adapted_rand_error == pytest.approx(expected)
    assert 0.0 < scores.adapted_rand_error < 1.0


def test_to_dict_is_json_ready() -> None:
    scores = match_instances(_blocks(), _blocks())
    data = scores.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert set(data) == set(InstanceScores.__dataclass_fields__)
    assert type(data["tp"]) is int and type(data["f1"]) is float


def test_bool_inputs_are_one_object_each() -> None:
    a = np.zeros((4, 4, 4), dtype=bool)
    a[:2] = True
    scores = match_instances(a, a)
    assert (scores.n_pred, scores.tp) == (1, 1)


@pytest.mark.parametrize(
    ("pred", "gt", "kwargs", "match"),
    [
        (np.zeros((2, 3, 4), np.int32), np.zeros((2, 3, 5), np.int32), {}, r"shapes differ: \(2, 3, 4\) vs \(2, 3, 5\)"),
        (np.zeros((2, 3, 4), np.float32), np.zeros((2, 3, 4), np.int32), {}, r"pred must be an integer.*float32"),
        (np.zeros((2, 3, 4), np.int32), np.full((2, 3, 4), -1, np.int16), {}, r"gt has negative labels \(min -1\)"),
        (np.zeros((2, 3, 4), np.int32), np.zeros((2, 3, 4), np.int32), {"iou_threshold": 1.0}, r"\[0, 1\), got 1.0"),
    ],
)
def test_bad_inputs(pred, gt, kwargs, match) -> None:
    with pytest.raises(InputError, match=match):
        match_instances(pred, gt, **kwargs)


def test_foreground_dice() -> None:
    empty = np.zeros((3, 4, 5), dtype=bool)
    half = empty.copy()
    half[:, :2] = True
    full = np.ones_like(empty)
    assert foreground_dice(empty, empty) == 1.0
    assert foreground_dice(empty, full) == 0.0
    assert foreground_dice(full, full) == 1.0
    assert foreground_dice(half, full) == pytest.approx(2 * 30 / (30 + 60))
    labels = half.astype(np.uint16) * 7  # label volumes count as masks of their nonzero voxels
    assert foreground_dice(labels, half) == 1.0


def test_foreground_dice_bad_inputs() -> None:
    mask = np.zeros((3, 4, 5), dtype=bool)
    with pytest.raises(InputError, match="shapes differ"):
        foreground_dice(mask, mask[:, :, :4])
    with pytest.raises(InputError, match="float64; threshold it first"):
        foreground_dice(mask.astype(np.float64), mask)
