"""Streamed z-slabs: the slabbed run equals the whole-volume run, memory is bounded by the slab, the stages
overlap, progress and failures behave."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from slab_helpers import ImageBackend, differing_fraction, same_up_to_permutation

from engine import InputError, SegmentOptions, segment, segment_file
from engine import io as engine_io
from engine import normalize as engine_normalize
from engine import tiff_stream
from engine.bundle import OutputSpec, PostprocessSpec, make_bundle
from engine.normalize import normalization_stats
from engine.report import RunReport
from engine.run_plan import plan_slabs
from engine.streaming import ArraySource, volume_stats
from engine.synthetic import make_membrane_volume, make_nuclei_volume
from engine.tiling import SlabGrid, TilingConfig, sliding_window, sliding_window_slabs

CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[2]


def _conv_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv3d(2, 3, 3, padding=1), torch.nn.Sigmoid()).eval()


@pytest.mark.parametrize("shape", [(33, 65, 65), (70, 20, 37), (5, 7, 9)])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5])
@pytest.mark.parametrize("rows", [1, 2, 3])
def test_slabbed_blend_is_bitwise_the_whole_volume_blend(shape, overlap, rows) -> None:
    """Same global patch plan, same patches per voxel in the same order: identical floats (batch 1)."""
    volume = np.random.default_rng(0).random((2, *shape), dtype=np.float32)
    model = _conv_model()

    def run(batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(batch)

    config = TilingConfig(patch_shape=(16, 16, 32), overlap=overlap, batch_size=1)
    whole = sliding_window(volume, run, config=config, out_channels=3, device=CPU).numpy()
    grid = SlabGrid(shape, config, rows)
    reads: list[tuple[int, int]] = []

    def read(a: int, b: int) -> np.ndarray:
        reads.append((a, b))
        return volume[:, a:b]

    slabs = [(z0, t.numpy().copy()) for z0, t in sliding_window_slabs(read, run, grid=grid, out_channels=3, device=CPU)]
    assert [z0 for z0, _ in slabs] == list(np.cumsum([0] + [s.shape[1] for _, s in slabs[:-1]]))
    np.testing.assert_array_equal(np.concatenate([s for _, s in slabs], axis=1), whole)
    assert reads == grid.read_ranges() and sum(b - a for a, b in reads) == shape[0]  # each plane read once


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Tiny bundles (their network is replaced by ImageBackend): membrane/boundary and nuclei/foreground."""
    from tiny_bundles import tiny_template

    out = tmp_path_factory.mktemp("slab_bundles")
    membrane = make_bundle(None, out / "m", template=tiny_template(out / "m", patch_shape=(16, 32, 32)))
    nuclei = make_bundle(
        None, out / "n",
        template=tiny_template(
            out / "n", output=OutputSpec(kind="foreground", channel=0, names=("foreground", "background")),
            postprocess=PostprocessSpec(method="watershed", threshold=0.5, min_dist=3, label_threshd=5),
        ),
    )
    return {"membrane": membrane, "nuclei": nuclei}


