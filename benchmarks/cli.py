"""``cellseg3d bench``: run the benchmark suite in this process and write JSON, markdown table and plot.

Found by name from ``engine.cli`` (``register(subparsers)``), so the runtime never imports it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from engine.cli import parse_shape
from engine.errors import InputError

__all__ = ["register", "build_parser", "run"]

logger = logging.getLogger(__name__)


def _sizes(text: str) -> list[str]:
    from .cases import parse_sizes

    try:
        return parse_sizes(text)
    except InputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpu", action="store_true", help="benchmark the CUDA backends and run the peers on the GPU")
    p.add_argument("--sizes", type=_sizes, default=None,
                   help="comma-separated volume sizes: tiny, small (64x256x256), medium (128x512x512), large (256x1024x1024); "
                        "default: small, or small,medium,large with --gpu")
    p.add_argument("--out", type=Path, default=Path("bench_results"), help="results folder (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=None, help="timed repetitions per method, best kept (default: 1 on CPU, 3 on GPU)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the method list this many times round-robin, keeping each method's best (default: %(default)s)")
    p.add_argument("--only", default="", help="comma-separated substrings: run only methods whose name contains one")
    p.add_argument("--model", choices=("default", "reference"), default="default",
                   help="default: the shipped bundle when installed (else the reference); reference: the issue's random UNet3D f_maps 16, 4 levels")
    p.add_argument("--bundle", type=Path, default=None, help="benchmark this bundle directory instead of --model")
    p.add_argument("--keep-labels", action="store_true", help="keep every run's label TIFF in OUT/labels")
    p.add_argument("--peer-patch", type=parse_shape, default=(64, 128, 128),
                   help="patch the peers run with (MONAI's roi_size), Z,Y,X (default: 64,128,128, the issue's reference)")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``bench`` sub-command to ``cellseg3d``."""
    p = sub.add_parser("bench", help="benchmark this engine against MONAI, pytorch-3dunet and the original loop")
    _add_arguments(p)
    p.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    """A stand-alone parser (``python -m benchmarks.cli``) with the same options."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.cli", description="benchmark this engine against its peers")
    _add_arguments(p)
    return p


def run(args: argparse.Namespace) -> int:
    """Run the suite, write ``results.json``, ``results.md``, ``results.png`` into ``--out``, print the table."""
    from .report import markdown, write_report
    from .suite import SuiteConfig, run_suite

    if args.repeats is not None and args.repeats < 1:
        raise InputError(f"--repeats must be >= 1, got {args.repeats}")
    if args.rounds < 1:
        raise InputError(f"--rounds must be >= 1, got {args.rounds}")
    sizes = args.sizes or (["small", "medium", "large"] if args.gpu else ["small"])
    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            raise InputError(f"--gpu: torch {torch.__version__} sees no CUDA device")
    config = SuiteConfig(
        sizes=sizes, gpu=args.gpu, repeats=args.repeats or (3 if args.gpu else 1),
        only=tuple(s for s in args.only.split(",") if s), prefer_default_bundle=args.model == "default",
        slab_voxels=2**25 if args.gpu else 2**23, bundle_dir=args.bundle,
        keep_labels=args.keep_labels, peer_patch=args.peer_patch, rounds=args.rounds,
    )
    doc = run_suite(config, args.out, progress=lambda line: print(line, file=sys.stderr, flush=True))
    paths = write_report(doc, args.out)
    print(markdown(doc))
    print(f"wrote {args.out / 'results.json'}, " + ", ".join(str(p) for p in paths), file=sys.stderr)
    return 0


if __name__ == "__main__":
    _args = build_parser().parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(run(_args))
