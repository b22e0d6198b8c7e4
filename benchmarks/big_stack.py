"""Large-stack run: peak memory and voxels/s of ``cellseg3d segment`` on a stack far larger than a slab.

Writes a uint16 membrane-like stack (default 512x1024x1024 = 0.5 G voxels, 1 GiB, uncompressed so it is
memory-mapped) and a small-but-real network bundle (pytorch-3dunet UNet3D, 'gcr', f_maps 4, 2 levels,
seeded random weights: the labels are not meaningful, the work is), then runs the CLI in a fresh
subprocess and reports its peak RSS (``getrusage(RUSAGE_CHILDREN).ru_maxrss``) against the issue's
target ``input bytes + output bytes + 2 GiB``, the wall time and the voxels/s, as one JSON line.

Usage::

    python -m benchmarks.big_stack --out /tmp/bigstack --method components   # 512x1024x1024, ~7 min on 2 cores
    python -m benchmarks.big_stack --out /tmp/bigstack --shape 32,1024,1024  # the watershed, a quick look

Only run it on an idle machine; it uses every core for several minutes. On a 2-core CPU the watershed
over a whole 0.5 G-voxel stack takes far longer than the network (about 0.15 M voxels/s end to end with
its 12-plane halos), so measure it on fewer planes: peak memory follows the slab, not the plane count.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import tifffile
import torch

from engine.bundle import Bundle, Normalization, OutputSpec, PostprocessSpec, make_bundle
from engine.synthetic import make_membrane_volume

__all__ = ["write_stack", "write_bundle", "main"]

BLOCK = (64, 256, 256)


def write_stack(path: Path, shape: tuple[int, int, int], /, *, seed: int = 0) -> Path:
    """A uint16 ZYX stack tiled from one synthetic membrane block (mirrored, so tiles meet without seams),
    written page by page (never held in memory), ImageJ, uncompressed."""
    block = make_membrane_volume(BLOCK, seed=seed).image
    reps = [math.ceil(s / b) for s, b in zip(shape, BLOCK)]

    def tile(index: int, axis: int, arr: np.ndarray) -> np.ndarray:
        return np.flip(arr, axis=axis) if index % 2 else arr

    def planes():
        for z in range(shape[0]):
            plane = tile(z // BLOCK[0], 0, block)[z % BLOCK[0]]
            rows = [tile(j, 0, plane) for j in range(reps[1])]
            full = np.concatenate(rows, axis=0)[: shape[1]]
            cols = [tile(i, 1, full) for i in range(reps[2])]
            yield np.concatenate(cols, axis=1)[:, : shape[2]]

    tmp = path.with_suffix(".partial.tif")
    with tifffile.TiffWriter(tmp, imagej=True) as tif:
        tif.write(planes(), shape=shape, dtype=np.uint16, metadata={"axes": "ZYX", "spacing": 1.0, "unit": "um"},
                  resolution=(1.0, 1.0))
    os.replace(tmp, path)
    return path


def write_bundle(folder: Path, /, *, method: str = "watershed") -> Bundle:
    """UNet3D f_maps 4, 2 levels, seeded random weights, boundary output, patch 32x128x128."""
    torch.manual_seed(0)
    template = Bundle(
        path=folder, name="bigstack-unet-f4", architecture="UNet3D",
        arch_kwargs={"in_channels": 1, "out_channels": 1, "f_maps": 4, "num_levels": 2, "num_groups": 2, "final_sigmoid": True, "layer_order": "gcr"},
        in_channels=1, normalization=Normalization(), output=OutputSpec(kind="boundary", channel=0, names=("boundary",)),
        patch_shape=(32, 128, 128), overlap=0.25,
        postprocess=PostprocessSpec(method=method, threshold=0.5, min_dist=6, label_threshd=20),  # type: ignore[arg-type]
        description="random weights: a benchmark network, not a model",
    )
    return make_bundle(None, folder, template=template)


def _parse_shape(text: str) -> tuple[int, int, int]:
    z, y, x = (int(v) for v in text.replace("x", ",").split(","))
    return z, y, x


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for the stack, bundle and labels")
    p.add_argument("--shape", type=_parse_shape, default=(512, 1024, 1024), help="Z,Y,X")
    p.add_argument("--method", choices=("watershed", "components"), default="watershed")
    p.add_argument("--extra", default="", help="more `cellseg3d segment` flags, e.g. '--memory-limit 2'")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    stack = args.out / f"stack_{'x'.join(map(str, args.shape))}.tif"
    if not stack.exists():
        started = time.perf_counter()
        write_stack(stack, args.shape)
        print(f"{stack}: written in {time.perf_counter() - started:.0f}s", file=sys.stderr)
    bundle = write_bundle(args.out / f"bundle_{args.method}", method=args.method)
    labels = args.out / "labels.tif"
    cmd = [sys.executable, "-m", "engine.cli", "segment", str(stack), "-o", str(labels), "--bundle", str(bundle.path),
           "--no-progress", *shlex.split(args.extra)]
    load_before = os.getloadavg()
    started = time.perf_counter()
    child = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if child.returncode != 0:
        print(child.stderr, file=sys.stderr)
        return child.returncode
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    voxels = math.prod(args.shape)
    in_bytes, out_bytes = stack.stat().st_size, labels.stat().st_size
    uncompressed_out = voxels * 2
    doc = {
        "command": shlex.join(cmd),
        "shape": list(args.shape),
        "input_bytes": in_bytes,
        "output_bytes": out_bytes,
        "peak_rss_bytes": peak,
        "target_bytes": in_bytes + out_bytes + 2**31,
        "within_target": peak <= in_bytes + out_bytes + 2**31,
        "peak_rss_gib": round(peak / 2**30, 3),
        "target_gib_with_uncompressed_output": round((in_bytes + uncompressed_out + 2**31) / 2**30, 3),
        "wall_s": round(wall, 1),
        "voxels_per_s": round(voxels / wall),
        "summary": child.stdout.strip().splitlines()[-1],
        "cpu": os.cpu_count(),
        "load_before": [round(v, 2) for v in load_before],
    }
    print(json.dumps(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
