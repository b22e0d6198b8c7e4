"""``cellseg3d export``: the build-time sub-command (found by name from ``engine.cli``).

Exit codes follow the engine CLI: 0 when every file was written and every gate passed, 1 when a gate
failed or a check rejected a file, 2 for usage and input errors.
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``export`` sub-command to the ``cellseg3d`` parser."""
    p = sub.add_parser(
        "export",
        help="export a bundle or checkpoint to ONNX (fp32, fp16) and a TensorRT plan",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("source", type=Path, metavar="BUNDLE|CHECKPOINT", help="bundle folder, or a checkpoint file (needs --out)")
    p.add_argument("--out", type=Path, default=None, help="bundle folder to write (default: export into BUNDLE itself)")
    p.add_argument("--opset", type=int, default=18, choices=(18, 19, 20), help="ONNX opset")
    trt = p.add_argument_group("TensorRT (only where TensorRT and a GPU are present)")
    trt.add_argument("--max-batch", type=int, default=8, help="largest batch of the plan's optimization profile")
    trt.add_argument("--workspace-gib", type=float, default=4.0, help="builder workspace limit (GiB)")
    trt.add_argument("--no-trt", action="store_true", help="write the ONNX files only")
    trt.add_argument(
        "--lean", action="store_true",
        help="version-compatible plan without the lean runtime inside: runs on the small tensorrt_lean package "
        "(no lazy rebuild there), may be slower than a plan for one TensorRT version",
    )
    p.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    from .bundle_export import ExportOptions, export_bundle, resolve_source

    options = ExportOptions(
        opset=args.opset, max_batch=args.max_batch, tensorrt=not args.no_trt, lean=args.lean, workspace_gib=args.workspace_gib
    )
    bundle = resolve_source(args.source, out=args.out)
    summary = export_bundle(bundle, options=options)
    for line in summary.lines:
        print(line)
    print(f"{summary.bundle.path / 'bundle.json'}: export results recorded")
    return 0 if summary.ok else 1
