"""PythonScriptWrapper.py as BisQue's engine runs it: a real subprocess, the real bqapi client (bisque-api
0.5.12.2), the project's BisQue test server over HTTP on 127.0.0.1, and a tiny random model bundle.

Every run is checked for a bounded duration and for the token (and password) never reaching stdout, stderr,
the log file or the server outside the ``Authorization`` header.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import tifffile

pytest.importorskip("bqapi")
from bisque_engine import engine_runs, module_definition, submit, web_ui_mex
from bisque_server import BisqueTestServer
from wrapper_runs import (
    BOUND_S,
    FAST_HTTP,
    WRAPPER,
    cells_tiff,
    error_message,
    metadata_values,
    no_token_on_the_wire,
    run_wrapper,
)

from engine.bundle import Bundle
from engine.io import open_volume


@pytest.fixture
def image(bisque_server: BisqueTestServer) -> tuple[BisqueTestServer, str, np.ndarray]:
    data, array = cells_tiff()
    uri, _ = bisque_server.add_image(data, "cells.tif")
    return bisque_server, uri, array


@pytest.fixture(scope="module")
def module() -> ModuleType:
    """The wrapper script imported in-process, for its pure functions."""
    spec = importlib.util.spec_from_file_location("PythonScriptWrapper", WRAPPER)
    assert spec is not None and spec.loader is not None
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = loaded  # dataclasses look their module up there
    spec.loader.exec_module(loaded)
    return loaded


def _web_ui_run(server: BisqueTestServer, values: dict[str, str | None]) -> tuple[str, str, list[str]]:
    """Submit a MEX as the web UI and the module service do; the engine's command line for it."""
    mex_url, token = submit(server, web_ui_mex(module_definition(), values))
    (argv,) = engine_runs(server, mex_url, token)
    return mex_url, token, argv


def _label_voxel(data: bytes, tmp_path: Path) -> tuple[float, float, float] | None:
    (tmp_path / "uploaded_labels.tif").write_bytes(data)
    with open_volume(tmp_path / "uploaded_labels.tif") as labels:
        return labels.voxel_size_um


def test_full_run_finishes_with_outputs(image: Any, tiny_bundle: Bundle, tmp_path: Path) -> None:
    server, image_uri, array = image
    mex_url, token, argv = _web_ui_run(server, {"resource_url": image_uri, "threshold": "0.05", "min_dist": "2",
                                                "label_threshd": "3"})
    log_file = tmp_path / "PythonScript.log"
    ran = run_wrapper(tiny_bundle, "-v", "--log-file", str(log_file), *argv, secrets=(token,))
    assert ran.rc == 0, ran.err
    assert token not in log_file.read_text() and "DEBUG" in log_file.read_text()
    history = server.mex_history(mex_url)
    assert history[:5] == ["PENDING", "DISPATCH", "starting", "fetching image", "segmenting 0%"]
    assert history[-2:] == ["uploading results", "FINISHED"] and "segmenting 100%" in history
    assert "FAILED" not in history

    outputs = server.mex_outputs(mex_url)
    labels_upload, table_upload = server.uploads
    assert outputs["Segmentation"].attrib == {"name": "Segmentation", "type": "image", "value": labels_upload.uri}
    assert outputs["Cell table"].attrib == {"name": "Cell table", "type": "table", "value": table_upload.uri}
    assert labels_upload.name == "ModuleExecutions/CellSegment3DUnet/cells_labels.tif"
    assert (labels_upload.xml.tag, table_upload.xml.tag) == ("image", "table")
    labels = tifffile.imread(io.BytesIO(labels_upload.data))
    assert labels.shape == array.shape

    meta = metadata_values(outputs)
    assert int(meta["cell_count"]) == int(labels.max()) == len(np.unique(labels[labels > 0]))
    assert meta["backend"] and meta["precision"] and meta["device"]
    assert (meta["threshold"], meta["min_dist"], meta["label_threshd"]) == ("0.05", "2", "3")
    assert meta["threshold_used"] == "0.05"  # a threshold under 0.5 is never lowered, on any grid
    # the image service sent a TIFF without spacing: the voxel size came from ?meta, and went into the labels
    assert meta["voxel_size_um"] == "2x0.5x0.5" and meta["image_shape"] == "12x24x28"
    assert _label_voxel(labels_upload.data, tmp_path) == (2.0, 0.5, 0.5)
    timings = {t.get("name"): float(t.get("value", "nan")) for t in outputs["Metadata"].find("tag[@name='timings']")}
    assert {"fetch", "read", "infer", "postprocess", "upload", "total"} <= set(timings) and timings["total"] > 0

    rows = list(csv.DictReader(io.StringIO(table_upload.data.decode())))
    assert len(rows) == int(meta["cell_count"])
    assert sum(int(r["volume_voxels"]) for r in rows) == int((labels > 0).sum())
    assert rows == [] or float(rows[0]["volume_um3"]) == pytest.approx(int(rows[0]["volume_voxels"]) * 0.5)
    no_token_on_the_wire(server, token)
    assert not server.errors


