#!/usr/bin/env python3
r"""CellSegment3DUnet, the BisQue module: fetch a 3D image, segment its cells with ``engine``, post the results.

BisQue's engine runs, in the module folder (``/module`` in the image)::

    python PythonScriptWrapper.py <resource_url> <threshold> <min_dist> <label_threshd> <mex_url> <user:token>

that is the inputs in module-XML order, then the MEX URL and its token. Inputs in the MEX's ``inputs`` tag win
over the positional values (an empty one means the model bundle's default); a positional value counts only for
an input the MEX lacks. The MEX status
follows the run (``fetching image``, ``segmenting n%``, ``uploading results``) and ends ``FINISHED`` with the
outputs ``Segmentation`` (label image), ``Cell table`` (CSV: volume, centroid, bounding box, neighbours per
cell) and ``Metadata`` (cell count, backend, precision, timings, parameters). On any failure the MEX ends
``FAILED`` with a one-line ``error_message`` and the exit status is 1; it is never ``FINISHED`` afterwards.

By hand, for debugging::

    python PythonScriptWrapper.py --user USER --pwd PASSWORD --root http://host:8080 <resource_url> [t d l]
    python PythonScriptWrapper.py --local stack.tif [threshold min_dist label_threshd] --out-dir results/

Environment: ``CELLSEG3D_BUNDLE`` (model bundle folder; default the shipped one), ``CELLSEG3D_BACKEND``
(default ``auto``), ``CELLSEG3D_HTTP_TIMEOUT`` / ``_RETRIES`` / ``_BACKOFF`` (see ``wrapper.bisque_io``).
Exit status: 0 done, 1 failed, 2 usage error. Neither the token nor the password is ever logged.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

__all__ = ["INPUTS", "Params", "UsageError", "build_parser", "resolve_params", "main"]

logger = logging.getLogger("cellseg3d.module")

MODULE = "CellSegment3DUnet"
INPUTS = ("resource_url", "threshold", "min_dist", "label_threshd")  # module-XML order
_MISSING = ("", "none", "null")


class UsageError(ValueError):
    """Bad module arguments or MEX inputs; the message names the input and echoes its value."""


class _Terminated(Exception):
    """SIGTERM (``docker stop``): reported like any other failure."""


@dataclass(frozen=True)
class Params:
    """The run's inputs after MEX / argument / bundle-default resolution; ``origin`` says where each came from."""

    resource_url: str
    threshold: float | None = None
    min_dist: int | None = None
    label_threshd: int | None = None
    origin: dict[str, str] = field(default_factory=dict)


def _convert(name: str, raw: Any) -> str | float | int:
    if name == "resource_url":
        return str(raw).strip()
    try:
        number = float(raw)
    except (TypeError, ValueError):
        raise UsageError(f"{name} must be a number, got {raw!r}") from None
    if name == "threshold":
        if not 0.0 <= number <= 1.0:
            raise UsageError(f"threshold must be between 0 and 1, got {raw!r}")
        return number
    if number < 0 or not number.is_integer():
        raise UsageError(f"{name} must be a whole number >= 0, got {raw!r}")
    return int(number)


