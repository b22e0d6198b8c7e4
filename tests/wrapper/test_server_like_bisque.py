"""The test server behaves like a real BisQue server where the module sees it, driven by the real bqapi client
(bisque-api 0.5.12.2) and the wrapper's own I/O functions. Each test names the BisQue source it follows
(UCSB-VRL/bisqueUCSB)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import requests
import tifffile

pytest.importorskip("bqapi")
from bisque_engine import (
    engine_argv,
    engine_runs,
    module_definition,
    submit,
    web_ui_mex,
)
from bisque_server import BisqueTestServer
from bqapi import BQSession

from engine.bundle import load_bundle
from engine.io import open_volume
from wrapper.bisque_io import (
    BisqueError,
    HttpPolicy,
    dataset_members,
    new_session,
    upload_file,
    voxel_size_from_meta,
)
from wrapper.inputs import mex_input_values

POLICY = HttpPolicy(read_timeout=5, retries=1, backoff=0)
_SHIPPED = load_bundle(None).postprocess
MIN_DIST, LABEL_THRESHD = str(_SHIPPED.min_dist), str(_SHIPPED.label_threshd)  # the module XML's defaults follow the bundle


def _imagej_tiff(shape: tuple[int, int, int] = (4, 6, 8)) -> bytes:
    buffer = io.BytesIO()
    data = np.arange(np.prod(shape), dtype=np.uint16).reshape(shape)
    tifffile.imwrite(buffer, data, imagej=True, metadata={"axes": "ZYX", "spacing": 2.0, "unit": "um"},
                     resolution=(2.0, 2.0))
    return buffer.getvalue()


def _session(mex_url: str, token: str) -> BQSession:
    return new_session(POLICY).init_mex(mex_url, token)


def test_image_service_reencodes_without_spacing_and_meta_has_the_resolution(bisque_server: BisqueTestServer,
                                                                             tmp_path: Path) -> None:
    """image_service: ``?format=tiff`` is converted by imgcnv (ImageJ spacing lost); ``?meta`` reports
    ``pixel_resolution_*`` in microns (converter_base.py, converters/converter_*.py)."""
    original = _imagej_tiff()
    uri, uniq = bisque_server.add_image(original, "stack.tif")
    mex_url, token = bisque_server.create_mex({"resource_url": uri})
    bq = _session(mex_url, token)
    served = bq.c.get(bq.service_url("image_service", uniq, query={"format": "tiff"})).content
    (tmp_path / "served.tif").write_bytes(served)
    (tmp_path / "original.tif").write_bytes(original)
    with open_volume(tmp_path / "served.tif") as reencoded, open_volume(tmp_path / "original.tif") as stored:
        assert (reencoded.voxel_size_um, stored.voxel_size_um) == (None, (2.0, 0.5, 0.5))
    assert np.array_equal(tifffile.imread(tmp_path / "served.tif"), tifffile.imread(tmp_path / "original.tif"))
    assert bq.c.get(bq.service_url("blob_service", uniq)).content == original  # the blob is the file itself
    assert voxel_size_from_meta(bq, uniq) == (2.0, 0.5, 0.5)
    _, plain_uniq = bisque_server.add_image(served, "plain.tif")  # no resolution at all: reported as 0
    assert voxel_size_from_meta(bq, plain_uniq) is None


def test_web_ui_inputs_are_typed_and_bq_parameters_fails_on_an_empty_one(bisque_server: BisqueTestServer) -> None:
    """bq_api.js ``createMEX`` clones the module's typed inputs; bqapi ``parameters()`` does ``float(value)``."""
    image, _ = bisque_server.add_image(_imagej_tiff(), "stack.tif")
    module = module_definition()
    mex_url, token = submit(bisque_server, web_ui_mex(module, {"resource_url": image, "threshold": ""}))
    bq = _session(mex_url, token)
    typed = {t.get("name"): t.get("type") for t in bisque_server.mex_document(mex_url).find("tag[@name='inputs']")}
    assert typed == {"resource_url": "image", "threshold": "number", "min_dist": "number",
                     "label_threshd": "number", "mex_url": "system-input", "bisque_token": "system-input"}
    with pytest.raises(ValueError, match="could not convert string to float"):
        bq.parameters()
    values = mex_input_values(bq.mex.xmltree)
    assert values == {"resource_url": image, "threshold": "", "min_dist": MIN_DIST, "label_threshd": LABEL_THRESHD,
                      "mex_url": None, "bisque_token": None}


def test_statuses_pending_dispatch_then_the_engine_starts(bisque_server: BisqueTestServer) -> None:
    """module_server.create_mex: PENDING, then DISPATCH; command_run.command_start: ``starting``, or ``running
    parallel`` for an iterated MEX; sub-MEXes are created without a status."""
    image, _ = bisque_server.add_image(_imagej_tiff(), "a.tif")
    dataset, _ = bisque_server.add_dataset("two", [image, image])
    module = module_definition()
    single, _ = submit(bisque_server, web_ui_mex(module, {"resource_url": image}))
    top, _ = submit(bisque_server, web_ui_mex(module, {"resource_url": dataset}, resource_type="dataset"))
    assert bisque_server.mex_history(single) == ["PENDING", "DISPATCH", "starting"]
    assert bisque_server.mex_history(top) == ["PENDING", "DISPATCH", "running parallel"]
    subs = bisque_server.mex_document(top).findall("mex")
    assert len(subs) == 2 and all(bisque_server.mex_status(s.get("uri")) == "" for s in subs)


