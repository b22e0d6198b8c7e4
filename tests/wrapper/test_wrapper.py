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
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import tifffile

pytest.importorskip("bqapi")
from bisque_server import BisqueTestServer, bisque_server  # noqa: E402, F401 - the fixture is used by name

from engine.bundle import Bundle  # noqa: E402

WRAPPER = Path(__file__).resolve().parents[2] / "wrapper" / "PythonScriptWrapper.py"
SHAPE = (12, 24, 28)
BOUND_S = 30.0  # a failing run must end within this (bqapi's own policy would retry for ~50 minutes)
FAST_HTTP = {"CELLSEG3D_HTTP_TIMEOUT": "3", "CELLSEG3D_HTTP_RETRIES": "1", "CELLSEG3D_HTTP_BACKOFF": "0"}


def _tiff() -> tuple[bytes, np.ndarray]:
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
    rc: int
    out: str
    err: str
    seconds: float


def run_wrapper(bundle: Bundle, *args: str, env: dict[str, str] | None = None, secrets: tuple[str, ...] = ()) -> Ran:
    """Run the wrapper script; assert it ended in bounded time and printed no secret."""
    environment = {**os.environ, "CELLSEG3D_BUNDLE": str(bundle.path), **FAST_HTTP, **(env or {})}
    start = time.monotonic()
    done = subprocess.run([sys.executable, str(WRAPPER), *args], capture_output=True, text=True,
                          env=environment, timeout=120)
    ran = Ran(done.returncode, done.stdout, done.stderr, time.monotonic() - start)
    for secret in secrets:
        assert secret not in ran.out + ran.err, "a secret reached the output"
    return ran


def _no_token_on_the_wire(server: BisqueTestServer, token: str) -> None:
    assert not [r for r in server.requests if token in r.path + r.query or token.encode() in r.body]
    assert {r.headers.get("authorization") for r in server.requests if r.path != "/services"} == {f"Mex {token}"}


def _error_message(server: BisqueTestServer, mex_url: str) -> str:
    tag = server.mex_document(mex_url).find("tag[@name='error_message']")
    return "" if tag is None else tag.get("value", "")


def _metadata(outputs: dict[str, ET.Element]) -> dict[str, str]:
    return {t.get("name", ""): t.get("value", "") for t in outputs["Metadata"] if t.get("value") is not None}


@pytest.fixture
def image(bisque_server: BisqueTestServer) -> tuple[BisqueTestServer, str, np.ndarray]:
    data, array = _tiff()
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


def test_full_run_finishes_with_outputs(image: Any, tiny_bundle: Bundle, tmp_path: Path) -> None:
    server, image_uri, array = image
    mex_url, token = server.create_mex({"resource_url": image_uri})
    log_file = tmp_path / "PythonScript.log"
    ran = run_wrapper(tiny_bundle, "-v", "--log-file", str(log_file), image_uri, "0.05", "2", "3", mex_url, token,
                      secrets=(token,))
    assert ran.rc == 0, ran.err
    assert token not in log_file.read_text() and "DEBUG" in log_file.read_text()
    history = server.mex_history(mex_url)
    assert history[0] == "RUNNING" and history[-1] == "FINISHED" and "FAILED" not in history
    assert history[1:3] == ["fetching image", "segmenting 0%"] and "segmenting 100%" in history
    assert history[-2] == "uploading results"

    outputs = server.mex_outputs(mex_url)
    labels_upload, table_upload = server.uploads
    assert outputs["Segmentation"].attrib == {"name": "Segmentation", "type": "image", "value": labels_upload.uri}
    assert outputs["Cell table"].attrib == {"name": "Cell table", "type": "table", "value": table_upload.uri}
    assert labels_upload.name == "ModuleExecutions/CellSegment3DUnet/cells_labels.tif"
    assert (labels_upload.xml.tag, table_upload.xml.tag) == ("image", "table")
    labels = tifffile.imread(io.BytesIO(labels_upload.data))
    assert labels.shape == array.shape

    meta = _metadata(outputs)
    assert int(meta["cell_count"]) == int(labels.max()) == len(np.unique(labels[labels > 0]))
    assert meta["backend"] and meta["precision"] and meta["device"]
    assert (meta["threshold"], meta["min_dist"], meta["label_threshd"]) == ("0.05", "2", "3")
    assert meta["voxel_size_um"] == "2x0.5x0.5" and meta["image_shape"] == "12x24x28"
    timings = {t.get("name"): float(t.get("value", "nan")) for t in outputs["Metadata"].find("tag[@name='timings']")}
    assert {"fetch", "read", "infer", "postprocess", "upload", "total"} <= set(timings) and timings["total"] > 0

    rows = list(csv.DictReader(io.StringIO(table_upload.data.decode())))
    assert len(rows) == int(meta["cell_count"])
    assert sum(int(r["volume_voxels"]) for r in rows) == int((labels > 0).sum())
    _no_token_on_the_wire(server, token)
    assert not server.errors


