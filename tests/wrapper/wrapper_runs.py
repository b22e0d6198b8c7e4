"""Running PythonScriptWrapper.py as BisQue's engine does, for the wrapper tests: a real subprocess with the
test bundle, bounded HTTP, and checks that no secret reaches the output or the wire."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from bisque_server import BisqueTestServer

from engine.bundle import Bundle

__all__ = ["BOUND_S", "FAST_HTTP", "SHAPE", "WRAPPER", "Ran", "cells_tiff", "error_message", "metadata_values",
           "no_token_on_the_wire", "run_wrapper"]

WRAPPER = Path(__file__).resolve().parents[2] / "wrapper" / "PythonScriptWrapper.py"
SHAPE = (12, 24, 28)
BOUND_S = 30.0  # a failing run must end within this (bqapi's own policy would retry for ~50 minutes)
FAST_HTTP = {"CELLSEG3D_HTTP_TIMEOUT": "3", "CELLSEG3D_HTTP_RETRIES": "1", "CELLSEG3D_HTTP_BACKOFF": "0"}


def cells_tiff() -> tuple[bytes, np.ndarray]:
    """Three bright blobs in a (12, 24, 28) uint16 ImageJ stack with voxel size (2, 0.5, 0.5) µm."""
    rng = np.random.default_rng(0)
    z, y, x = np.mgrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    img = np.zeros(SHAPE, np.float32)
    for cz, cy, cx in [(4, 7, 8), (8, 16, 20), (6, 8, 20)]:
        img += np.exp(-((z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2) / 12.0)
    img = (img * 3000 + rng.normal(200, 20, SHAPE)).clip(0, 65535).astype(np.uint16)
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, img, imagej=True, metadata={"axes": "ZYX", "spacing": 2.0, "unit": "um"},
                     resolution=(2.0, 2.0))
    return buffer.getvalue(), img


@dataclass
class Ran:
    """A finished wrapper process."""

    rc: int
    out: str
    err: str
    seconds: float


def run_wrapper(bundle: Bundle, *args: str, env: dict[str, str] | None = None, secrets: tuple[str, ...] = ()) -> Ran:
    """Run the wrapper script; assert it ended in bounded time and printed no secret."""
    environment = {**os.environ, "CELLSEG3D_BUNDLE": str(bundle.path), **FAST_HTTP, **(env or {})}
    start = time.monotonic()
    done = subprocess.run([sys.executable, str(WRAPPER), *args], capture_output=True, text=True,
                          env=environment, timeout=120, check=False)
    ran = Ran(done.returncode, done.stdout, done.stderr, time.monotonic() - start)
    for secret in secrets:
        assert secret not in ran.out + ran.err, "a secret reached the output"
    return ran


def no_token_on_the_wire(server: BisqueTestServer, token: str) -> None:
    """The token travelled only in the ``Authorization`` header."""
    assert not [r for r in server.requests if token in r.path + r.query or token.encode() in r.body]
    assert {r.headers.get("authorization") for r in server.requests if r.path != "/services"} == {f"Mex {token}"}


def error_message(server: BisqueTestServer, mex_url: str) -> str:
    """The MEX's ``error_message`` tag, or ''."""
    tag = server.mex_document(mex_url).find("tag[@name='error_message']")
    return "" if tag is None else tag.get("value", "")


def metadata_values(outputs: dict[str, ET.Element]) -> dict[str, str]:
    """The flat values of the ``Metadata`` output."""
    return {t.get("name", ""): t.get("value", "") for t in outputs["Metadata"] if t.get("value") is not None}