def test_dataset_members_and_sub_mexes_with_the_top_token(bisque_server: BisqueTestServer) -> None:
    """module_server.create_mex iterates ``./value/text()`` of the dataset; each sub-MEX's resource input is an
    untyped tag; command_run gives every sub-MEX the top MEX's token, which may update it."""
    images = [bisque_server.add_image(_imagej_tiff(), f"{n}.tif")[0] for n in "ab"]
    dataset, _ = bisque_server.add_dataset("two", images)
    top, token = submit(bisque_server, web_ui_mex(module_definition(), {"resource_url": dataset},
                                                  resource_type="dataset"))
    bq = _session(top, token)
    assert dataset_members(bq, dataset) == images and dataset_members(bq, images[0]) is None
    subs = bisque_server.mex_document(top).findall("mex")
    resources = [s.find("tag[@name='inputs']/tag[@name='resource_url']").attrib for s in subs]
    assert resources == [{"name": "resource_url", "value": uri} for uri in images]
    runs = engine_runs(bisque_server, top, token)
    assert [argv[-2:] for argv in runs] == [[s.get("uri"), token] for s in subs]
    for sub in subs:
        answer = bq.c.post(sub.get("uri"), data=b'<mex value="fetching image"/>', headers={"Content-Type": "text/xml"})
        assert answer.status_code == 200 and bisque_server.mex_status(sub.get("uri")) == "fetching image"
    other, _ = bisque_server.create_mex({})
    refused = requests.post(other, data=b'<mex value="FINISHED"/>', timeout=5,
                            headers={"Authorization": f"Mex {token}", "Content-Type": "text/xml"})
    assert refused.status_code == 403


def test_blocked_iteration_puts_several_images_in_one_sub_mex(bisque_server: BisqueTestServer) -> None:
    """module_server.create_mex with ``blocked_iter`` and ``bisque.module_service.blocksize``: ``type="block"``
    sub-MEXes; mexparser.prepare_inputs reads a block's first member's inputs."""
    images = [bisque_server.add_image(_imagej_tiff(), f"{n}.tif")[0] for n in "abc"]
    dataset, _ = bisque_server.add_dataset("three", images)
    mex = web_ui_mex(module_definition(), {"resource_url": dataset}, resource_type="dataset")
    top, token = submit(bisque_server, mex, blocksize=2)
    blocks = bisque_server.mex_document(top).findall("mex")
    assert [(b.get("type"), len(b.findall("mex"))) for b in blocks] == [("block", 2), ("block", 1)]
    assert [argv[0] for argv in engine_runs(bisque_server, top, token)] == [images[0], images[2]]


def test_the_engine_drops_valueless_inputs_so_positions_shift(bisque_server: BisqueTestServer) -> None:
    """mexparser.prepare_mex_params keeps only inputs with a value: an empty threshold moves min_dist into its
    place, which is why the module reads its inputs from the MEX."""
    module = module_definition()
    mex = web_ui_mex(module, {"resource_url": "http://h/data_service/00-a", "threshold": ""})
    assert engine_argv(module, mex, "http://h/mex/00-m", "admin:00-m") == [
        "http://h/data_service/00-a", MIN_DIST, LABEL_THRESHD, "http://h/mex/00-m", "admin:00-m"]


def test_upload_error_is_an_http_200_with_an_error_tag(bisque_server: BisqueTestServer, tmp_path: Path) -> None:
    """import_service.process_filtered: a file that fails to ingest is answered 200 with <tag name="error">,
    which bqapi's postblob passes on as a success."""
    mex_url, token = bisque_server.create_mex({})
    bq = _session(mex_url, token)
    (tmp_path / "labels.tif").write_bytes(_imagej_tiff())
    bisque_server.refuse_uploads("Problem processing the file: unsupported format")
    answer = bq.postblob(str(tmp_path / "labels.tif"), xml='<image name="labels.tif"/>')
    assert b'name="error"' in answer and not bisque_server.uploads
    with pytest.raises(BisqueError, match=r"uploading labels\.tif: the server refused it \(Problem processing"):
        upload_file(bq, tmp_path / "labels.tif", kind="image", name="labels.tif")


def test_service_urls_end_in_a_slash_and_basic_auth_works(bisque_server: BisqueTestServer) -> None:
    """bqapi urljoin()s paths onto the service URLs, so a BisQue server lists them with a trailing '/';
    ``bq-admin`` and a run by hand log in with basic auth (auth_service)."""
    image, uniq = bisque_server.add_image(_imagej_tiff(), "a.tif")
    bq = new_session(POLICY).init_local("admin", "admin", bisque_root=bisque_server.root, create_mex=False)
    assert bq is not None and all(url.endswith("/") for url in bq.service_map.values())
    assert bq.service_url("image_service", uniq) == f"{bisque_server.root}/image_service/{uniq}"
    assert dataset_members(bq, image) is None  # an authorized read
    assert new_session(POLICY).init_local("admin", "nope", bisque_root=bisque_server.root, create_mex=False) is None