def test_mex_inputs_override_positional_ones(image: Any, tiny_bundle: Bundle) -> None:
    server, image_uri, _ = image
    mex_url, token = server.create_mex({"resource_url": image_uri, "threshold": "0.3", "min_dist": "4",
                                        "label_threshd": ""})  # empty: the bundle's default, not the argument
    ran = run_wrapper(tiny_bundle, f"{server.root}/data_service/00-notthisone", "0.05", "10", "7", mex_url, token,
                      secrets=(token,))
    assert ran.rc == 0, ran.err
    meta = _metadata(server.mex_outputs(mex_url))
    expected = (image_uri, "0.3", "4", str(tiny_bundle.postprocess.label_threshd))
    assert (meta["input"], meta["threshold"], meta["min_dist"], meta["label_threshd"]) == expected
    assert server.mex_status(mex_url) == "FINISHED"


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
    ran = run_wrapper(tiny_bundle, resource, "0.05", "2", "3", mex_url, token, env=env, secrets=(token,))
    assert ran.rc == 1 and ran.seconds < BOUND_S, (ran.rc, ran.seconds)
    assert server.mex_status(mex_url) == "FAILED" and "FINISHED" not in server.mex_history(mex_url)
    message = _error_message(server, mex_url)
    assert "\n" not in message and token not in message
    assert re.search(match, message), message
    assert message in ran.err
    assert not server.uploads


def test_refused_upload_ends_failed(image: Any, tiny_bundle: Bundle) -> None:
    server, image_uri, _ = image
    server.refuse_uploads(403)
    mex_url, token = server.create_mex({"resource_url": image_uri})
    ran = run_wrapper(tiny_bundle, image_uri, "0.05", "2", "3", mex_url, token, secrets=(token,))
    assert ran.rc == 1 and ran.seconds < BOUND_S
    assert server.mex_history(mex_url)[-2:] == ["uploading results", "FAILED"]
    assert _error_message(server, mex_url) == "uploading ModuleExecutions/CellSegment3DUnet/cells_labels.tif: " \
                                              "refused (HTTP 403)"
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
    assert _error_message(server, mex_url) == "fetching the image: stopped by SIGTERM"


def test_finish_is_checked_and_never_left_finished_after_a_failure(image: Any, module: ModuleType) -> None:
    from wrapper.bisque_io import BisqueError, HttpPolicy, open_mex_session
    from wrapper.mex import Mex

    server, image_uri, _ = image
    mex_url, token = server.create_mex({"resource_url": image_uri})
    mex = Mex(open_mex_session(mex_url, token, policy=HttpPolicy(read_timeout=3, retries=1, backoff=0)))
    server.fail_next("/module_service/mex/", 500, method="POST")  # finish_mex then posts FAILED by itself
    with pytest.raises(BisqueError, match="finishing the MEX: it reads 'FAILED' afterwards"):
        mex.finish(module.outputs_tag(image_uri, image_uri, {"cell_count": 1}))
    assert mex.fail("finishing the MEX failed") is True
    assert server.mex_history(mex_url) == ["RUNNING", "FAILED", "FAILED"]
    assert _error_message(server, mex_url) == "finishing the MEX failed"


def test_local_file_mode(tiny_bundle: Bundle, tmp_path: Path) -> None:
    data, array = _tiff()
    (tmp_path / "stack.tif").write_bytes(data)
    ran = run_wrapper(tiny_bundle, "--local", str(tmp_path / "stack.tif"), "0.05", "2", "3", "--out-dir", str(tmp_path))
    assert ran.rc == 0, ran.err
    labels = tifffile.imread(tmp_path / "stack_labels.tif")
    assert labels.shape == array.shape
    rows = list(csv.DictReader(open(tmp_path / "stack_cells.csv", newline="")))
    assert len(rows) == int(labels.max()) and '"cell_count"' in ran.out
    assert rows == [] or float(rows[0]["volume_um3"]) == pytest.approx(int(rows[0]["volume_voxels"]) * 0.5)
    bad = run_wrapper(tiny_bundle, "--local", str(tmp_path / "missing.tif"))
    assert bad.rc == 1 and "missing.tif: no such file" in bad.err


