"""The BisQue test server, driven by the real bqapi client (bisque-api 0.5.12.2); no mocks.

These tests also pin down how bqapi behaves, which the wrapper has to live with:

* ``init_mex(mex_url, token)`` sends ``GET <root>/services`` then ``GET <mex_url>?view=deep``, both with
  ``Authorization: Mex <token>``; between the two it calls ``self.setup_retry()``, which mounts a 30-retry
  adapter (backoff_factor=1, 5xx) on the server root. XML calls pass no timeout; file and upload calls 3600 s.
* ``bounded_session()`` below is the recipe that bounds both; the wrapper should reuse it.
"""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import requests
import tifffile
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

bqapi = pytest.importorskip("bqapi")  # bisque-api 0.5.12.2
from bqapi import BQSession
from bqapi.exception import BQAuthError, BQCommError

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # tests/bisque_server.py; pytest.ini's pythonpath too
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bisque_server import BisqueTestServer


class BoundedAdapter(HTTPAdapter):
    """Give every request ``timeout``: bqapi passes ``None`` for XML calls and 3600 s for files/uploads."""

    def __init__(self, *, timeout: float | tuple[float, float], retry: Retry) -> None:
        super().__init__(max_retries=retry)
        self._timeout = timeout

    def send(self, request, **kwargs):  # type: ignore[no-untyped-def]
        kwargs["timeout"] = self._timeout
        return super().send(request, **kwargs)


def bounded_session(*, timeout: float | tuple[float, float] = (2.0, 2.0), retries: int = 1) -> BQSession:
    """A ``BQSession`` with a bounded retry policy and timeouts; call ``init_mex`` on it as usual.

    Mounting on ``http://`` alone is not enough: ``init_mex`` calls ``setup_retry()``, which mounts a 30-retry
    adapter on the (longer, so preferred) server-root prefix. Hence the no-op ``setup_retry``.
    """
    bq = BQSession()
    retry = Retry(total=retries, connect=retries, read=retries, status=retries, backoff_factor=0,
                  status_forcelist=(500, 502, 503, 504), allowed_methods=frozenset({"GET"}))
    adapter = BoundedAdapter(timeout=timeout, retry=retry)
    bq.c.mount("http://", adapter)
    bq.c.mount("https://", adapter)
    bq.setup_retry = lambda *args, **kwargs: None  # type: ignore[method-assign]
    return bq


def _tiff(shape: tuple[int, ...] = (3, 5, 7)) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.arange(np.prod(shape), dtype=np.uint16).reshape(shape), photometric="minisblack")
    return buffer.getvalue()


def _outputs(uri: str) -> list[dict]:
    return [{"name": "outputs", "tag": [{"name": "Segmentation", "type": "image", "value": uri}]}]


@pytest.fixture
def run(bisque_server: BisqueTestServer) -> tuple[BisqueTestServer, BQSession, str, str]:
    """A server with one image and a MEX over it, and a bounded client session started on that MEX."""
    image_uri, _ = bisque_server.add_image(_tiff(), "cells.tif", meta={"image_num_x": "7", "image_num_y": "5",
                                                                     "image_num_z": "3", "image_num_t": "1",
                                                                     "image_num_c": "1"})
    mex_url, token = bisque_server.create_mex({"resource_url": image_uri, "threshold": "0.05"})
    bq = bounded_session().init_mex(mex_url, token)
    return bisque_server, bq, mex_url, image_uri


def test_bqapi_has_lxml() -> None:
    assert bqapi.comm.etree.__name__ == "lxml.etree", "install the extra: pip install 'bisque-api[lxml]==0.5.12.2'"


