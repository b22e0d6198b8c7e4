#!/usr/bin/env python3
# ruff: noqa: N999 - BisQue runs the module by this file name
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
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

try:
    import wrapper  # noqa: F401 - pip-installed (the image), or a checkout on sys.path
except ModuleNotFoundError:  # run as a script from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wrapper.inputs import INPUTS, Params, UsageError, resolve_params

__all__ = ["INPUTS", "Params", "UsageError", "build_parser", "main", "resolve_params"]

logger = logging.getLogger("cellseg3d.module")

MODULE = "CellSegment3DUnet"


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


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    from wrapper.errors import Terminated

    raise Terminated(f"stopped by {signal.Signals(signum).name}")


def _report_failure(exc: BaseException, run: Any, session: Any, mex_url: str | None, token: str | None,
                    secrets: Sequence[str]) -> None:
    """Mark the MEX FAILED with a one-line message (through the session, else straight by URL)."""
    from wrapper.bisque_io import HttpPolicy
    from wrapper.errors import one_line
    from wrapper.mex import Mex, post_status_directly

    message = one_line(exc, run.stage, secrets)
    logger.debug("traceback", exc_info=exc)
    logger.error("FAILED: %s", message)
    if session is not None and session.mex is not None:
        told = Mex(session).fail(message)
    elif mex_url is not None and token is not None and getattr(exc, "reportable", True):
        told = post_status_directly(mex_url, token, message, policy=HttpPolicy.from_env())
    else:
        told = mex_url is None  # by hand there is no MEX to tell
    if not told:
        logger.error("the MEX could not be marked FAILED; BisQue will see the nonzero exit status")
    print(f"{MODULE} failed: {message}", file=sys.stderr)


def _run_bisque(run: Any, inputs: list[str], mex_url: str | None, token: str | None,
                secrets: Sequence[str]) -> int:
    from wrapper.bisque_io import HttpPolicy, open_mex_session, open_user_session
    from wrapper.errors import Terminated

    args, policy, session = run.args, HttpPolicy.from_env(), None
    try:
        with tempfile.TemporaryDirectory(prefix="cellseg3d-", dir=args.workdir) as workdir:
            run.stage = "opening the BisQue session"
            if mex_url is not None and token is not None:
                session = open_mex_session(mex_url, token, policy=policy)
            else:
                session = open_user_session(args.root, args.user, args.pwd, policy=policy)
            outputs = run.bisque(session, inputs, Path(workdir))
    except (Exception, KeyboardInterrupt, Terminated) as exc:  # noqa: BLE001 - the boundary: every failure goes to the MEX
        _report_failure(exc, run, session, mex_url, token, secrets)
        return 1
    finally:
        run.close()
    print(json.dumps(outputs, indent=1))
    logger.info("FINISHED")
    return 0


def _run_local(run: Any, inputs: list[str], secrets: Sequence[str]) -> int:
    from wrapper.errors import Terminated, one_line

    try:
        outputs = run.local(inputs)
    except (Exception, KeyboardInterrupt, Terminated) as exc:
        logger.debug("traceback", exc_info=exc)
        print(f"{MODULE} failed: {one_line(exc, run.stage, secrets)}", file=sys.stderr)
        return 1
    finally:
        run.close()
    print(json.dumps(outputs, indent=1))
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
    from wrapper.module_run import ModuleRun

    run = ModuleRun(args, secrets=secrets)
    if args.local:
        return _run_local(run, positional, secrets)
    return _run_bisque(run, positional, mex_url, token, secrets)


if __name__ == "__main__":
    sys.exit(main())