def test_by_hand_with_user_and_password(tiny_bundle: Bundle) -> None:
    data, _ = _tiff()
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
     ("http://a/1", 0.3, 10, 5)),
    ({"threshold": "", "min_dist": None, "label_threshd": "None"}, ["http://b/2", "0.05", "10.0", "5"],
     ("http://b/2", None, None, None)),  # in the MEX but empty: the bundle's defaults
    ({}, ["http://b/2", "0.05", "10.0", "5"], ("http://b/2", 0.05, 10, 5)),
    ({"resource_url": "http://a/1"}, [], ("http://a/1", None, None, None)),
])
def test_resolve_params(module: ModuleType, mex: dict, positional: list[str], expected: tuple) -> None:
    params = module.resolve_params(positional, mex)
    assert (params.resource_url, params.threshold, params.min_dist, params.label_threshd) == expected


@pytest.mark.parametrize(("mex", "match"), [
    ({}, "no resource_url"),
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


# ---- the module's files: XML, runtime config, Dockerfile (the docker build cannot run here) -------------

ROOT = Path(__file__).resolve().parents[2]


def test_module_xml_matches_the_wrapper(module: ModuleType) -> None:
    doc = ET.parse(ROOT / "wrapper" / "CellSegment3DUnet.xml").getroot()
    assert (doc.tag, doc.get("name"), doc.get("type")) == ("module", "CellSegment3DUnet", "runtime")
    inputs = doc.find("tag[@name='inputs']")
    assert [t.get("name") for t in inputs] == [*module.INPUTS, "mex_url", "bisque_token"]
    assert [t.get("type") for t in inputs][-2:] == ["system-input", "system-input"]
    accepted = {t.get("value") for t in inputs.findall("tag[@name='resource_url']/template/tag[@name='accepted_type']")}
    assert accepted == {"image", "dataset"}
    iterable = doc.find("tag[@name='execute_options']/tag[@name='iterable']")
    assert (iterable.get("value"), iterable.get("type")) == ("resource_url", "dataset")
    posted = module.outputs_tag("u1", "u2", {"cell_count": 1})["tag"]
    outputs = doc.find("tag[@name='outputs']")
    assert [(t.get("name"), t.get("type")) for t in outputs] == [(t["name"], t.get("type")) for t in posted]
    for name in ("title", "authors", "description", "help"):
        assert doc.find(f"tag[@name='{name}']").get("value")
    assert (ROOT / "wrapper" / doc.find("tag[@name='help']").get("value")).is_file()


def test_runtime_module_cfg() -> None:
    import configparser

    text = (ROOT / "wrapper" / "runtime-module.cfg").read_text()
    cfg = configparser.ConfigParser()
    cfg.read_string("[module]\n" + text)  # BisQue's reader allows keys before the first section
    assert cfg["module"]["runtime.platforms"] == "command" and cfg["module"]["module_enabled"] == "True"
    command = cfg["command"]
    assert command["executable"] == "python PythonScriptWrapper.py" and command["exec_env"] == "use_gpu"
    assert command["docker.image"] and "Docker" in command["environments"]
    for name in command["files"].split(","):
        assert (ROOT / "wrapper" / name.strip()).exists(), name


def test_dockerfile_by_review() -> None:
    """What can be checked without docker: stages, the files copied, Python <= 3.12, /module, the volume."""
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM (\S+) AS (\S+)$", text, flags=re.M)
    assert [name for _, name in stages] == ["python", "build", "runtime"]
    assert re.search(r"^ARG CUDA_BASE=nvidia/cuda:12\.\S+-runtime-ubuntu24\.04$", text, flags=re.M)  # Python 3.12
    assert "sys.version_info[:2] <= (3, 12)" in text and "engine.cli export" in text
    assert '".[bisque]"' in text and "tensorrt" in text.lower()
    runtime = text.split("AS runtime", 1)[1]
    assert "WORKDIR /module" in runtime and "wrapper/PythonScriptWrapper.py" in runtime
    assert 'VOLUME ["/cache/engines"]' in runtime and "CELLSEG3D_ENGINES=/cache/engines" in text
    assert "--ipc=host" in text and "onnxconverter" not in runtime
    allowed = {line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")}
    for sources in re.findall(r"^COPY (?!--from)(.+) \S+$", text, flags=re.M):
        for source in sources.split():
            assert (ROOT / source).exists(), source
            assert source.split("/")[0].rstrip("/") in allowed, f"{source} is not in .dockerignore's allowlist"