def test_without_lxml_parameters_and_finish_mex_crash(bisque_server: BisqueTestServer) -> None:
    mex_url, token = bisque_server.create_mex({"threshold": "0.05"})
    script = textwrap.dedent(f"""
        import sys; sys.modules["lxml"] = None  # as if lxml were not installed
        from bqapi import BQSession
        bq = BQSession().init_mex({mex_url!r}, {token!r})
        for call in (bq.parameters, lambda: bq.finish_mex(tags={_outputs("http://x/00-a")!r})):
            try: call()
            except AttributeError as exc: print(exc)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30,
                         check=False).stdout
    assert out.count("has no attribute 'xpath'") == 2
    assert bisque_server.mex_status(mex_url) == "RUNNING"


def test_init_mex_request_sequence_and_inputs(bisque_server: BisqueTestServer) -> None:
    mex_url, token = bisque_server.create_mex({"resource_url": "http://x/data_service/00-a", "min_dist": "10"})
    bq = bounded_session().init_mex(mex_url, token)
    assert [(r.method, r.path, r.query) for r in bisque_server.requests] == [
        ("GET", "/services", ""), ("GET", urllib3.util.parse_url(mex_url).path, "view=deep")]
    assert {r.headers["authorization"] for r in bisque_server.requests} == {f"Mex {token}"}
    assert bq.mex.uri == mex_url
    assert bq.service_map["image_service"] == f"{bisque_server.root}/image_service/"
    assert bq.parameters() == {"mex_url": None, "bisque_token": None,
                               "resource_url": "http://x/data_service/00-a", "min_dist": "10"}
    inputs = bq.get_mex_inputs()  # raises KeyError when the MEX has no mex_url input
    assert (inputs["mex_url"], inputs["min_dist"]) == ({"type": "system-input", "value": mex_url}, {"value": "10"})


def test_default_policy_is_30_retries_and_no_timeout(bisque_server: BisqueTestServer) -> None:
    mex_url, token = bisque_server.create_mex({})
    bq = BQSession().init_mex(mex_url, token)
    retry = bq.c.get_adapter(mex_url).max_retries
    assert (retry.total, retry.backoff_factor, tuple(retry.status_forcelist)) == (30, 1, (500, 502, 503, 504))
    assert "POST" not in retry.allowed_methods
    assert bqapi.services.DEFAULT_TIMEOUT == 3600  # image/blob/import proxies; fetchxml/postxml pass None
    assert bounded_session().init_mex(mex_url, token).c.get_adapter(mex_url).max_retries.total == 1


def test_services_sets_content_type_on_the_whole_session(run) -> None:
    server, bq, _, image_uri = run
    assert bq.c.headers["Content-Type"] == "text/xml"  # BaseServiceProxy.request setdefault()s session headers
    bq.load(image_uri).pixels().format("tiff").fetch()
    assert server.requests[-1].headers["content-type"] == "text/xml"  # even on a GET for a TIFF


def test_load_image_and_fetch_tiff(run) -> None:
    server, bq, _, image_uri = run
    image = bq.load(image_uri)
    assert (image.uri, image.name) == (image_uri, "cells.tif")
    data = image.pixels().format("tiff").fetch()  # re-encoded by the image service: same pixels
    assert np.array_equal(tifffile.imread(io.BytesIO(data)), tifffile.imread(io.BytesIO(_tiff())))
    assert (server.requests[-1].path, server.requests[-1].query) == (f"/image_service/{image.resource_uniq}",
                                                                     "format=tiff")
    assert tifffile.imread(io.BytesIO(data)).shape == (3, 5, 7)
    assert image.geometry() == (7, 5, 3, 1, 1)  # GET image_service/<uniq>?meta=


def test_fetchblob_needs_a_blob_service_url(run) -> None:
    _, bq, _, image_uri = run
    uniq = bq.load(image_uri).resource_uniq
    assert bq.fetchblob(bq.service_url("blob_service", uniq)) == _tiff()
    assert bq.fetchblob(image_uri).startswith(b"<image")  # a data_service URL gives the document, not the file


def test_load_swallows_errors_and_returns_none(run) -> None:
    server, bq, _, image_uri = run
    assert bq.load(f"{server.root}/data_service/00-missing") is None
    for status in (401, 403):
        server.fail_next("/data_service/", status)
        assert bq.load(image_uri) is None


def test_pixel_fetch_does_not_check_status(run) -> None:
    server, bq, _, image_uri = run
    image = bq.load(image_uri)
    server.fail_next("/image_service/", 404)
    assert image.pixels().format("tiff").fetch() == b"injected failure"  # the error page comes back as "the image"


def test_cut_download_raises(run, tmp_path: Path) -> None:
    server, bq, _, image_uri = run
    image = bq.load(image_uri)
    server.close_connection_mid_download("/image_service/")
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        image.pixels().format("tiff").fetch()
    server.close_connection_mid_download("/blob_service/")
    with pytest.raises(urllib3.exceptions.ProtocolError):  # to a path: urllib3's exception, not requests'
        bq.fetchblob(bq.service_url("blob_service", image.resource_uniq), path=str(tmp_path / "x.tif"))
    assert not server.errors


def test_postblob_uploads_file_and_xml(run, tmp_path: Path) -> None:
    server, bq, _, _ = run
    (tmp_path / "seg.tif").write_bytes(_tiff((2, 3, 4)))
    answer = ET.fromstring(bq.postblob(str(tmp_path / "seg.tif"), xml='<image name="cells_seg.tif"/>'))
    assert (answer.tag, answer.get("type"), answer[0].tag) == ("resource", "uploaded", "image")
    upload = server.uploads[-1]
    assert (answer[0].get("uri"), answer[0].get("resource_uniq")) == (upload.uri, upload.uniq)
    assert (upload.name, upload.data, upload.xml.tag) == ("cells_seg.tif", _tiff((2, 3, 4)), "image")
    request = server.requests[-1]
    assert request.path.startswith("/import/transfer_")  # transfer_ + 6 random characters
    assert request.headers["content-type"].startswith("multipart/form-data; boundary=")
    assert bq.fetchblob(bq.service_url("blob_service", upload.uniq)) == upload.data


@pytest.mark.parametrize(("status", "error"), [(401, BQCommError), (403, BQAuthError), (503, BQCommError)])
def test_postblob_raises_and_is_not_retried(run, tmp_path: Path, status: int, error: type) -> None:
    server, bq, _, _ = run
    (tmp_path / "seg.tif").write_bytes(b"II*\x00")
    server.refuse_uploads(status)
    with pytest.raises(error) as info:
        bq.postblob(str(tmp_path / "seg.tif"), xml='<image name="seg.tif"/>')
    assert type(info.value) is error and info.value.response_code == status
    assert sum(r.path.startswith("/import/") for r in server.requests) == 1


def test_postblob_of_a_missing_file_uploads_only_the_xml(run, tmp_path: Path) -> None:
    server, bq, _, _ = run
    bq.postblob(str(tmp_path / "missing.tif"), xml='<image name="seg.tif"/>')  # no error raised
    assert server.uploads[-1].data == b""
    with pytest.raises(AttributeError):  # and without xml: 'NoneType' object has no attribute 'status_code'
        bq.postblob(str(tmp_path / "missing.tif"))


def test_update_then_finish_mex(run) -> None:
    server, bq, mex_url, image_uri = run
    assert bq.update_mex("RUNNING: 50%") is None
    assert server.mex_status(mex_url) == "RUNNING: 50%"
    assert bq.finish_mex(tags=_outputs(image_uri)) is None  # GET ?view=deep, merge, POST the whole document
    assert server.mex_history(mex_url) == ["RUNNING", "RUNNING: 50%", "FINISHED"]
    assert server.mex_outputs(mex_url)["Segmentation"].attrib == {"name": "Segmentation", "type": "image",
                                                                 "value": image_uri}
    assert server.mex_document(mex_url).find("tag[@name='inputs']/tag[@name='threshold']").get("value") == "0.05"


def test_finish_mex_posts_failed_by_itself_when_its_post_fails(run) -> None:
    server, bq, mex_url, image_uri = run
    server.fail_next("/module_service/mex/", 500, method="POST")
    assert bq.finish_mex(tags=_outputs(image_uri)) is None
    assert server.mex_history(mex_url) == ["RUNNING", "FAILED"]
    assert server.mex_document(mex_url).find("tag[@name='error_message']").get("value") == \
        "Error during saving (status 500)"


def test_finish_and_fail_mex_give_up_silently(run) -> None:
    server, bq, mex_url, _ = run
    server.fail_next("/module_service/mex/", 500, method="POST", times=2)
    assert bq.finish_mex() is None
    server.fail_next("/module_service/mex/", 401, method="POST", times=2)
    assert bq.fail_mex("boom") is None
    assert server.mex_history(mex_url) == ["RUNNING"]  # nothing got through, and nothing was raised
    server.fail_next("/module_service/mex/", 500, method="GET", times=2)
    with pytest.raises(requests.exceptions.RetryError):  # finish_mex's GET ?view=deep is not guarded
        bq.finish_mex()


def test_fail_mex(run) -> None:
    server, bq, mex_url, _ = run
    with pytest.raises(UnboundLocalError):
        bq.fail_mex(None)
    bq.fail_mex("engine failed: out of memory")
    assert server.mex_status(mex_url) == "FAILED"
    assert server.mex_document(mex_url).find("tag[@name='error_message']").get("value") == \
        "engine failed: out of memory"


def test_finish_mex_msg_appends_to_a_shared_default_list(run) -> None:
    _, bq, _, _ = run
    shared = BQSession.finish_mex.__defaults__[1]
    try:
        bq.finish_mex(msg="first run")
        assert shared == [{"name": "message", "value": "first run"}]  # every later finish_mex() posts it too
    finally:
        shared.clear()


def test_bad_token(bisque_server: BisqueTestServer) -> None:
    mex_url, _ = bisque_server.create_mex({})
    assert requests.get(mex_url, headers={"Authorization": "Mex admin:00-bad"}, timeout=5).status_code == 401
    assert requests.get(mex_url, timeout=5).status_code == 401
    bq = bounded_session().init_mex(mex_url, "admin:00-bad")  # no exception: load() swallowed the 401
    assert bq.mex is None and bq.c.auth is None
    with pytest.raises(AttributeError):  # so fail_mex cannot even report it
        bq.fail_mex("bad token")
    assert bisque_server.mex_status(mex_url) == "RUNNING"


def test_a_token_may_only_update_its_own_mex(bisque_server: BisqueTestServer) -> None:
    _, token_a = bisque_server.create_mex({})
    mex_b, _ = bisque_server.create_mex({})
    response = requests.post(mex_b, data=b'<mex value="FINISHED"/>', timeout=5,
                             headers={"Authorization": f"Mex {token_a}", "Content-Type": "text/xml"})
    assert response.status_code == 403 and bisque_server.mex_status(mex_b) == "RUNNING"


def test_basic_auth(bisque_server: BisqueTestServer) -> None:
    image_uri, _ = bisque_server.add_image(_tiff(), "cells.tif")
    bq = BQSession().init_local("admin", "admin", bisque_root=bisque_server.root, create_mex=False)
    assert bq.load(image_uri).name == "cells.tif"
    assert BQSession().init_local("admin", "wrong", bisque_root=bisque_server.root, create_mex=False) is None


def test_bounded_session_retries_5xx_then_gives_up(bisque_server: BisqueTestServer) -> None:
    mex_url, token = bisque_server.create_mex({})
    bisque_server.fail_next("/module_service/mex/", 503)
    assert bounded_session().init_mex(mex_url, token).mex is not None  # one retry absorbed it
    bisque_server.fail_next("/module_service/mex/", 500, times=2)
    with pytest.raises(requests.exceptions.RetryError):  # not BQCommError: load() does not catch it
        bounded_session().init_mex(mex_url, token)


def test_bounded_session_times_out(run, tmp_path: Path) -> None:
    server, _, mex_url, image_uri = run
    token = server.requests[0].headers["authorization"].removeprefix("Mex ")
    bq = bounded_session(timeout=(1.0, 0.3)).init_mex(mex_url, token)
    image = bq.load(image_uri)
    server.stall_next("/image_service/", 5, times=2)
    start = time.monotonic()
    with pytest.raises(requests.exceptions.ConnectionError):  # read timeouts, retried once, then MaxRetryError
        image.pixels().format("tiff").fetch()
    assert 0.6 <= time.monotonic() - start < 1.5
    (tmp_path / "seg.tif").write_bytes(b"II*\x00")
    server.stall_next("/import/", 5)
    with pytest.raises(requests.exceptions.ReadTimeout):  # a POST is not retried
        bq.postblob(str(tmp_path / "seg.tif"), xml='<image name="seg.tif"/>')


def test_without_services_urls_go_wrong(bisque_server: BisqueTestServer) -> None:
    image_uri, _ = bisque_server.add_image(_tiff(), "cells.tif")
    mex_url, token = bisque_server.create_mex({})
    bisque_server.fail_next("/services", 500, times=2)
    with pytest.raises(requests.exceptions.RetryError):  # bounded: _load_services catches only BQCommError
        bounded_session().init_mex(mex_url, token)
    bisque_server.fail_next("/services", 500)
    bq = BQSession().init_mex(mex_url, token)  # default: no retry yet; the error is logged and it goes on
    assert bq.service_map == {} and bq.mex is not None
    data = bq.load(image_uri).pixels().format("tiff").fetch()  # image_service URL lacks its trailing slash
    assert bisque_server.requests[-1].path.count("/") == 1 and not data.startswith(b"II*")


def test_token_stays_in_the_authorization_header(run, tmp_path: Path) -> None:
    server, bq, _, image_uri = run
    token = server.requests[0].headers["authorization"].removeprefix("Mex ")
    (tmp_path / "seg.tif").write_bytes(b"II*\x00")
    bq.load(image_uri).pixels().format("tiff").fetch()
    bq.postblob(str(tmp_path / "seg.tif"), xml='<image name="seg.tif"/>')
    bq.finish_mex(tags=_outputs(image_uri))
    assert not [r for r in server.requests if token in r.path + r.query or token.encode() in r.body]
    assert {r.headers.get("authorization") for r in server.requests} == {f"Mex {token}"}
    assert not server.errors