@pytest.fixture(scope="module")
def stacks(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("slab_stacks")
    files = {}
    for kind, make in (("membrane", make_membrane_volume), ("nuclei", make_nuclei_volume)):
        image = make((52, 48, 56), seed=4).image
        path = out / f"{kind}.tif"
        tifffile.imwrite(path, image, imagej=True, metadata={"axes": "ZYX", "spacing": 1.5, "unit": "um"}, resolution=(2.0, 2.0))
        files[kind] = (path, image)
    return files


def _run_file(tmp_path: Path, stack: Path, bundle, options: SegmentOptions, *, delay: float = 0.0, **kw):
    out, prob = tmp_path / "labels.tif", tmp_path / "prob.tif"
    backend = ImageBackend(bundle, delay=delay)
    result = segment_file(stack, out, bundle=bundle, options=options, prob_path=prob, backend=backend, **kw)
    return result, tifffile.imread(out), tifffile.imread(prob).transpose(1, 0, 2, 3)


@pytest.mark.parametrize("depth", [7, 20])
def test_streamed_file_equals_whole_volume_components(tmp_path, bundles, stacks, depth) -> None:
    """Probabilities identical, labels identical up to id permutation, cells crossing slab borders included."""
    bundle, (stack, image) = bundles["nuclei"], stacks["nuclei"]
    bundle = replace(bundle, postprocess=replace(bundle.postprocess, method="components"))
    opts = SegmentOptions(batch_size=1, label_threshd=5, threshold=0.5)
    whole = segment(image, bundle=bundle, options=opts, voxel_size_um=(1.5, 0.5, 0.5), backend=ImageBackend(bundle))
    result, labels, probs = _run_file(tmp_path, stack, bundle, replace(opts, slab_depth=depth))
    assert result.report.n_slabs == -(-52 // depth) > 1
    np.testing.assert_array_equal(probs, whole.probabilities)
    assert result.n_cells == whole.n_cells > 10
    crossing = {int(i) for b in range(depth, 52, depth) for i in np.intersect1d(labels[b - 1], labels[b])} - {0}
    assert len(crossing) > 5
    assert same_up_to_permutation(whole.labels, labels)


@pytest.mark.parametrize("kind, depth, halo", [("nuclei", 10, 16), ("nuclei", 17, 12), ("membrane", 12, 20)])
def test_streamed_file_watershed_is_within_the_tie_bound(tmp_path, bundles, stacks, kind, depth, halo) -> None:
    """The watershed breaks ties (many, on a uint16 image) by its queue order over the window: same cells,
    <= 0.1% of the voxels may go to the other neighbour (see engine.labels.slabs)."""
    bundle, (stack, image) = bundles[kind], stacks[kind]
    opts = SegmentOptions(batch_size=1, min_dist=3, threshold=0.5, label_threshd=5)
    whole = segment(image, bundle=bundle, options=opts, voxel_size_um=(1.5, 0.5, 0.5), backend=ImageBackend(bundle))
    result, labels, probs = _run_file(tmp_path, stack, bundle, replace(opts, slab_depth=depth, halo=halo))
    np.testing.assert_array_equal(probs, whole.probabilities)
    assert result.n_cells == whole.n_cells > 10 and result.report.orphan_seeds == 0
    assert differing_fraction(whole.labels, labels) <= 1e-3


def test_orphan_seeds_warn_only_when_the_halo_is_short_of_the_cells(tmp_path, bundles, stacks, caplog) -> None:
    """A few orphan seeds are normal (128x1024x1024 membranes, default halo: 600 for 155,890 cells, 0.01% of
    the voxels differ from the whole-volume run) and are logged at INFO; a 1-plane halo orphans far more
    and warns, naming --halo."""
    assert not RunReport(n_cells=155_890, orphan_seeds=600).halo_too_small
    assert RunReport(n_cells=1000, orphan_seeds=11).halo_too_small
    bundle, (stack, _) = bundles["membrane"], stacks["membrane"]
    opts = SegmentOptions(batch_size=1, min_dist=3, threshold=0.5, label_threshd=5, slab_depth=12, halo=1)
    with caplog.at_level("INFO", logger="engine.pipeline"):
        result, _, _ = _run_file(tmp_path, stack, bundle, opts)
    assert result.report.halo_too_small, (result.report.orphan_seeds, result.n_cells)
    assert any(r.levelno == logging.WARNING and "raise --halo" in r.getMessage() for r in caplog.records)


def test_streamed_result_holds_no_volume(tmp_path, bundles, stacks) -> None:
    bundle, (stack, _) = bundles["membrane"], stacks["membrane"]
    result, labels, probs = _run_file(tmp_path, stack, bundle, SegmentOptions(slab_depth=16, halo=8))
    report = result.report
    assert (report.n_slabs, report.slab_depth, report.halo) == (4, 16, 8)
    assert result.probabilities is None
    assert isinstance(result.labels, np.memmap) and not result.labels.flags.writeable
    np.testing.assert_array_equal(result.labels, labels)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.tif", "prob.tif"]  # no temporary files left
    with tifffile.TiffFile(tmp_path / "labels.tif") as tif:
        assert tif.is_imagej and tif.imagej_metadata["spacing"] == pytest.approx(1.5)
    assert engine_io.read_volume(tmp_path / "prob.tif", channels=2).voxel_size_um == pytest.approx((1.5, 0.5, 0.5))
    assert "slabs=4x16+halo8" in report.summary() and report.to_dict()["n_slabs"] == 4
    assert {"read", "normalize", "load", "infer", "postprocess", "write"} <= set(report.timings)


def test_big_outputs_go_to_bigtiff(tmp_path, bundles, stacks, monkeypatch) -> None:
    monkeypatch.setattr(tiff_stream, "BIGTIFF_BYTES", 1000)
    bundle, (stack, _) = bundles["membrane"], stacks["membrane"]
    result, labels, probs = _run_file(tmp_path, stack, bundle, SegmentOptions(slab_depth=20, halo=8))
    for name in ("labels.tif", "prob.tif"):
        with tifffile.TiffFile(tmp_path / name) as tif:
            assert tif.is_bigtiff and tif.is_ome
    assert engine_io.read_volume(tmp_path / "labels.tif").voxel_size_um == pytest.approx((1.5, 0.5, 0.5))
    np.testing.assert_array_equal(result.labels, labels)


@pytest.mark.parametrize("unit", ["voxel", "patch"])
def test_progress_reaches_the_total_on_the_calling_thread(tmp_path, bundles, stacks, unit) -> None:
    bundle, (stack, _) = bundles["membrane"], stacks["membrane"]
    seen: list[tuple[int, int]] = []
    threads: set[int] = set()

    def progress(done: int, total: int) -> None:
        seen.append((done, total))
        threads.add(threading.get_ident())

    opts = SegmentOptions(slab_depth=8, halo=8, progress_unit=unit)
    result, _, _ = _run_file(tmp_path, stack, bundle, opts, progress=progress, delay=0.01)
    total = 52 * 48 * 56 if unit == "voxel" else result.report.n_patches
    assert seen[-1] == (total, total) and len(seen) > 3
    assert all(t == total for _, t in seen) and [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert threads == {threading.get_ident()}


def test_oom_on_the_first_batch_is_recovered(bundles, stacks) -> None:
    bundle, (_, image) = bundles["membrane"], stacks["membrane"]
    reference = segment(image, bundle=bundle, options=SegmentOptions(batch_size=1), backend=ImageBackend(bundle))
    backend = ImageBackend(bundle, oom_once=True)
    result = segment(image, bundle=bundle, options=SegmentOptions(batch_size=4, slab_depth=16, halo=8), backend=backend)
    assert backend.batches[:3] == [4, 2, 2]  # the failed batch of 4 ran again as two halves
    assert result.report.oom_retries == 1 and result.report.batch_size == 2
    np.testing.assert_allclose(result.probabilities, reference.probabilities, rtol=0, atol=1e-6)


def test_failure_mid_stream_writes_nothing_and_stops_every_stage(tmp_path, bundles, stacks) -> None:
    bundle, (stack, _) = bundles["membrane"], stacks["membrane"]
    before = threading.active_count()
    with pytest.raises(RuntimeError, match="backend exploded"):
        segment_file(stack, tmp_path / "l.tif", bundle=bundle, prob_path=tmp_path / "p.tif",
                     options=SegmentOptions(slab_depth=8, halo=8), backend=ImageBackend(bundle, fail_after=5))
    assert list(tmp_path.iterdir()) == []
    time.sleep(0.5)
    assert threading.active_count() <= before


def test_unreadable_planes_are_an_input_error(tmp_path, bundles) -> None:
    bundle = bundles["membrane"]
    src = tmp_path / "in.tif"
    tifffile.imwrite(src, np.random.default_rng(0).integers(0, 999, (30, 40, 40), dtype=np.uint16), compression="zlib")
    raw = bytearray(src.read_bytes())
    raw[2000:6000] = b"\x00" * 4000  # corrupt compressed strips of the first planes
    src.write_bytes(bytes(raw))
    with pytest.raises(InputError, match="in.tif"):
        segment_file(src, tmp_path / "out.tif", bundle=bundle, options=SegmentOptions(slab_depth=8), backend=ImageBackend(bundle))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.tif"]


class _SlowSource(ArraySource):
    def read(self, z0: int, z1: int, /) -> np.ndarray:
        time.sleep(0.2)
        return super().read(z0, z1)


def test_reading_inference_and_labelling_overlap(bundles, stacks) -> None:
    """Reads and network calls that sleep about as long as each other: streamed, they overlap, so the
    wall time is well under the sum of the stages' busy times (a serial loop would take that sum)."""
    from engine.outputs import RunOutputs
    from engine.pipeline import _run

    bundle, (_, image) = bundles["membrane"], stacks["membrane"]
    backend = ImageBackend(bundle, delay=0.1)
    opts = SegmentOptions(batch_size=2, slab_depth=8, halo=8)
    result = _run(_SlowSource(image[None]), bundle=bundle, options=opts, voxel_size_um=None, progress=None, backend=backend, outputs=RunOutputs())
    busy, wall = result.report.timings, result.report.wall_s
    serial = busy["read"] + busy["infer"] + busy["postprocess"]
    assert result.report.n_slabs > 3 and min(busy["read"], busy["infer"]) > 0.6
    assert wall < 0.8 * serial, f"wall {wall:.2f}s vs stages {serial:.2f}s: {busy}"


def test_labelling_takes_one_core_while_the_network_runs_on_the_cpu(bundles, stacks, monkeypatch) -> None:
    """The network's threads take every core while it runs on the CPU, so the cores labelled meanwhile get one
    thread; once the network has handed on its last planes, the rest get every core again (the caller's
    setting)."""
    from engine.labels import SlabLabeler
    from engine.outputs import RunOutputs
    from engine.pipeline import _run

    seen: list[tuple[int, int | None]] = []
    push = SlabLabeler.push

    def recording_push(self, z0, probs):  # noqa: ANN001, ANN202
        seen.append((z0, self.threads))
        return push(self, z0, probs)

    monkeypatch.setattr(SlabLabeler, "push", recording_push)
    bundle, (_, image) = bundles["membrane"], stacks["membrane"]
    opts = SegmentOptions(batch_size=2, slab_depth=8, halo=8)
    # a network that takes a moment, as a real one does: an instant one can finish before the first push
    _run(ArraySource(image[None]), bundle=bundle, options=opts, voxel_size_um=None, progress=None,
         backend=ImageBackend(bundle, delay=0.05), outputs=RunOutputs())
    threads = [t for _, t in seen]
    k = threads.index(None)  # the first push after the network's last planes were handed on
    assert len(seen) > 2 and k >= 1 and set(threads[:k]) == {1} and set(threads[k:]) == {None}, seen


def test_streamed_statistics_equal_whole_volume_statistics(tmp_path, monkeypatch) -> None:
    from engine.bundle import Normalization

    monkeypatch.setattr(engine_normalize, "MAX_EXACT_VOXELS", 5000)
    image = np.random.default_rng(3).gamma(2.0, 300.0, (23, 40, 37)).astype(np.uint16)
    path = tmp_path / "s.tif"
    tifffile.imwrite(path, image, compression="zlib")
    for spec in (Normalization(kind="percentile", low=1.0, high=99.8), Normalization(kind="zscore")):
        with engine_io.open_volume(path) as reader:
            streamed = volume_stats(reader, spec, dtype=reader.dtype)
        np.testing.assert_allclose(streamed, normalization_stats(image[None], spec), rtol=1e-12)


def test_plan_slabs_sizes_from_the_budget(caplog) -> None:
    config = TilingConfig(patch_shape=(16, 64, 64), overlap=0.25)
    ws = PostprocessSpec(method="watershed", min_dist=6)
    small = plan_slabs((1, 40, 64, 64), grid_config=config, out_channels=2, spec=ws, memory_bytes=2**30)
    assert (small.depth, small.halo, small.rows_per_group) == (40, 0, None)  # fits: one slab
    big = plan_slabs((1, 512, 1024, 1024), grid_config=config, out_channels=2, spec=ws, memory_bytes=6 * 2**30)
    assert big.halo == 12 and 12 <= big.depth < 512 and big.rows_per_group >= 1
    cc = plan_slabs((1, 512, 1024, 1024), grid_config=config, out_channels=2, spec=PostprocessSpec(method="components"), memory_bytes=6 * 2**30)
    assert cc.halo == 0 and cc.tile is None and big.tile is not None  # cheaper per voxel: whole planes, no halo
    fixed = plan_slabs((1, 40, 64, 64), grid_config=config, out_channels=2, spec=ws, depth=8, halo=5)
    assert (fixed.depth, fixed.halo) == (8, 5)
    with caplog.at_level("WARNING"):
        tight = plan_slabs((1, 512, 2048, 2048), grid_config=config, out_channels=2, spec=ws, memory_bytes=2**28)
    assert tight.depth == 12 and "small" in caplog.text


def test_wide_planes_are_labelled_in_xy_tiles_within_the_budget() -> None:
    """1024x1024 planes with a 16-plane halo in 2 GiB: whole-plane windows (48 planes x 1M voxels x 76
    bytes = 3.6 GiB) cannot fit, so cores are labelled in tiles whose windows take LABEL_SHARE at most,
    and the full planes held for them PLANES_SHARE at most."""
    from engine.run_plan import LABEL_SHARE, PLANES_SHARE, POSTPROCESS_BYTES

    config = TilingConfig(patch_shape=(32, 64, 128), overlap=0.25)
    spec = PostprocessSpec(method="watershed", min_dist=8)
    plan = plan_slabs((1, 128, 1024, 1024), grid_config=config, out_channels=1, spec=spec, halo=16, memory_bytes=2**31)
    assert plan.tile is not None and plan.tile < 1024 and plan.halo == 16
    window = (plan.depth + 2 * plan.halo) * (plan.tile + 2 * plan.halo) ** 2
    assert window * (POSTPROCESS_BYTES["watershed"] + 4) <= LABEL_SHARE * 2**31
    assert 4 * (2 * plan.depth + 2 * plan.halo) * 1024 * 1024 <= PLANES_SHARE * 2**31
    narrow = plan_slabs((1, 128, 256, 256), grid_config=config, out_channels=1, spec=spec, halo=16, memory_bytes=2**31)
    assert narrow.tile is None  # whole planes fit


@pytest.mark.parametrize("options, match", [
    (SegmentOptions(slab_depth=0), "slab depth"),
    (SegmentOptions(halo=-1), "halo"),
    (SegmentOptions(memory_limit_gib=0), "memory limit"),
    (SegmentOptions(progress_unit="percent"), "progress unit"),
])
def test_bad_streaming_options(bundles, options, match) -> None:
    bundle = bundles["membrane"]
    with pytest.raises(InputError, match=match):
        segment(np.random.default_rng(0).random((8, 16, 16)), bundle=bundle, options=options, backend=ImageBackend(bundle))


_RSS_CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from slab_helpers import ImageBackend
from engine import SegmentOptions, load_bundle, segment_file
bundle = load_bundle(sys.argv[2])
opts = SegmentOptions(patch_shape=(16, 64, 64), batch_size=2, threads=1, slab_depth=int(sys.argv[5]) or None, halo=4,
                      memory_limit_gib=float(sys.argv[6]))
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # reset the peak RSS (VmHWM): measure the run, not the imports
result = segment_file(sys.argv[3], sys.argv[4], bundle=bundle, options=opts, backend=ImageBackend(bundle))
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"peak_mb": hwm / 1024, "slabs": result.report.n_slabs}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset the peak RSS")
def test_peak_memory_is_bounded_by_the_slab_not_the_volume(tmp_path, bundles) -> None:
    """Streamed in 8-plane slabs, a 192-plane stack peaks at about the RSS of a 64-plane one of the same
    256x256 planes (the slab's working set; the pipeline reaches its steady state within a few slabs),
    while the whole-volume run of the 192 planes needs far more. Fresh subprocesses; the peak is the run's
    own (VmHWM reset after the imports), with glibc's mmap threshold fixed so freed slabs leave the heap."""
    bundle = bundles["nuclei"]
    stacks = {}
    for z in (64, 192):
        stacks[z] = tmp_path / f"s{z}.tif"
        tifffile.imwrite(stacks[z], make_nuclei_volume((z, 256, 256), seed=5).image)  # contiguous: memory-mapped
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}

    def peak(z: int, depth: int, limit: float) -> dict:
        child = subprocess.run(
            [sys.executable, "-c", _RSS_CHILD, str(REPO / "tests"), str(bundle.path), str(stacks[z]), str(tmp_path / f"o{z}_{depth}.tif"),
             str(depth), str(limit)],
            capture_output=True, text=True, cwd=REPO, timeout=300, env=env,
        )
        assert child.returncode == 0, child.stderr[-3000:]
        return json.loads(child.stdout.strip().splitlines()[-1])

    short, long, whole = peak(64, 8, 0.25), peak(192, 8, 0.25), peak(192, 0, 8.0)
    assert (short["slabs"], long["slabs"], whole["slabs"]) == (8, 24, 1)
    planes_mb = 128 * 256 * 256 * 4 / 2**20  # the 128 extra planes, as one float32 array: 32 MB
    assert long["peak_mb"] - short["peak_mb"] < planes_mb, (short, long)  # no volume-sized buffer anywhere
    assert whole["peak_mb"] - long["peak_mb"] > 10 * planes_mb, (long, whole)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset the peak RSS")
def test_peak_memory_with_many_labels_follows_the_slab(tmp_path) -> None:
    """Per-label state (sizes, id table, seed registry, the agglomeration's region graph) must stay compact:
    small membrane cells (~260k in the 192-plane stack, ~7 region pairs each) with
    merging on, streamed in 8-plane slabs, peak within one float32 copy of the extra planes of the 64-plane
    run plus 512 bytes per cell (ids and sizes 16 B, ~7 region pairs of 24 B, and the pooling's transients;
    measured here: 134 MB for 261k cells). With Python adjacency for every pair it grew 466 MB."""
    from tiny_bundles import tiny_template

    spec = PostprocessSpec(method="watershed", threshold=0.5, min_dist=2, label_threshd=1, merge_threshold=0.3)
    bundle = make_bundle(None, tmp_path / "b", template=tiny_template(tmp_path / "b", patch_shape=(16, 32, 32), postprocess=spec))
    stacks = {}
    for z in (64, 192):
        stacks[z] = tmp_path / f"s{z}.tif"
        tifffile.imwrite(stacks[z], make_membrane_volume((z, 256, 256), seed=6, mean_cell_diameter=6.0).image)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    peaks = {}
    for z in (64, 192):
        child = subprocess.run(
            [sys.executable, "-c", _RSS_CHILD, str(REPO / "tests"), str(bundle.path), str(stacks[z]), str(tmp_path / f"o{z}.tif"), "8", "0.25"],
            capture_output=True, text=True, cwd=REPO, timeout=500, env=env,
        )
        assert child.returncode == 0, child.stderr[-3000:]
        peaks[z] = json.loads(child.stdout.strip().splitlines()[-1])
    cells = int(tifffile.imread(tmp_path / "o192.tif").max())
    planes_mb = 128 * 256 * 256 * 4 / 2**20
    assert cells > 100_000, cells
    assert peaks[192]["peak_mb"] - peaks[64]["peak_mb"] < planes_mb + 512 * cells / 2**20, (peaks, cells)


def test_cli_streams_with_slab_flags(tmp_path, bundles, stacks, capsys) -> None:
    from engine.cli import main

    bundle, (stack, _) = bundles["membrane"], stacks["membrane"]
    out = tmp_path / "cli.tif"
    argv = ["segment", str(stack), "-o", str(out), "--bundle", str(bundle.path), "--slab-depth", "16", "--halo", "8",
            "--memory-limit", "0.5", "--threads", "1", "--no-progress"]
    assert main(argv) == 0
    assert "slabs=4x16+halo8" in capsys.readouterr().out
    assert tifffile.imread(out).shape == (52, 48, 56)
    assert main([*argv[:-1], "--slab-depth", "0"]) == 2
    assert "--slab-depth: expected an integer >= 1" in capsys.readouterr().err


def test_prefetched_keeps_order_and_raises_the_producers_error() -> None:
    from engine.streaming import prefetched

    assert list(prefetched(iter(range(50)), depth=3)) == list(range(50))

    def failing():
        yield 1
        raise ValueError("producer failed")

    with pytest.raises(ValueError, match="producer failed"):
        list(prefetched(failing()))
    early = prefetched(iter(range(1000)))
    assert next(early) == 0
    early.close()  # stops the producer thread
