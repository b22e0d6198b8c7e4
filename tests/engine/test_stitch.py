"""Slab-by-slab labelling equals whole-volume labelling: exactly for components, with a halo for the watershed."""

from __future__ import annotations

import numpy as np
import pytest
from slab_helpers import differing_fraction, membrane_probs, nuclei_probs, same_up_to_permutation

from engine.bundle import OutputSpec, PostprocessSpec
from engine.labels import label_cells
from engine.labels import FileLabelStore, MemoryLabelStore, SlabLabeler, UnionFind

BOUNDARY = OutputSpec(kind="boundary", channel=0, names=("boundary", "interior"))
FOREGROUND = OutputSpec(kind="foreground", channel=0, names=("foreground",))


def slabbed(probs, *, output, spec, depth, halo, chunk=5, sampling=None, store=None, tile=None, ends=None):
    """Push ``probs`` in ``chunk``-plane pieces through a SlabLabeler; final labels and the labeler."""
    shape = probs.shape[1:]
    store = store or MemoryLabelStore(shape)
    labeler = SlabLabeler(shape, output=output, spec=spec, sampling=sampling, depth=depth, halo=halo, store=store, threads=1,
                          tile=tile, ends=ends)
    done = sum(labeler.push(z0, probs[:, z0 : z0 + chunk]) for z0 in range(0, shape[0], chunk))
    assert done == np.prod(shape)
    final = labeler.finish()
    return final.lut[store.labels], labeler, final


def crossing_cells(labels: np.ndarray, depth: int) -> int:
    """How many cells have voxels on both sides of some slab border."""
    crossing = set()
    for border in range(depth, labels.shape[0], depth):
        below, above = set(np.unique(labels[:border])), set(np.unique(labels[border:]))
        crossing |= (below & above) - {0}
    return len(crossing)


@pytest.fixture(scope="module")
def membrane() -> np.ndarray:
    return membrane_probs((60, 48, 52), seed=1)


@pytest.fixture(scope="module")
def saturated() -> np.ndarray:
    return membrane_probs((60, 48, 52), seed=1, ties=True)


@pytest.fixture(scope="module")
def nuclei() -> np.ndarray:
    return nuclei_probs((60, 48, 52), seed=2)


@pytest.fixture(scope="module")
def wide() -> np.ndarray:
    return membrane_probs((36, 96, 100), seed=3)


def crossing_tiles(labels: np.ndarray, tile: int) -> int:
    """How many cells have voxels on both sides of some xy tile border."""
    crossing = set()
    for axis in (1, 2):
        for border in range(tile, labels.shape[axis], tile):
            below, above = (set(np.unique(part)) for part in np.split(labels, [border], axis=axis))
            crossing |= (below & above) - {0}
    return len(crossing)


def u_shapes(shape=(40, 20, 30)) -> np.ndarray:
    """Foreground objects that are connected only far away in z: two columns joined at the top (a U upside
    down), a stair, single voxels, and a plane that touches every slab border."""
    fg = np.zeros(shape, np.float32)
    fg[2:38, 3:6, 3:6] = fg[2:38, 3:6, 12:15] = 1  # two columns...
    fg[35:38, 3:6, 3:15] = 1  # ...joined only at z 35..37
    for i in range(10):
        fg[i * 3 : i * 3 + 4, 10 + i % 3, 20 + i] = 1  # a stair crossing many borders
    fg[::7, 15, 25] = 1  # single voxels (dropped by label_threshd=2)
    fg[:, 18, :] = 1  # a sheet through every slab
    return fg[np.newaxis]


@pytest.mark.parametrize("depth", [1, 3, 7, 16, 40])
@pytest.mark.parametrize("label_threshd", [1, 2, 50])
def test_components_are_exact_for_any_depth(depth: int, label_threshd: int) -> None:
    probs = u_shapes()
    spec = PostprocessSpec(method="components", threshold=0.5, label_threshd=label_threshd)
    whole = label_cells(probs, output=FOREGROUND, spec=spec)
    got, _, final = slabbed(probs, output=FOREGROUND, spec=spec, depth=depth, halo=0)
    assert final.n_cells == whole.max()
    assert same_up_to_permutation(whole, got)


@pytest.mark.parametrize("depth", [8, 13, 20])
def test_components_on_membrane_cells_are_exact(membrane: np.ndarray, depth: int) -> None:
    spec = PostprocessSpec(method="components", threshold=0.5, label_threshd=5)
    whole = label_cells(membrane, output=BOUNDARY, spec=spec)
    got, _, _ = slabbed(membrane, output=BOUNDARY, spec=spec, depth=depth, halo=0)
    assert crossing_cells(whole, depth) > 20
    assert same_up_to_permutation(whole, got)


def test_one_slab_is_exactly_label_cells(membrane: np.ndarray) -> None:
    spec = PostprocessSpec(method="watershed", threshold=0.5, min_dist=3, label_threshd=5)
    whole = label_cells(membrane, output=BOUNDARY, spec=spec, sampling=(2.0, 1.0, 1.0), threads=1)
    got, labeler, _ = slabbed(membrane, output=BOUNDARY, spec=spec, depth=60, halo=0, sampling=(2.0, 1.0, 1.0))
    np.testing.assert_array_equal(got, whole)  # same ids, not only the same cells
    assert labeler.orphan_seeds == 0


