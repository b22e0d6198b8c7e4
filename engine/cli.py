"""The ``cellseg3d`` command line: ``segment``, ``sample``, ``score``, ``info``, ``bundle`` (+ plug-ins).

Usage and input errors print one line and exit 2; other failures print one line and exit 1 (the
traceback only with ``--verbose``). Only this module configures logging handlers.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from .cli_args import parse_shape
from .cli_segment import add_segment
from .errors import InputError

__all__ = ["build_parser", "main", "parse_shape"]

logger = logging.getLogger("engine")

EXIT_USAGE = 2
EXIT_FAILURE = 1
HANDLED_SIGNALS = ("SIGTERM", "SIGHUP")  # SIGINT arrives as KeyboardInterrupt


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line usage error (the usage block is one ``--help`` away)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


class Interrupted(BaseException):
    """A termination signal, raised in the main thread so every ``finally`` and ``except BaseException``
    on the way out runs (temporary outputs are removed there); not an ``Exception``, like KeyboardInterrupt."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum: int, _frame: object) -> None:
    raise Interrupted(signum)


def _one_line(exc: BaseException) -> str:
    """The message on one line (library messages can span several)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="show the bundle and which backends can run here")
    p.add_argument("--bundle", type=Path, default=None, help="model bundle directory (default: the shipped model)")
    p.set_defaults(func=_cmd_info)


def _add_sample(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sample", help="write a synthetic 3D stack and its ground-truth labels", formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("output", type=Path, help="image TIFF to write; the labels go to <stem>_labels.tif beside it")
    p.add_argument("--kind", choices=("membrane", "nuclei"), default="membrane", help="membrane-stained tissue or nuclei")
    p.add_argument("--shape", type=parse_shape, default=(64, 256, 256), help="Z,Y,X in voxels")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same volume)")
    p.add_argument("--dtype", choices=("uint8", "uint16"), default="uint16", help="image pixel type")
    p.set_defaults(func=_cmd_sample)


def _add_score(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="compare a label TIFF with ground-truth labels (instance metrics)")
    p.add_argument("labels", type=Path, help="predicted label TIFF")
    p.add_argument("truth", type=Path, help="ground-truth label TIFF")
    p.add_argument("--iou", type=float, default=0.5, help="IoU a match must exceed (default: %(default)s)")
    p.set_defaults(func=_cmd_score)


def _add_bundle(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bundle", help="make a bundle from a checkpoint and a few facts", formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("checkpoint", type=Path, nargs="?", help="state dict / pytorch-3dunet / original-module checkpoint")
    p.add_argument("-o", "--out", type=Path, required=True, help="bundle directory to write")
    p.add_argument("--random", action="store_true", help="no checkpoint: random weights (smoke tests only)")
    p.add_argument("--arch", choices=("UNet3D", "Modified3DUNet"), default="UNet3D", help="architecture")
    p.add_argument("--arch-kwargs", type=json.loads, default={}, help='constructor options as JSON, e.g. \'{"f_maps": 16}\'')
    p.add_argument("--output-kind", choices=("boundary", "foreground"), default="boundary", help="what the output channel holds")
    p.add_argument("--output-channel", type=int, default=0, help="output channel of that probability")
    p.add_argument("--patch", type=parse_shape, default=(64, 128, 128), help="recommended patch Z,Y,X")
    p.add_argument("--normalization", choices=("percentile", "zscore"), default="percentile", help="input normalization")
    p.add_argument("--name", default=None, help="bundle name (default: the folder name)")
    p.set_defaults(func=_cmd_bundle)


# Sub-commands that live in the build-time packages: each module has ``register(subparsers)``. They are
# found by name so the engine's library code never depends on them (a runtime image may leave them out).
PLUGIN_MODULES = ("export.cli", "benchmarks.cli")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (kept apart from ``main`` so docs and tests can inspect it)."""
    parser = _Parser(prog="cellseg3d", description="3D cell segmentation with a 3D UNet, fast.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (add_segment, _add_sample, _add_score, _add_info, _add_bundle):
        add(sub)
    for name in PLUGIN_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name not in (name, name.split(".")[0]):
                raise
            continue
        module.register(sub)
    return parser


def _cmd_sample(args: argparse.Namespace) -> int:
    from .synthetic import write_sample

    image, labels = write_sample(args.output, kind=args.kind, shape=args.shape, seed=args.seed, dtype=args.dtype)
    print(f"{image}: synthetic {args.kind} stack {'x'.join(map(str, args.shape))}; ground truth in {labels}")
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    from .io import read_volume
    from .metrics import match_instances

    pred, truth = read_volume(args.labels).data[0], read_volume(args.truth).data[0]
    if pred.shape != truth.shape:
        raise InputError(f"{args.labels}: shape {pred.shape} differs from {args.truth}: {truth.shape}")
    s = match_instances(pred, truth, iou_threshold=args.iou)
    print(
        f"{args.labels}: {s.n_pred} cells vs {s.n_gt} true | F1@{args.iou:g}={s.f1:.3f} precision={s.precision:.3f} "
        f"recall={s.recall:.3f} mean matched IoU={s.mean_matched_iou:.3f} adapted Rand error={s.adapted_rand_error:.3f}"
    )
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from .backends import backend_status
    from .bundle import load_bundle

    bundle = load_bundle(args.bundle)
    doc: dict[str, Any] = bundle.to_json()
    print(f"bundle: {bundle.path}")
    print(json.dumps({k: doc[k] for k in ("name", "architecture", "output", "patch_shape", "overlap", "postprocess")}, indent=2))
    print("backends (auto tries them in this order):")
    for name, reason in backend_status().items():
        print(f"  {name:12s} {'available' if reason is None else 'unavailable: ' + reason}")
    return 0


def _cmd_bundle(args: argparse.Namespace) -> int:
    from .bundle import Bundle, Normalization, OutputSpec, PostprocessSpec, make_bundle
    from .models import build_model

    if (args.checkpoint is None) == (not args.random):
        raise InputError("give a checkpoint, or --random for a randomly initialised smoke-test bundle")
    kwargs = dict(args.arch_kwargs)
    channels = int(kwargs.get("in_channels", 1))
    n_out = int(getattr(build_model(args.arch, kwargs), "out_channels"))
    template = Bundle(
        path=args.out, name=args.name or args.out.name, architecture=args.arch, arch_kwargs=kwargs, in_channels=channels,
        normalization=Normalization(kind=args.normalization),
        output=OutputSpec(kind=args.output_kind, channel=args.output_channel, names=tuple(f"ch{i}" for i in range(n_out))),
        patch_shape=args.patch, overlap=0.25,
        postprocess=PostprocessSpec(method="watershed"),
        description="random weights (smoke test only)" if args.random else f"made from {args.checkpoint}",
    )
    bundle = make_bundle(args.checkpoint, args.out, template=template)
    print(f"{bundle.path}: bundle {bundle.name} written ({bundle.architecture})")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status: 0 ok, 1 runtime failure, 2 usage or input error, 128 + n after
    signal n (SIGINT, SIGTERM, SIGHUP), each failure with one line on stderr."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # usage error (one line printed) or --help
        return int(exc.code or 0)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    previous = {name: signal.signal(getattr(signal, name), _raise_interrupted) for name in HANDLED_SIGNALS if hasattr(signal, name)}
    try:
        return _dispatch(args)
    finally:
        for name, handler in previous.items():
            signal.signal(getattr(signal, name), handler)


def _dispatch(args: argparse.Namespace) -> int:
    from .errors import BackendUnavailableError, BundleError, CellSegError

    try:
        return int(args.func(args))
    except (InputError, BundleError, BackendUnavailableError) as exc:
        code, text = EXIT_USAGE, f"error: {_one_line(exc)}"
    except (CellSegError, OSError, RuntimeError, MemoryError) as exc:
        code, text = EXIT_FAILURE, f"failed: {type(exc).__name__}: {_one_line(exc)}"
    except (KeyboardInterrupt, Interrupted) as exc:
        signum = exc.signum if isinstance(exc, Interrupted) else int(signal.SIGINT)
        code, text = 128 + signum, f"interrupted by {signal.Signals(signum).name}; unfinished outputs removed"
    if args.verbose:
        logger.exception("failed")
    print(f"cellseg3d {args.command}: {text}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