def test_voxel_size_only_in_the_image_metadata(bisque_server: BisqueTestServer, tiny_bundle: Bundle,
                                               tmp_path: Path) -> None:
    """A file without any spacing whose BisQue metadata has one: the engine runs with it, the labels carry it."""
    _, array = cells_tiff()
    plain = io.BytesIO()
    tifffile.imwrite(plain, array, photometric="minisblack")
    meta = {"pixel_resolution_x": "0.4", "pixel_resolution_y": "0.4", "pixel_resolution_z": "1.5"}
    image_uri, _ = bisque_server.add_image(plain.getvalue(), "plain.tif", meta=meta)
    mex_url, token, argv = _web_ui_run(bisque_server, {"resource_url": image_uri})
    ran = run_wrapper(tiny_bundle, *argv, secrets=(token,))
    assert ran.rc == 0, ran.err
    assert metadata_values(bisque_server.mex_outputs(mex_url))["voxel_size_um"] == "1.5x0.4x0.4"
    assert _label_voxel(bisque_server.uploads[0].data, tmp_path) == pytest.approx((1.5, 0.4, 0.4))


def test_empty_typed_inputs_are_the_defaults_and_shifted_positionals_are_ignored(image: Any,
                                                                                 tiny_bundle: Bundle) -> None:
    """The engine drops the empty threshold, so min_dist's value arrives in threshold's place: the module must
    read the MEX (where threshold is empty: the bundle's default) and not the arguments."""
    server, image_uri, _ = image
    mex_url, token, argv = _web_ui_run(server, {"resource_url": image_uri, "threshold": "", "min_dist": "4"})
    assert argv[1:3] == ["4", "50"]  # threshold 4 and min_dist 50 if read by position
    ran = run_wrapper(tiny_bundle, *argv, secrets=(token,))
    assert ran.rc == 0, ran.err
    meta = metadata_values(server.mex_outputs(mex_url))
    expected = (image_uri, str(tiny_bundle.postprocess.threshold), "4", "50")
    assert (meta["input"], meta["threshold"], meta["min_dist"], meta["label_threshd"]) == expected
    assert server.mex_status(mex_url) == "FINISHED"
    assert "positional inputs ignored" in ran.err


def _missing(server: BisqueTestServer, uri: str) -> str:
    return f"{server.root}/data_service/00-missing"


def _html_blob(server: BisqueTestServer, uri: str) -> str:
    return server.add_blob(b"<html><body>Internal proxy error</body></html>", "cells.tif")[0]


def _fail_500(server: BisqueTestServer, uri: str) -> str:
    server.fail_next("/image_service/", 500, times=10)
    return uri


def _cut(server: BisqueTestServer, uri: str) -> str:
    server.close_connection_mid_download("/image_service/", times=10)
    return uri


def _stall(server: BisqueTestServer, uri: str) -> str:
    server.stall_next("/image_service/", 60, times=10)
    return uri


@pytest.mark.parametrize(("setup", "inputs", "env", "match"), [
    (_missing, {}, {}, r"reading .*/data_service/00-missing: not found \(HTTP 404\)"),
    (_html_blob, {}, {}, r"cells\.tif \(.*/blob_service/.*\): not a TIFF; the server sent \d+ bytes starting with"),
    (_fail_500, {}, {}, r"downloading cells\.tif .*the server kept failing .*500"),
    (_cut, {}, {}, r"downloading cells\.tif .*connection was closed mid-transfer \(2 tries\)"),
    (_stall, {}, {"CELLSEG3D_HTTP_TIMEOUT": "1"}, r"downloading cells\.tif .*timed out"),
    (None, {"threshold": "abc"}, {}, r"reading the inputs: threshold must be a number, got 'abc'"),
    (None, {}, {"CELLSEG3D_BUNDLE": "/nonexistent/bundle"}, r"loading the model: .*not a model bundle"),
], ids=["unknown-resource-404", "non-tiff-blob", "server-500", "closed-mid-download", "stalled-download",
        "bad-parameter", "missing-model"])
