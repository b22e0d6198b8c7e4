"""Labelling on the model's grid: slab-by-slab resampling equals the whole-volume one, the route is taken only
where the model grid is finer, and every output comes back on the input grid, streamed or not."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch

from engine import segment, segment_file
from engine.bundle import DEFAULT_BUNDLE_DIR, load_bundle
from engine.labels import FinalLabels
from engine.metrics import match_instances
from engine.model_grid import ModelGrid, labels_on_model_grid
from engine.outputs import RunOutputs
from engine.pipeline import SegmentOptions
from engine.scale import ScalePlan, resample
from engine.streaming import ArraySource
from engine.synthetic import make_membrane_volume


def _nearest_centres(input_shape, model_shape):
    return np.ix_(*[np.minimum(np.floor((np.arange(n) + 0.5) * (m / n)).astype(int), m - 1) for n, m in zip(input_shape, model_shape)])


@pytest.mark.parametrize("input_shape, model_shape", [((10, 20, 24), (29, 18, 24)), ((7, 16, 16), (28, 20, 13)), ((5, 8, 8), (19, 8, 8))])
@pytest.mark.parametrize("step", [1, 4, 7])
@pytest.mark.parametrize("dtype", [np.float32, np.uint16])
def test_slab_by_slab_resampling_equals_the_whole_volume(input_shape, model_shape, step, dtype) -> None:
    """Reads of any slab equal one whole-volume :func:`resample`; probabilities fed back in any chunks equal the
    whole map resampled back; labels come back from the nearest model voxel centre. Tolerance: float32 sums
    in another order (measured <= 4e-7)."""
    rng = np.random.default_rng(step)
    volume = (rng.random((2, *input_shape), dtype=np.float32) * (1000 if dtype == np.uint16 else 1)).astype(dtype)
    grid = ModelGrid(input_shape, model_shape)
    whole = resample(torch.from_numpy(volume.astype(np.float32))[None], model_shape)[0].numpy()
    source = grid.source(ArraySource(volume))
    assert source.shape == (2, *model_shape)
    read = np.concatenate([source.read(a, min(a + step, model_shape[0])) for a in range(0, model_shape[0], step)], axis=1)
    np.testing.assert_allclose(read, whole, rtol=1e-5, atol=1e-6)  # float32 weights, another order

    whole = whole / whole.max()  # probabilities
    got: list[tuple[int, np.ndarray]] = []
    sink = grid.probabilities_back(lambda z0, chunk: got.append((z0, chunk)))
    for a in range(0, model_shape[0], step):
        sink(a, whole[:, a : a + step])
    assert [z0 for z0, _ in got] == list(np.cumsum([0] + [c.shape[1] for _, c in got[:-1]]))  # in order, no gap
    back = np.concatenate([c for _, c in got], axis=1)
    np.testing.assert_allclose(back, resample(torch.from_numpy(whole)[None], input_shape)[0].numpy(), atol=1e-6)

    labels = rng.integers(0, 1000, model_shape).astype(np.uint32)
    sampled = np.concatenate(list(grid.labels_back(iter([labels[a : a + step] for a in range(0, model_shape[0], step)]))))
    np.testing.assert_array_equal(sampled, labels[_nearest_centres(input_shape, model_shape)])


@pytest.mark.parametrize("zoom, finer", [
    ((3.0, 1.0, 1.0), True), ((1.9, 1.1, 0.9), True), ((1.0, 1.0, 1.0), False), ((0.8, 0.8, 0.8), False), ((3.0, 0.7, 0.7), False),
])
def test_the_route_is_taken_only_where_the_model_grid_is_finer(zoom, finer) -> None:
    """Measured (training.stress validation stacks): labelling on the model grid lifts z steps of 2-4x, and does
    not pay where the model grid is coarser (large cells)."""
    scale = ScalePlan(zoom, (5.0, 15.0, 15.0), "test")
    assert labels_on_model_grid(scale) is finer
    if finer:  # axes within the tolerance keep their size: the network sees them as they are
        grid = ModelGrid.for_scale((20, 50, 50), scale)
        assert grid.model_shape == (round(20 * zoom[0]), 50, 50)


@pytest.mark.parametrize("streamed", [False, True])
def test_cells_lost_between_input_planes_leave_no_gap_in_the_ids(tmp_path, streamed) -> None:
    """A cell on model planes no input plane samples vanishes on the way back; the ids left are 1..n."""
    grid = ModelGrid((2, 4, 4), (6, 4, 4))  # input plane 0 samples model plane 1, plane 1 samples plane 4
    model = np.zeros((6, 4, 4), np.uint32)
    model[0:3], model[3], model[4:] = 5, 7, 9  # provisional ids; 7 lies only on model plane 3
    outputs = RunOutputs(output_path=tmp_path / "labels.tif" if streamed else None)
    store, _ = outputs.open((1, 2, 4, 4), streamed=streamed, grid=grid)
    store.write(0, model)
    lut = np.zeros(10, np.uint32)
    lut[[5, 7, 9]] = [1, 2, 3]
    n_cells, chunks = outputs.labels(FinalLabels(lut=lut, n_cells=3), chunk=2)
    planes = np.concatenate(list(chunks))
    assert n_cells == 2
    np.testing.assert_array_equal(planes[:, 0, 0], [1, 2])
    np.testing.assert_array_equal(outputs.result(), planes)
    if streamed:
        assert list(tmp_path.iterdir()) == []  # the stores are unnamed temporary files


@pytest.fixture(scope="module")
def bundle():
    return load_bundle(DEFAULT_BUNDLE_DIR)


def test_streamed_file_on_the_model_grid_equals_the_in_memory_run(tmp_path, bundle) -> None:
    """A 3x z step labelled on the model grid: the streamed file run (4-plane input slabs, i.e. 12 model planes)
    writes label and probability TIFFs of the input's shape equal to the in-memory run's; no temporary file
    is left."""
    vol = make_membrane_volume((60, 80, 80), seed=4323, mean_cell_diameter=14.0)
    image = vol.image[::3]
    stack = tmp_path / "in.tif"
    tifffile.imwrite(stack, image, imagej=True, resolution=(1.0, 1.0), metadata={"spacing": 3.0, "unit": "um", "axes": "ZYX"})
    opts = SegmentOptions(backend="torch-cpu", precision="fp32", cell_diameter=14.0)
    whole = segment(image, bundle=bundle, options=opts, voxel_size_um=(3.0, 1.0, 1.0))
    assert whole.report.label_grid == "model" and f"labels=model-grid threshold={whole.report.threshold:g}" in whole.report.summary()
    assert whole.report.threshold == pytest.approx(bundle.postprocess.threshold - 2 * bundle.postprocess.threshold_per_upsampling)
    streamed = segment_file(stack, tmp_path / "labels.tif", bundle=bundle, options=SegmentOptions(**{**opts.__dict__, "slab_depth": 4}),
                            prob_path=tmp_path / "prob.tif")
    assert streamed.report.n_slabs > 1 and streamed.report.slab_depth == 12 and streamed.report.scale.zoom[0] == pytest.approx(3.0)
    labels = tifffile.imread(tmp_path / "labels.tif")
    probs = tifffile.imread(tmp_path / "prob.tif")[np.newaxis]  # the shipped model has one channel
    assert labels.shape == image.shape and probs.shape[1:] == image.shape
    np.testing.assert_array_equal(probs, whole.probabilities)
    ids = np.unique(labels)
    assert np.array_equal(ids, np.arange(streamed.n_cells + 1)) and streamed.n_cells > 20
    assert match_instances(labels, whole.labels).f1 >= 0.97  # the slabbed watershed's ties (engine.labels.slabs)
    np.testing.assert_array_equal(streamed.labels, labels)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.tif", "labels.tif", "prob.tif"]
