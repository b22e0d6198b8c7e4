"""The ``cellseg3d`` command line: ``segment``, ``sample``, ``score``, ``info``, ``bundle`` (+ plug-ins).

Usage and input errors print one line and exit 2; other failures print one line and exit 1 (the
traceback only with ``--verbose``). Only this module configures logging handlers.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import InputError

__all__ = ["build_parser", "main", "parse_shape"]

logger = logging.getLogger("engine")

EXIT_USAGE = 2
EXIT_FAILURE = 1


def parse_shape(text: str) -> tuple[int, int, int]:
    """argparse type for ``Z,Y,X`` (or ``ZxYxX``) positive integers; plug-in CLIs use it too."""
    parts = text.replace("x", ",").split(",")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected Z,Y,X integers, got {text!r}") from None
    if len(values) != 3 or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected 3 positive integers Z,Y,X, got {text!r}")
    return values  # type: ignore[return-value]


def _parse_voxel_size(text: str) -> tuple[float, float, float]:
    """``"2,0.5,0.5"`` -> ``(2.0, 0.5, 0.5)`` (Z,Y,X in µm, each > 0)."""
    try:
        values = tuple(float(p) for p in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected Z,Y,X in µm, got {text!r}") from None
    if len(values) != 3 or not all(v > 0 and v < float("inf") for v in values):
        raise argparse.ArgumentTypeError(f"expected 3 positive numbers Z,Y,X in µm, got {text!r}")
    return values  # type: ignore[return-value]


def _add_segment(sub: argparse._SubParsersAction) -> None:
    from .backends import BACKEND_CHOICES

    p = sub.add_parser("segment", help="segment cells in a 3D TIFF stack", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("input", type=Path, help="3D TIFF (ZYX, CZYX, ImageJ hyperstack or OME-TIFF)")
    p.add_argument("-o", "--output", type=Path, required=True, help="label TIFF to write")
    p.add_argument("--bundle", type=Path, default=None, help="model bundle directory (default: the shipped model)")
    p.add_argument("--channel", type=int, default=None, help="channel to segment in a multi-channel image")
    p.add_argument("--prob", type=Path, default=None, help="also write the probability map here")
    run = p.add_argument_group("inference")
    run.add_argument("--backend", choices=BACKEND_CHOICES, default="auto", help="inference backend")
    run.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto", help="arithmetic precision")
    run.add_argument("--patch", type=parse_shape, default=None, help="patch Z,Y,X (default: the bundle's)")
    run.add_argument("--overlap", type=float, default=None, help="patch overlap fraction (default: the bundle's)")
    run.add_argument("--batch", type=int, default=None, help="patches per batch (default: 1 on CPU, fitted to the free memory on CUDA)")
    run.add_argument("--threads", type=int, default=None, help="CPU threads (default: all available)")
    scale = p.add_argument_group("scale (the network runs at the cell size and voxel grid it was trained at)")
    scale.add_argument("--voxel-size", type=_parse_voxel_size, default=None, help="Z,Y,X in µm (default: the file's, if it says)")
    scale.add_argument("--cell-diameter", type=float, default=None,
                       help="typical cell diameter: µm with a voxel size, else xy voxels (default: estimated from the data)")
    scale.add_argument("--rescale", choices=("auto", "off"), default="auto", help="off: run on the input grid as it is")
    big = p.add_argument_group("big stacks (streamed in z-slabs when the working set exceeds the memory limit)")
    big.add_argument("--memory-limit", type=float, default=None, help="host working-memory budget in GiB (default: 2, at most half the free memory)")
    big.add_argument("--slab-depth", type=int, default=None, help="planes per z-slab (default: from the memory limit)")
    big.add_argument("--halo", type=int, default=None, help="watershed halo planes on each side of a slab (default: max(8, 2*min-dist))")
    post = p.add_argument_group("post-processing (defaults from the bundle)")
    post.add_argument("--threshold", type=float, default=None, help="cell-interior probability threshold")
    post.add_argument("--min-dist", type=int, default=None, help="minimum distance between watershed seeds (voxels at the model's scale)")
    post.add_argument("--label-threshd", type=int, default=None, help="drop cells smaller than this (voxels at the model's scale)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_segment)


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
    parser = argparse.ArgumentParser(prog="cellseg3d", description="3D cell segmentation with a 3D UNet, fast.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_segment, _add_sample, _add_score, _add_info, _add_bundle):
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


def _progress_bar(enabled: bool) -> tuple[Callable[[int, int], None] | None, Callable[[], None]]:
    if not enabled:
        return None, lambda: None
    from tqdm import tqdm

    bar = tqdm(total=0, unit="vox", unit_scale=True, file=sys.stderr, leave=False)

    def update(done: int, total: int) -> None:  # voxels with final labels (SegmentOptions.progress_unit="voxel")
        bar.total = total
        bar.update(done - bar.n)

    return update, bar.close


def _cmd_segment(args: argparse.Namespace) -> int:
    from .pipeline import SegmentOptions, segment_file

    options = SegmentOptions(
        backend=args.backend, precision=args.precision, patch_shape=args.patch, overlap=args.overlap,
        batch_size=args.batch, threads=args.threads, threshold=args.threshold, min_dist=args.min_dist,
        label_threshd=args.label_threshd, slab_depth=args.slab_depth, halo=args.halo,
        memory_limit_gib=args.memory_limit, progress_unit="voxel", voxel_size_um=args.voxel_size,
        cell_diameter=args.cell_diameter, rescale=args.rescale,
    )
    update, close = _progress_bar(not args.no_progress and sys.stderr.isatty())
    try:
        result = segment_file(args.input, args.output, bundle=args.bundle, options=options, channel=args.channel, prob_path=args.prob, progress=update)
    finally:
        close()
    print(f"{args.output}: {result.report.summary()}")
    return 0


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
    """Run the CLI; returns the exit status (0 ok, 1 runtime failure, 2 usage or input error)."""
    from .errors import BackendUnavailableError, BundleError, CellSegError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except (InputError, BundleError, BackendUnavailableError) as exc:
        if args.verbose:
            logger.exception("failed")
        print(f"cellseg3d {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (CellSegError, OSError, RuntimeError, MemoryError) as exc:
        if args.verbose:
            logger.exception("failed")
        print(f"cellseg3d {args.command}: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