@pytest.mark.parametrize("depth, halo", [(16, 16), (8, 16), (12, 20), (30, 16)])
def test_watershed_with_a_cell_sized_halo_equals_whole_volume(membrane: np.ndarray, depth: int, halo: int) -> None:
    """Cells of ~14 voxels: a halo of 16+ planes reproduces the whole-volume watershed exactly, cells
    crossing borders included (measured, not guaranteed in general: see engine.labels.slabs)."""
    spec = PostprocessSpec(method="watershed", threshold=0.5, min_dist=3, label_threshd=5)
    whole = label_cells(membrane, output=BOUNDARY, spec=spec, threads=1)
    got, labeler, final = slabbed(membrane, output=BOUNDARY, spec=spec, depth=depth, halo=halo)
    assert crossing_cells(whole, depth) > 20
    assert final.n_cells == whole.max()
    assert same_up_to_permutation(whole, got), f"{differing_fraction(whole, got):.5f} of voxels differ"
    assert labeler.orphan_seeds == 0


@pytest.mark.parametrize("ends", [(11, 35, 60), (30, 31, 60)])
def test_uneven_cores_equal_the_whole_volume(membrane: np.ndarray, ends: tuple[int, ...]) -> None:
    """Cores of any lengths (as :meth:`engine.tiling.SlabGrid.core_ends` cuts them; a one-plane core too)
    stitch like even ones: the whole-volume components exactly, the watershed with a cell-sized halo."""
    comps = PostprocessSpec(method="components", threshold=0.5, label_threshd=5)
    whole = label_cells(membrane, output=BOUNDARY, spec=comps, threads=1)
    got, labeler, _ = slabbed(membrane, output=BOUNDARY, spec=comps, depth=30, halo=0, ends=ends)
    assert labeler.n_cores == 3 and same_up_to_permutation(whole, got)
    shed = PostprocessSpec(method="watershed", threshold=0.5, min_dist=3, label_threshd=5)
    whole = label_cells(membrane, output=BOUNDARY, spec=shed, threads=1)
    got, labeler, _ = slabbed(membrane, output=BOUNDARY, spec=shed, depth=30, halo=16, ends=ends)
    assert same_up_to_permutation(whole, got) and labeler.orphan_seeds == 0


def test_core_ends_must_reach_the_volume(membrane: np.ndarray) -> None:
    spec = PostprocessSpec(method="components", threshold=0.5)
    for ends in [(20, 40), (30, 20, 60)]:
        with pytest.raises(ValueError, match="core ends"):
            SlabLabeler(membrane.shape[1:], output=BOUNDARY, spec=spec, sampling=None, depth=30, halo=0,
                        store=MemoryLabelStore(membrane.shape[1:]), ends=ends)


@pytest.mark.parametrize("depth, halo", [(16, 16), (8, 16), (12, 20)])
def test_watershed_on_saturated_membranes_differs_only_on_ties(saturated: np.ndarray, depth: int, halo: int) -> None:
    """With a quarter of the voxels exactly 1.0 (and 7% exactly 0.0), which cell takes a voxel two cells
    reach at the same level depends on the flood's order over the whole window: the same cells, a few
    voxels (<= 0.1%) given to the other neighbour. Without ties the same cuts are exact (test above)."""
    spec = PostprocessSpec(method="watershed", threshold=0.5, min_dist=3, label_threshd=5)
    whole = label_cells(saturated, output=BOUNDARY, spec=spec, threads=1)
    got, labeler, final = slabbed(saturated, output=BOUNDARY, spec=spec, depth=depth, halo=halo)
    assert final.n_cells == whole.max() and labeler.orphan_seeds == 0
    assert differing_fraction(whole, got) <= 1e-3


@pytest.mark.parametrize("depth, halo", [(16, 12), (10, 16)])
def test_foreground_watershed_with_halo_equals_whole_volume(nuclei: np.ndarray, depth: int, halo: int) -> None:
    spec = PostprocessSpec(method="watershed", threshold=0.5, min_dist=3, label_threshd=5)
    whole = label_cells(nuclei, output=FOREGROUND, spec=spec, sampling=(1.5, 1.0, 1.0), threads=1)
    got, _, _ = slabbed(nuclei, output=FOREGROUND, spec=spec, depth=depth, halo=halo, sampling=(1.5, 1.0, 1.0))
    assert crossing_cells(whole, depth) > 5
    assert same_up_to_permutation(whole, got), f"{differing_fraction(whole, got):.5f} of voxels differ"