def test_failures_end_failed(image: Any, tiny_bundle: Bundle, setup: Any, inputs: dict[str, str],
                             env: dict[str, str], match: str) -> None:
    server, image_uri, _ = image
    resource = setup(server, image_uri) if setup else image_uri
    mex_url, token = server.create_mex({"resource_url": resource, **inputs})
    ran = run_wrapper(tiny_bundle, resource, mex_url, token, env=env, secrets=(token,))
    assert ran.rc == 1 and ran.seconds < BOUND_S, (ran.rc, ran.seconds)
    assert server.mex_status(mex_url) == "FAILED" and "FINISHED" not in server.mex_history(mex_url)
    message = error_message(server, mex_url)
    assert "\n" not in message and token not in message
    assert re.search(match, message), message
    assert message in ran.err
    assert not server.uploads


@pytest.mark.parametrize(("refusal", "why"), [
    (403, "refused (HTTP 403)"),
    ("Problem processing the file: bad format", "the server refused it (Problem processing the file: bad format)"),
], ids=["http-403", "http-200-error-tag"])
def test_refused_upload_ends_failed(image: Any, tiny_bundle: Bundle, refusal: int | str, why: str) -> None:
    server, image_uri, _ = image
    server.refuse_uploads(refusal)
    mex_url, token = server.create_mex({"resource_url": image_uri})
    ran = run_wrapper(tiny_bundle, image_uri, mex_url, token, secrets=(token,))
    assert ran.rc == 1 and ran.seconds < BOUND_S
    assert server.mex_history(mex_url)[-2:] == ["uploading results", "FAILED"]
    assert error_message(server, mex_url) == f"uploading ModuleExecutions/CellSegment3DUnet/cells_labels.tif: {why}"
    assert sum(r.path.startswith("/import/") for r in server.requests) == 1  # not repeated


@pytest.mark.parametrize("status", [401, 403])
def test_refused_token_exits_nonzero_without_leaking_it(bisque_server: BisqueTestServer, tiny_bundle: Bundle,
                                                        status: int) -> None:
    mex_url, token = bisque_server.create_mex({"resource_url": f"{bisque_server.root}/data_service/00-x"})
    if status == 401:
        token = "admin:00-not-a-real-token"
    else:
        bisque_server.fail_next("/module_service/mex/", 403, method="GET", times=2)
    ran = run_wrapper(tiny_bundle, mex_url, token, secrets=(token,))
    assert ran.rc == 1 and ran.seconds < BOUND_S
    assert f"the token was refused (HTTP {status})" in ran.err
    assert bisque_server.mex_history(mex_url) == ["RUNNING"]  # the server cannot be told with that token
    assert not [r for r in bisque_server.requests if r.method == "POST"]


def test_unreachable_server_exits_nonzero_quickly(tiny_bundle: Bundle) -> None:
    with BisqueTestServer() as server:
        mex_url, token = server.create_mex({})
    ran = run_wrapper(tiny_bundle, mex_url, token, secrets=(token,))  # the server is gone
    assert ran.rc == 1 and ran.seconds < BOUND_S and "connection failed" in ran.err


