"""The torch labelling steps (``engine.labels.device``) on a device against their numpy mirrors on the host.

Command (from the repository root; on a GPU host ``--device cuda``)::

    python -m benchmarks.labels_device [--device cuda] [--shape 128,512,512] [--json OUT.json]

Input: an ``engine.tissue`` stack's true cells (seed 5, default settings: ~12-voxel cells) turned into a
boundary probability map (walls 0.9, inside 0.05, Gaussian blur 0.8, noise 0.03), thresholded at 0.8 as a
boundary model's interior. Each step runs on the same input both ways, best of 3 (the device synchronised),
and its outputs are compared (exact; the face sums to rtol 1e-12): interior components (cc3d vs
``connected_components``), the bounded distance (bound 16), the seed peaks (min_dist 4), the steepest
descent from the resolved seeds, the face table of the final labels, the split of the interior components
that hold several seeds (skimage's flood against ``engine.labels.device_flood.flood_within``; equal where
nothing ties), and a whole labelling window (seeds, markers, floods, background: ``engine.labels.window``'s
``HostWindow`` against ``DeviceWindow`` with its floods on the device, the path a GPU run takes). The copies
a GPU run saves or pays are timed too: the float32 probabilities to the host, the int32 labels back.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cc3d
import numpy as np
import torch

from engine.labels import EdgeTable, distance_transform, find_seeds
from engine.labels import device as dev
from engine.labels.distance import bounded_distance
from engine.labels.device_flood import flood_within
from engine.labels.flood import descend, resolve_components, seat_components
from engine.labels.seeded import seeded_watershed
from engine.labels.seeds import path_maximum, seed_radius
from engine.labels.window import DeviceWindow, HostWindow
from engine.synthetic import boundary_probability
from engine.tissue import TissueSettings, make_tissue_volume

__all__ = ["boundary_map", "main"]

BOUND = 16
MIN_DIST = 4


def boundary_map(shape: tuple[int, int, int], seed: int = 5) -> np.ndarray:
    """A boundary probability map (float32) of an ``engine.tissue`` stack's true cells."""
    return boundary_probability(make_tissue_volume(shape, seed=seed, settings=TissueSettings()).labels, seed=seed)


def _best(run: Callable[[], Any], sync: Callable[[], None], repeats: int = 3) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        out = run()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _host_inputs(p: np.ndarray) -> dict[str, np.ndarray]:
    """The numpy pipeline's intermediate arrays, each step's input (untimed)."""
    mask = (1.0 - p) > 0.8
    components = cc3d.connected_components(mask, connectivity=6).astype(np.int32)
    distance = distance_transform(mask, sampling=None, threads=os.cpu_count() or 1)
    seeds_at = find_seeds(distance, components, min_dist=MIN_DIST, sampling=None)
    seeds = np.zeros(mask.shape, bool)
    seeds[tuple(seeds_at.T)] = True
    markers = cc3d.connected_components(seeds, connectivity=6).astype(np.int32)
    resolved = resolve_components(p, markers, components)
    labels = descend(p, resolved)[0]
    at = markers > 0
    shared = seat_components(markers[at], components[at], int(components.max()))[1][components]
    return {"p": p, "mask": mask, "distance": distance, "resolved": resolved, "labels": labels,
            "markers": np.where(shared, markers, 0), "shared": shared}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, tuple):
        return all(_same(x, y) for x, y in zip(a, b, strict=True))
    b = b.cpu().numpy() if isinstance(b, torch.Tensor) else b
    if a is None or b is None:
        return a is None and b is None
    if a.dtype.kind == "f":
        return bool(np.allclose(a, b, rtol=1e-12, atol=0))
    return bool(np.array_equal(a, b))


def _face_table(labels: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, ...]:
    table = EdgeTable()
    table.add_piece(labels, p)
    return table.u, table.v, table.sums, table.counts


def _window(make: Callable[[], HostWindow | DeviceWindow]) -> np.ndarray:
    """One labelling window from start to labels, as the slab labeller runs it (no seeds from elsewhere)."""
    window = make()
    window.place(window.peaks(MIN_DIST))
    return window.flood(boundary=True, open_background=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.labels_device", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="torch device for the torch steps. Default: %(default)s")
    parser.add_argument("--shape", default="64,256,256", help="Z,Y,X of the stack. Default: %(default)s")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    shape = tuple(int(s) for s in args.shape.split(","))
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    host = _host_inputs(boundary_map(shape))  # type: ignore[arg-type]
    t_up, on = _best(lambda: {k: torch.from_numpy(v).to(device) for k, v in host.items()}, sync)
    radius = seed_radius(MIN_DIST, None)
    threads = os.cpu_count() or 1
    steps: list[tuple[str, Callable[[], Any], Callable[[], Any]]] = [
        ("interior components", lambda: cc3d.connected_components(host["mask"], connectivity=6),
         lambda: dev.connected_components(on["mask"])),
        (f"bounded distance ({BOUND})", lambda: bounded_distance(host["mask"], BOUND),
         lambda: dev.bounded_distance(on["mask"], bound=BOUND)),
        (f"seed peaks (min_dist {MIN_DIST})", lambda: host["mask"] & (host["distance"] >= path_maximum(host["distance"], host["mask"], radius)),
         lambda: dev.peaks(on["distance"], on["mask"], radius=radius)),
        ("steepest descent", lambda: descend(host["p"], host["resolved"]), lambda: dev.descend(on["p"], on["resolved"])),
        ("face table", lambda: _face_table(host["labels"], host["p"]), lambda: dev.faces(on["labels"], on["p"])),
        ("split of shared components", lambda: seeded_watershed(host["p"], host["markers"], host["shared"]),
         lambda: flood_within(on["p"], on["markers"], on["shared"])),
        ("whole window (from the float map)",
         lambda: _window(lambda: HostWindow.compute(host["p"], kind="boundary", threshold=0.8, sampling=None, threads=threads)),
         lambda: _window(lambda: DeviceWindow(host["p"], kind="boundary", threshold=0.8, sampling=None, threads=threads, device=device,
                                              floods_on_device=True))),
    ]
    mvox = int(np.prod(shape)) / 1e6
    rows = []
    for name, numpy_step, torch_step in steps:
        t_np, want = _best(numpy_step, lambda: None)
        t_dev, got = _best(torch_step, sync)
        rows.append({"step": name, "numpy_s": t_np, "device_s": t_dev, "equal": _same(want, got)})
    t_down, _ = _best(lambda: on["labels"].cpu(), sync)
    t_p_down, _ = _best(lambda: on["p"].cpu(), sync)
    machine = {"host": f"{os.cpu_count()}-core {platform.processor() or platform.machine()}", "torch": torch.__version__,
               "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    print(f"stack {shape} = {mvox:.1f} Mvoxel; {machine}")
    print(f"| step | numpy (host) s | torch ({device.type}) s | speed-up | equal |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['step']} | {r['numpy_s']:.3f} | {r['device_s']:.4f} | {r['numpy_s'] / r['device_s']:.1f}x | {r['equal']} |")
    print(f"copies: all inputs to {device.type} {t_up:.3f} s; int32 labels back {t_down:.4f} s; float32 probabilities back {t_p_down:.4f} s")
    if args.json:
        args.json.write_text(json.dumps({"shape": shape, "machine": machine, "rows": rows,
                                         "copies_s": {"inputs_up": t_up, "labels_down": t_down, "probs_down": t_p_down}}, indent=1))
    return 0 if all(r["equal"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
