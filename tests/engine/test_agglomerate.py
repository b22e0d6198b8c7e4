"""Average-linkage agglomeration on a toy graph, and through the slab labeller."""

from __future__ import annotations

import numpy as np

from engine.labels import EdgeTable, agglomerate
from engine.bundle import OutputSpec, PostprocessSpec
from engine.labels import MemoryLabelStore, SlabLabeler


def _table(edges: dict[tuple[int, int], tuple[float, int]]) -> EdgeTable:
    table = EdgeTable()
    pairs = np.array(list(edges), dtype=np.int64)
    mean, count = (np.array(column) for column in zip(*edges.values()))
    table.add_faces(pairs[:, 0], pairs[:, 1], mean * count, count.astype(np.int64))
    return table


def _sizes(by_id: dict[int, int]) -> np.ndarray:
    sizes = np.zeros(max(by_id) + 1, dtype=np.int64)
    sizes[list(by_id)] = list(by_id.values())
    return sizes


def test_weakest_boundary_merges_first_and_faces_are_pooled() -> None:
    # 1-2 weak (0.1), 2-3 strong (0.9), 1-3 weakish (0.45 over 10 faces): after 1+2 merge, the pooled
    # boundary to 3 is (0.9*30 + 0.45*10)/40 = 0.7875, above the threshold: 3 stays apart.
    table = _table({(1, 2): (0.1, 20), (2, 3): (0.9, 30), (1, 3): (0.45, 10)})
    merges = agglomerate(table, _sizes({1: 100, 2: 50, 3: 100}), threshold=0.5, min_size=0)
    assert merges == [(1, 2)]


def test_slivers_join_their_weakest_neighbour_whatever_the_boundary() -> None:
    table = _table({(1, 2): (0.9, 20), (2, 3): (0.95, 5), (3, 4): (0.99, 40)})
    merges = agglomerate(table, _sizes({1: 500, 2: 8, 3: 400, 4: 600}), threshold=0.5, min_size=20)
    assert merges == [(1, 2)]


def test_no_merge_above_the_threshold() -> None:
    assert agglomerate(_table({(1, 2): (0.6, 5)}), _sizes({1: 10, 2: 10}), threshold=0.5, min_size=0) == []


def _two_cells_split_by_a_false_seed() -> np.ndarray:
    """(1, Z, Y, X) boundary: a real wall at x=20, and a faint dip splitting the left cell."""
    boundary = np.zeros((1, 12, 24, 40), dtype=np.float32)
    boundary[..., 19:21] = 1.0
    boundary[..., :, 9:11] = 0.05  # a faint crease inside the left cell
    boundary[..., 0:2, :] = 0.0
    return boundary


def _label(boundary: np.ndarray, spec: PostprocessSpec, depth: int) -> np.ndarray:
    shape = boundary.shape[1:]
    store = MemoryLabelStore(shape)
    out = OutputSpec(kind="boundary", channel=0, names=("boundary",))
    labeler = SlabLabeler(shape, output=out, spec=spec, sampling=None, depth=depth, halo=8, store=store)
    labeler.push(0, boundary)
    final = labeler.finish()
    return final.lut[store.labels]


def test_slab_labeller_merges_over_slab_borders_alike() -> None:
    boundary = _two_cells_split_by_a_false_seed()
    plain = PostprocessSpec(method="watershed", threshold=0.5, min_dist=3, label_threshd=1)
    merged = PostprocessSpec(method="watershed", threshold=0.5, min_dist=3, label_threshd=1, merge_threshold=0.5)
    assert _label(boundary, plain, depth=12).max() > 2  # the seeds over-segment the left cell
    whole = _label(boundary, merged, depth=12)
    assert whole.max() == 2 and len(np.unique(whole[..., :19])) == 1 and len(np.unique(whole[..., 21:])) == 1
    slabbed = _label(boundary, merged, depth=4)
    assert slabbed.max() == 2 and np.array_equal(slabbed > 0, whole > 0)


def test_faces_pooled_a_few_planes_at_a_time_are_the_whole_pieces() -> None:
    """add_piece pools a slab's faces ``planes`` z-planes at a time (bounded memory), the chunks on
    ``threads`` threads; the table is the same for any chunking: pairs and counts exactly, sums up to the
    order of float64 additions (and bit for bit for any number of threads)."""
    rng = np.random.default_rng(3)
    for shape in [(9, 7, 8), (1, 5, 5), (4, 6, 6)]:
        labels = rng.integers(0, 6, shape).astype(np.uint32)
        boundary = rng.random(shape).astype(np.float32)
        tables = []
        for planes in (100, 4, 1):
            table = EdgeTable()
            table.add_piece(labels, boundary, planes=planes)
            tables.append(table)
            threaded = EdgeTable()
            threaded.add_piece(labels, boundary, planes=planes, threads=3)
            assert all(np.array_equal(a, b) for a, b in zip(
                (threaded.u, threaded.v, threaded.sums, threaded.counts), (table.u, table.v, table.sums, table.counts)))
        whole = tables[0]
        assert len(whole) > 0
        for table in tables[1:]:
            assert np.array_equal(table.u, whole.u) and np.array_equal(table.v, whole.v)
            assert np.array_equal(table.counts, whole.counts)
            np.testing.assert_allclose(table.sums, whole.sums, rtol=1e-12)