def test_too_small_a_halo_differs_measurably_and_is_flagged(membrane: np.ndarray) -> None:
    """The limitation, measured: with halos smaller than the cells the watershed departs from the
    whole-volume one near slab borders, and the labeler reports unconfirmed seeds."""
    spec = PostprocessSpec(method="watershed", threshold=0.5, min_dist=3, label_threshd=5)
    whole = label_cells(membrane, output=BOUNDARY, spec=spec, threads=1)
    errors = {}
    for halo in (4, 8, 16):
        got, labeler, _ = slabbed(membrane, output=BOUNDARY, spec=spec, depth=8, halo=halo)
        errors[halo] = (differing_fraction(whole, got), labeler.orphan_seeds)
    assert errors[4][0] > 0.01 and errors[4][1] > 0
    assert errors[8][0] < errors[4][0] and errors[8][1] > 0
    assert errors[16] == (0.0, 0)


def test_file_store_round_trip(tmp_path, membrane: np.ndarray) -> None:
    spec = PostprocessSpec(method="components", threshold=0.5, label_threshd=5)
    store = FileLabelStore(membrane.shape[1:], folder=tmp_path)
    labeler = SlabLabeler(membrane.shape[1:], output=BOUNDARY, spec=spec, sampling=None, depth=9, halo=0, store=store)
    labeler.push(0, membrane)
    final = labeler.finish()
    planes = np.concatenate(list(store.relabel(final.lut, chunk=7)))
    result = store.result()
    assert list(tmp_path.iterdir()) == []  # the scratch file has no name
    np.testing.assert_array_equal(planes, result)
    assert isinstance(result, np.memmap) and not result.flags.writeable
    assert same_up_to_permutation(label_cells(membrane, output=BOUNDARY, spec=spec), result)


def test_planes_must_arrive_in_order(membrane: np.ndarray) -> None:
    spec = PostprocessSpec(method="components")
    labeler = SlabLabeler(membrane.shape[1:], output=BOUNDARY, spec=spec, sampling=None, depth=8, halo=0, store=MemoryLabelStore(membrane.shape[1:]))
    labeler.push(0, membrane[:, :5])
    with pytest.raises(ValueError, match="expected z0=5, got 6"):
        labeler.push(6, membrane[:, 6:9])
    with pytest.raises(ValueError, match="only 5 of 60 planes"):
        labeler.finish()


def test_union_find_grows_and_joins() -> None:
    uf = UnionFind()
    ids = uf.add(3000)
    assert ids[0] == 1 and len(uf) == 3001
    uf.union([5, 7, 2999], [7, 9, 5])
    roots = uf.roots()
    assert roots[9] == roots[7] == roots[2999] == 5 and roots[6] == 6 and roots[0] == 0


@pytest.mark.parametrize("depth, halo, tile", [(36, 20, 24), (12, 16, 40), (16, 16, 30)])
@pytest.mark.parametrize("merge", [None, 0.5])
def test_watershed_in_xy_tiles_equals_whole_volume(wide: np.ndarray, depth: int, halo: int, tile: int, merge) -> None:
    """Cores labelled in xy tiles, each in a window of the halo around it, give the whole-volume watershed
    (and agglomeration) when the halo exceeds the cells, as the z halo does: cells crossing tile borders
    keep one id, no seed is left unconfirmed."""
    spec = PostprocessSpec(method="watershed", threshold=0.5, min_dist=3, label_threshd=5, merge_threshold=merge)
    whole = label_cells(wide, output=BOUNDARY, spec=spec, threads=1)
    got, labeler, final = slabbed(wide, output=BOUNDARY, spec=spec, depth=depth, halo=halo, tile=tile)
    assert crossing_tiles(whole, tile) > 30
    assert final.n_cells == whole.max()
    assert same_up_to_permutation(whole, got), f"{differing_fraction(whole, got):.5f} of voxels differ"
    assert labeler.orphan_seeds == 0


def test_foreground_watershed_in_xy_tiles_reaches_as_far_as_the_z_halo(nuclei: np.ndarray) -> None:
    """With z voxels 1.5x the xy pixel, the xy halo is 1.5x the planes (the same distance), and tiles of
    nuclei give the whole-volume watershed."""
    spec = PostprocessSpec(method="watershed", threshold=0.5, min_dist=3, label_threshd=5)
    whole = label_cells(nuclei, output=FOREGROUND, spec=spec, sampling=(1.5, 1.0, 1.0), threads=1)
    got, labeler, _ = slabbed(nuclei, output=FOREGROUND, spec=spec, depth=16, halo=12, sampling=(1.5, 1.0, 1.0), tile=20)
    assert labeler.halo_xy == 18 and crossing_tiles(whole, 20) > 5
    assert same_up_to_permutation(whole, got), f"{differing_fraction(whole, got):.5f} of voxels differ"


def test_too_small_an_xy_halo_differs_and_is_flagged(wide: np.ndarray) -> None:
    """Tiles whose windows are narrower than the cells split them at tile borders, and say so."""
    spec = PostprocessSpec(method="watershed", threshold=0.5, min_dist=3, label_threshd=5)
    whole = label_cells(wide, output=BOUNDARY, spec=spec, threads=1)
    got, labeler, _ = slabbed(wide, output=BOUNDARY, spec=spec, depth=36, halo=2, tile=24)
    assert differing_fraction(whole, got) > 0.01 and labeler.orphan_seeds > 0