def test_sigterm_ends_failed(image: Any, tiny_bundle: Bundle) -> None:
    server, image_uri, _ = image
    server.stall_next("/image_service/", 60)
    mex_url, token = server.create_mex({"resource_url": image_uri})
    env = {**os.environ, "CELLSEG3D_BUNDLE": str(tiny_bundle.path), **FAST_HTTP, "CELLSEG3D_HTTP_TIMEOUT": "60"}
    process = subprocess.Popen([sys.executable, str(WRAPPER), mex_url, token], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + BOUND_S
    while server.mex_status(mex_url) != "fetching image" and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # into the stalled download
    process.terminate()  # what `docker stop` sends
    out, err = process.communicate(timeout=BOUND_S)
    assert process.returncode == 1 and token not in out + err
    assert server.mex_history(mex_url) == ["RUNNING", "fetching image", "FAILED"]
    assert error_message(server, mex_url) == "fetching the image: stopped by SIGTERM"


def test_finish_is_checked_and_never_left_finished_after_a_failure(image: Any) -> None:
    from wrapper.bisque_io import BisqueError, HttpPolicy, open_mex_session
    from wrapper.mex import Mex
    from wrapper.results import outputs_tag

    server, image_uri, _ = image
    mex_url, token = server.create_mex({"resource_url": image_uri})
    mex = Mex(open_mex_session(mex_url, token, policy=HttpPolicy(read_timeout=3, retries=1, backoff=0)))
    server.fail_next("/module_service/mex/", 500, method="POST")
    with pytest.raises(BisqueError, match=r"finishing the MEX: the server answered HTTP 500"):
        mex.finish(outputs_tag(image_uri, image_uri, {"cell_count": 1}))
    server.fail_next("/module_service/mex/", 500, method="GET", times=2)  # the read-back fails: not FINISHED
    with pytest.raises(BisqueError, match=r"finishing the MEX: .*(500|None)"):
        mex.finish(outputs_tag(image_uri, image_uri, {"cell_count": 1}))
    assert mex.fail("finishing the MEX failed") is True
    history = server.mex_history(mex_url)
    assert history[-1] == "FAILED" and history[0] == "RUNNING"
    assert error_message(server, mex_url) == "finishing the MEX failed"
    assert server.mex_document(mex_url).find("tag[@name='inputs']") is not None  # merged, not replaced


def test_local_file_mode(tiny_bundle: Bundle, tmp_path: Path) -> None:
    data, array = cells_tiff()
    (tmp_path / "stack.tif").write_bytes(data)
    ran = run_wrapper(tiny_bundle, "--local", str(tmp_path / "stack.tif"), "0.05", "2", "3", "--out-dir", str(tmp_path))
    assert ran.rc == 0, ran.err
    labels = tifffile.imread(tmp_path / "stack_labels.tif")
    assert labels.shape == array.shape
    with open(tmp_path / "stack_cells.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == int(labels.max()) and '"cell_count"' in ran.out
    assert rows == [] or float(rows[0]["volume_um3"]) == pytest.approx(int(rows[0]["volume_voxels"]) * 0.5)
    bad = run_wrapper(tiny_bundle, "--local", str(tmp_path / "missing.tif"))
    assert bad.rc == 1 and "missing.tif: no such file" in bad.err


def test_by_hand_with_user_and_password(tiny_bundle: Bundle) -> None:
    data, _ = cells_tiff()
    with BisqueTestServer(user="alice", password="pw-s3cret-42") as server:
        image_uri, _ = server.add_image(data, "cells.tif")
        ran = run_wrapper(tiny_bundle, "--user", "alice", "--pwd", "pw-s3cret-42", "--root", server.root, image_uri,
                          secrets=("pw-s3cret-42",))
        assert ran.rc == 0, ran.err
        assert len(server.uploads) == 2 and '"Segmentation"' in ran.out
        refused = run_wrapper(tiny_bundle, "--user", "alice", "--pwd", "wrong-pw-77", "--root", server.root,
                              image_uri, secrets=("wrong-pw-77",))
        assert refused.rc == 1 and "credentials were refused" in refused.err


@pytest.mark.parametrize(("mex", "positional", "expected"), [
    ({"resource_url": "http://a/1", "threshold": 0.3}, ["http://b/2", "0.05", "10", "5"],
     ("http://a/1", 0.3, None, None)),  # with a MEX the positional values count for nothing
    ({"resource_url": "http://a/1", "threshold": "", "min_dist": None, "label_threshd": "None"},
     ["http://b/2", "0.05", "10.0", "5"], ("http://a/1", None, None, None)),  # empty: the bundle's defaults
    (None, ["http://b/2", "0.05", "10.0", "5"], ("http://b/2", 0.05, 10, 5)),  # by hand: the arguments
    (None, ["http://b/2"], ("http://b/2", None, None, None)),
])
def test_resolve_params(module: ModuleType, mex: dict | None, positional: list[str], expected: tuple) -> None:
    params = module.resolve_params(positional, mex)
    assert (params.resource_url, params.threshold, params.min_dist, params.label_threshd) == expected


@pytest.mark.parametrize(("mex", "match"), [
    ({}, "no resource_url: give it as the MEX input 'resource_url'"),
    ({"resource_url": "u", "threshold": "1.5"}, r"threshold must be between 0 and 1, got '1.5'"),
    ({"resource_url": "u", "min_dist": "2.5"}, r"min_dist must be a whole number >= 0, got '2.5'"),
    ({"resource_url": "u", "label_threshd": "-1"}, r"label_threshd must be a whole number >= 0"),
])
def test_resolve_params_errors(module: ModuleType, mex: dict, match: str) -> None:
    with pytest.raises(module.UsageError, match=match):
        module.resolve_params([], mex)


@pytest.mark.parametrize("argv", [[], ["only-one"], ["a", "b", "c", "d", "e", "mex", "token"], ["--user", "u", "x"]])
def test_usage_errors_exit_2(module: ModuleType, argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        module.main(argv)
    assert info.value.code == 2 and "token" not in capsys.readouterr().err.replace("<token>", "")
