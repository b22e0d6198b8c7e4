"""Whole vs slabbed labelling throughput on the default model's output (the figures in PERFORMANCE.md).

Command (from the repository root)::

    python -m benchmarks.labelling [--bundle DIR]

The stack is ``engine.tissue`` 64x256x256, seed 5 (12-voxel cells), segmented once with ``--rescale off`` in
fp32 for its probabilities; those are then labelled with the bundle's post-processing as one core (the
whole volume), as 16-plane cores with a 16-plane halo, as 32-plane cores in 128x128 xy tiles and as the
pipeline's 32-plane cores; each way's best of ``--rounds`` rounds, the ways taking turns within a round (so a
drift in the machine's speed, 10% within minutes on a shared 2-core host, reaches every way alike), with its
time per voxel against the whole volume's and F1 / IoU against the truth (all should agree).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from engine.bundle import Bundle, load_bundle
from engine.labels import MemoryLabelStore, SlabLabeler, label_cells
from engine.metrics import match_instances
from engine.pipeline import SegmentOptions, segment
from engine.run_plan import plan_slabs
from engine.tiling import TilingConfig
from engine.tissue import TissueSettings, make_tissue_volume

__all__ = ["label_in_slabs", "main"]


def label_in_slabs(probs: np.ndarray, bundle: Bundle, /, *, depth: int, halo: int, tile: int | None = None) -> np.ndarray:
    """Label ``(K, Z, Y, X)`` probabilities core by core, as the streamed pipeline does."""
    shape = (int(probs.shape[1]), int(probs.shape[2]), int(probs.shape[3]))
    store = MemoryLabelStore(shape)
    labeler = SlabLabeler(shape, output=bundle.output, spec=bundle.postprocess, sampling=None, depth=depth, halo=halo,
                          tile=tile, store=store)
    for z0 in range(0, shape[0], depth):
        labeler.push(z0, probs[:, z0 : z0 + depth])
    final = labeler.finish()
    for _ in store.relabel(final.lut, chunk=depth):
        pass
    return store.result()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.labelling", description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", type=Path, default=None, help="bundle directory. Default: the shipped one")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of every way; each way's best counts. Default: 5")
    args = parser.parse_args(argv)
    bundle = load_bundle(args.bundle)
    vol = make_tissue_volume((64, 256, 256), seed=5, settings=TissueSettings())
    probs = segment(vol.image, bundle=bundle, options=SegmentOptions(rescale="off", precision="fp32")).probabilities
    mvoxels = vol.labels.size / 1e6
    config = TilingConfig(patch_shape=bundle.patch_shape, overlap=bundle.overlap)
    halo = plan_slabs((1, *probs.shape[1:]), grid_config=config, out_channels=1, spec=bundle.postprocess, depth=32).halo
    ways: list[tuple[str, Callable[[], np.ndarray]]] = [
        ("whole volume", lambda: label_cells(probs, output=bundle.output, spec=bundle.postprocess)),
        ("16-plane cores + 16 halo", lambda: label_in_slabs(probs, bundle, depth=16, halo=16)),
        ("32-plane cores + 16 halo, 128x128 tiles", lambda: label_in_slabs(probs, bundle, depth=32, halo=16, tile=128)),
        (f"32-plane cores + {halo} halo (the pipeline's)", lambda: label_in_slabs(probs, bundle, depth=32, halo=halo)),
    ]
    best = dict.fromkeys((name for name, _ in ways), float("inf"))
    labels: dict[str, np.ndarray] = {}
    for _ in range(max(1, args.rounds)):
        for name, run in ways:
            start = time.perf_counter()
            labels[name] = run()
            best[name] = min(best[name], time.perf_counter() - start)
    whole = best[ways[0][0]]
    for name, _ in ways:
        s = match_instances(labels[name], vol.labels, iou_threshold=0.5)
        print(f"{name}: {best[name]:.2f} s = {mvoxels / best[name]:.2f} Mvoxel/s ({best[name] / whole:.2f}x the whole "
              f"volume's time); F1 {s.f1:.3f} IoU {s.mean_matched_iou:.3f} cells {s.n_pred}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