def resolve_params(positional: Sequence[str], mex_inputs: Mapping[str, Any], /) -> Params:
    """Merge the inputs: an input the MEX has wins (empty there means the bundle's default); the positional
    value counts only for an input the MEX lacks (or with no MEX), since BisQue may drop empty arguments.

    Raises:
        UsageError: no resource, or a value that is not a valid number for its input.
    """
    given = dict(zip(INPUTS, positional))
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for name in INPUTS:
        where, raw = ("MEX", mex_inputs[name]) if name in mex_inputs else ("argument", given.get(name))
        if raw is None or str(raw).strip().lower() in _MISSING:
            origin[name] = "bundle default"
        else:
            values[name], origin[name] = _convert(name, raw), where
    if "resource_url" not in values:
        raise UsageError("no resource_url: give it as the first argument or as the MEX input 'resource_url'")
    return Params(**values, origin=origin)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (kept apart from ``main`` for docs and tests)."""
    parser = argparse.ArgumentParser(
        prog="PythonScriptWrapper.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description=f"{MODULE} BisQue module: 3D cell segmentation with a 3D UNet.")
    parser.add_argument("args", nargs="*", metavar="ARG",
                        help="resource_url threshold min_dist label_threshd mex_url token (as BisQue runs it); "
                             "by hand, only the inputs (resource_url or, with --local, a TIFF path, first)")
    manual = parser.add_argument_group("running by hand, without a MEX")
    manual.add_argument("--user", help="BisQue user (with --pwd and --root)")
    manual.add_argument("--pwd", help="BisQue password")
    manual.add_argument("--root", help="BisQue server root URL, e.g. http://host:8080")
    manual.add_argument("--local", action="store_true", help="no BisQue: the first ARG is a local TIFF")
    manual.add_argument("--out-dir", type=Path, default=Path("."), help="where --local writes its results")
    run = parser.add_argument_group("run")
    run.add_argument("--bundle", default=os.environ.get("CELLSEG3D_BUNDLE"),
                     help="model bundle folder (env CELLSEG3D_BUNDLE; none: the shipped model)")
    run.add_argument("--backend", default=os.environ.get("CELLSEG3D_BACKEND", "auto"),
                     help="inference backend (env CELLSEG3D_BACKEND)")
    run.add_argument("--source", choices=("auto", "image-service", "blob"), default="auto",
                     help="fetch an image as TIFF from the image service, or its original file (blob)")
    run.add_argument("--workdir", type=Path, default=None, help="folder for temporary files (default: system temp)")
    parser.add_argument("--log-file", type=Path, default=None, help="also log to this file")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (bqapi and HTTP included)")
    return parser


class _Redacting(logging.Formatter):
    def __init__(self, fmt: str, secrets: Sequence[str]) -> None:
        super().__init__(fmt)
        self._secrets = [s for s in secrets if s]

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text


def _configure_logging(verbose: bool, log_file: Path | None, secrets: Sequence[str]) -> _Redacting:
    formatter = _Redacting("%(asctime)s %(levelname)s %(name)s: %(message)s", secrets)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    # bqapi logs every expected 404 with a traceback, and a warning about pytables on import
    logging.getLogger("bqapi").setLevel(logging.DEBUG if verbose else logging.CRITICAL)
    logging.getLogger("urllib3").setLevel(logging.DEBUG if verbose else logging.WARNING)
    return formatter


def _one_line(exc: BaseException, stage: str, secrets: Sequence[str]) -> str:
    """``stage: what went wrong`` on one line (BisQue errors already say where), secrets masked."""
    from wrapper.bisque_io import BisqueError

    errors = sys.modules.get("engine.errors")  # not imported yet: cannot be an engine error (and spare torch)
    plain = (BisqueError, UsageError, _Terminated) + ((errors.CellSegError,) if errors is not None else ())
    detail = str(exc) if isinstance(exc, plain) else f"{type(exc).__name__}: {exc}"
    text = " ".join((detail if isinstance(exc, BisqueError) else f"{stage}: {detail}").split())
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text[:600]


def _metadata(result: Any, params: Params, bundle: Any, voxel: tuple[float, ...] | None,
              io_s: Mapping[str, float] | None = None) -> dict[str, Any]:
    """The ``Metadata`` output: what ran, with which parameters, and the seconds per stage (``io_s``: the
    wrapper's own, such as fetch and upload)."""
    report = result.report
    timings = {**report.timings, **(io_s or {})}
    return {
        "cell_count": report.n_cells, "backend": report.backend, "precision": report.precision,
        "device": report.device, "patch_shape": "x".join(map(str, report.patch_shape)),
        "batch_size": report.batch_size, "model": bundle.name, "input": params.resource_url,
        "image_shape": "x".join(map(str, report.shape[-3:])),
        "voxel_size_um": "x".join(f"{v:g}" for v in voxel) if voxel else "unknown",
        "threshold": params.threshold if params.threshold is not None else bundle.postprocess.threshold,
        "min_dist": params.min_dist if params.min_dist is not None else bundle.postprocess.min_dist,
        "label_threshd": params.label_threshd if params.label_threshd is not None else bundle.postprocess.label_threshd,
        "timings": {**{k: round(v, 3) for k, v in timings.items()}, "total": round(sum(timings.values()), 3)},
    }


def _tag(name: str, value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return {"name": name, "tag": [_tag(k, v) for k, v in value.items()]}
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    return {"name": name, "value": str(value), **({"type": "number"} if numeric else {})}


def outputs_tag(segmentation_uri: str, table_uri: str, metadata: Mapping[str, Any], /) -> dict[str, Any]:
    """The MEX ``outputs`` tag as bqapi tag dicts."""
    return {"name": "outputs", "tag": [
        {"name": "Segmentation", "type": "image", "value": segmentation_uri},
        {"name": "Cell table", "type": "table", "value": table_uri},
        _tag("Metadata", dict(metadata)),
    ]}


class _Run:
    """One module run: the steps, and ``stage`` for the failure message."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.stage = "starting"
        self._bundle: Any = None

    def bundle(self) -> Any:
        """The model bundle, loaded once (before any download, so a missing model fails fast)."""
        if self._bundle is None:
            from engine import load_bundle

            self.stage = "loading the model"
            self._bundle = load_bundle(self.args.bundle)
        return self._bundle

    def segment(self, image: Path, out_dir: Path, params: Params, progress: Any,
                voxel_size_um: tuple[float, float, float] | None = None) -> tuple[Any, Path, Path, Any]:
        """Segment ``image`` into ``out_dir`` (``voxel_size_um``: from the image's metadata, overriding the
        file's: the image service re-encodes TIFFs without ImageJ spacing); returns (result, labels path,
        table path, voxel size)."""
        from engine import SegmentOptions, segment_file

        bundle = self.bundle()
        self.stage = f"segmenting {image.name}"
        stem = image.name.split(".")[0] or "image"
        labels_path, table_path = out_dir / f"{stem}_labels.tif", out_dir / f"{stem}_cells.csv"
        options = SegmentOptions(backend=self.args.backend, threshold=params.threshold, min_dist=params.min_dist,
                                 label_threshd=params.label_threshd, voxel_size_um=voxel_size_um)
        result = segment_file(image, labels_path, bundle=bundle, options=options, progress=progress)
        logger.info("%s: %s", image.name, result.report.summary())
        self.stage = "measuring cells"
        return result, labels_path, table_path, result.report.voxel_size_um

    def local(self, inputs: Sequence[str]) -> dict[str, Any]:
        """``--local``: segment a TIFF into ``--out-dir``; no BisQue."""
        from engine.cells import cell_table, write_cell_table_csv

        params = resolve_params(inputs, {})
        result, labels_path, table_path, voxel = self.segment(Path(params.resource_url), self.args.out_dir, params, None)
        write_cell_table_csv(table_path, cell_table(result.labels, voxel_size_um=voxel))
        return {"Segmentation": str(labels_path), "Cell table": str(table_path),
                "Metadata": _metadata(result, params, self.bundle(), voxel)}

    def bisque(self, bq: Any, mex: Any, inputs: Sequence[str], workdir: Path) -> dict[str, Any]:
        """Inputs -> fetch -> segment -> measure -> upload -> FINISHED (checked)."""
        from engine.cells import cell_table, write_cell_table_csv
        from wrapper.bisque_io import BisqueError, fetch_resource, upload_file, voxel_size_from_meta

        self.stage = "reading the inputs"
        params = resolve_params(inputs, bq.parameters() if bq.mex is not None else {})
        logger.info("inputs: %s", ", ".join(f"{k}={getattr(params, k)} ({v})" for k, v in params.origin.items()))
        self.bundle()
        self.stage = "fetching the image"
        mex.update("fetching image")
        started = time.perf_counter()
        fetched = fetch_resource(bq, params.resource_url, workdir, source=self.args.source)
        io_s = {"fetch": time.perf_counter() - started}
        mex.update("segmenting 0%")
        meta_voxel = voxel_size_from_meta(bq, fetched.uniq) if fetched.kind == "image" else None
        result, labels_path, table_path, voxel = self.segment(
            fetched.path, workdir, params, mex.progress("segmenting"), voxel_size_um=meta_voxel
        )
        write_cell_table_csv(table_path, cell_table(result.labels, voxel_size_um=voxel))
        self.stage = "uploading results"
        mex.update("uploading results")
        folder, started = f"ModuleExecutions/{MODULE}", time.perf_counter()
        segmentation = upload_file(bq, labels_path, kind="image", name=f"{folder}/{labels_path.name}")
        try:
            table_uri = upload_file(bq, table_path, kind="table", name=f"{folder}/{table_path.name}")
        except BisqueError as exc:
            raise BisqueError(f"{exc}; the label image had been uploaded as {segmentation}") from exc
        io_s["upload"] = time.perf_counter() - started
        metadata = _metadata(result, params, self.bundle(), voxel, io_s)
        self.stage = "finishing the MEX"
        mex.finish(outputs_tag(segmentation, table_uri, metadata))
        return {"Segmentation": segmentation, "Cell table": table_uri, "Metadata": metadata}


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise _Terminated(f"stopped by {signal.Signals(signum).name}")


def _run_bisque(run: _Run, inputs: Sequence[str], mex_url: str | None, token: str | None,
                secrets: Sequence[str]) -> int:
    from wrapper.bisque_io import HttpPolicy, open_mex_session, open_user_session
    from wrapper.mex import Mex, post_status_directly

    args, policy, mex, bq = run.args, HttpPolicy.from_env(), Mex(None), None
    try:
        with tempfile.TemporaryDirectory(prefix="cellseg3d-", dir=args.workdir) as workdir:
            run.stage = "opening the BisQue session"
            if mex_url is not None and token is not None:
                bq = open_mex_session(mex_url, token, policy=policy)
            else:
                bq = open_user_session(args.root, args.user, args.pwd, policy=policy)
            mex = Mex(bq)
            outputs = run.bisque(bq, mex, inputs, Path(workdir))
    except (Exception, KeyboardInterrupt) as exc:  # the module's boundary: every failure goes to the MEX
        message = _one_line(exc, run.stage, secrets)
        logger.debug("traceback", exc_info=True)
        logger.error("FAILED: %s", message)
        if mex.bq is not None:
            told = mex.fail(message)
        elif mex_url is not None and token is not None and getattr(exc, "reportable", True):
            told = post_status_directly(mex_url, token, message, policy=policy)
        else:
            told = mex_url is None  # by hand there is no MEX to tell
        if not told:
            logger.error("the MEX could not be marked FAILED; BisQue will see the nonzero exit status")
        print(f"{MODULE} failed: {message}", file=sys.stderr)
        return 1
    print(json.dumps(outputs, indent=1))
    logger.info("FINISHED: %s", outputs["Segmentation"])
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the module; returns the exit status (0 done, 1 failed, 2 usage error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    by_hand = bool(args.user or args.pwd or args.root)
    if by_hand and not (args.user and args.pwd and args.root):
        parser.error("--user, --pwd and --root go together")
    positional: list[str] = list(args.args)
    mex_url = token = None
    if not (by_hand or args.local):
        if len(positional) < 2:
            parser.error("expected [inputs...] <mex_url> <token>; run by hand with --user/--pwd/--root or --local")
        positional, mex_url, token = positional[:-2], positional[-2], positional[-1]
    if len(positional) > len(INPUTS):
        parser.error(f"at most {len(INPUTS)} inputs ({' '.join(INPUTS)}) come before <mex_url> <token>, "
                     f"got {len(positional)}")
    secrets = [s for s in (token, args.pwd) if s]
    _configure_logging(args.verbose, args.log_file, secrets)
    signal.signal(signal.SIGTERM, _on_sigterm)
    run = _Run(args)
    if not args.local:
        return _run_bisque(run, positional, mex_url, token, secrets)
    try:
        outputs = run.local(positional)
    except (Exception, KeyboardInterrupt) as exc:  # the CLI's boundary: one line, nonzero exit
        logger.debug("traceback", exc_info=True)
        print(f"{MODULE} failed: {_one_line(exc, run.stage, secrets)}", file=sys.stderr)
        return 1
    print(json.dumps(outputs, indent=1))
    return 0


if __name__ == "__main__":
    if __package__ in (None, ""):  # run as a script: make a checkout that is not pip-installed importable
        try:
            import wrapper  # noqa: F401
        except ModuleNotFoundError:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
