#!/usr/bin/env python
"""Self-contained benchmark for a GPU host: ``python benchmarks/gpu_host.py OUT_DIR``.

Needs torch with CUDA and this repository (its engine needs numpy, scipy, scikit-image and tifffile:
``pip install -e .``). Uses TensorRT and onnxruntime-gpu when they are installed (exporting the bundle's
ONNX/plan first) and skips them with the reason when not; MONAI rows need ``pip install --no-deps monai``.
Sized to finish in under 8 minutes on one H100/H200: every method on small (64x256x256) and medium
(128x512x512), the engine's fastest paths and MONAI on large (256x1024x1024); anything that would start
after the time budget is skipped and says so. Writes ``results.json`` (after every row), ``results.md``,
``results.png`` and ``run.log`` into OUT_DIR and prints the table last.

Options: ``--sizes small,medium,large``, ``--budget-s 420``, ``--device cpu`` (a dry run of the same
script on a machine without a GPU, on the ``tiny`` size), ``--bundle DIR``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time
from pathlib import Path

_T0 = time.perf_counter()
_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

LARGE_METHODS = ("engine torch-cuda fp16", "engine tensorrt", "monai")


def _missing() -> list[str]:
    missing = []
    for module in ("numpy", "scipy", "skimage", "tifffile", "torch"):
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    return missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_host.py", description="cellseg3d GPU benchmark (writes into OUT_DIR, prints the table last)")
    parser.add_argument("out", type=Path, help="results folder (created)")
    parser.add_argument("--sizes", default=None, help="comma-separated sizes (default: small,medium,large; tiny with --device cpu)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="methods that would start later than this are skipped (default: %(default)s)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: a dry run of this script without a GPU")
    parser.add_argument("--bundle", type=Path, default=None, help="bundle directory (default: the shipped one, else the reference UNet3D)")
    parser.add_argument("--model", choices=("default", "reference"), default="default", help="as for cellseg3d bench")
    args = parser.parse_args(argv)
    missing = _missing()
    if missing:
        print(f"gpu_host.py: error: missing {', '.join(missing)}; run 'pip install -e {_ROOT}' (and a CUDA torch)", file=sys.stderr)
        return 2
    import torch

    from benchmarks.cases import parse_sizes
    from benchmarks.report import markdown, write_report
    from benchmarks.suite import SuiteConfig, run_suite

    gpu = args.device == "cuda"
    if gpu and not torch.cuda.is_available():
        print(f"gpu_host.py: error: torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU; --device cpu for a dry run", file=sys.stderr)
        return 2
    sizes = parse_sizes(args.sizes or ("small,medium,large" if gpu else "tiny"))
    args.out.mkdir(parents=True, exist_ok=True)
    log = open(args.out / "run.log", "a")  # noqa: SIM115 - open for the whole run

    def say(line: str) -> None:
        stamp = f"[{time.perf_counter() - _T0:6.1f} s] {line}"
        print(stamp, file=sys.stderr, flush=True)
        log.write(stamp + "\n")
        log.flush()

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("tensorrt", "tensorrt_lean", "onnxruntime", "monai"):
        try:
            module = importlib.import_module(name)
            say(f"{name} {getattr(module, '__version__', '?')}" + (f" providers {module.get_available_providers()}" if name == "onnxruntime" else ""))
        except ImportError as exc:
            say(f"{name}: not installed ({exc}); its rows are skipped")
    config = SuiteConfig(
        sizes=sizes, gpu=gpu, repeats=1, prefer_default_bundle=args.model == "default", bundle_dir=args.bundle,
        slab_voxels=2**25 if gpu else 2**23, size_only={"large": LARGE_METHODS},
        deadline_s=max(0.0, args.budget_s - (time.perf_counter() - _T0)), warmup_first_size=True,
    )
    doc = run_suite(config, args.out, progress=say)
    write_report(doc, args.out)
    say(f"done in {time.perf_counter() - _T0:.0f} s; files in {args.out}")
    log.close()
    print(markdown(doc), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
