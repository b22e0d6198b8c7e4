"""What the BisQue test server (``tests/bisque_server.py``) stores and serves, as BisQue does it: the image
service's re-encoded TIFF and metadata, and MEX updates merged by tag name. Plain functions, no HTTP."""

from __future__ import annotations

import email.parser
import email.policy
import io
import threading
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Faults", "RequestRecord", "Resource", "Upload", "dataset_values", "ingest_error", "merge_by_name", "module_service",
           "parse_upload", "reencode_tiff", "services_xml", "tiff_meta"]


@dataclass(frozen=True)
class RequestRecord:
    """One request as the server saw it; ``headers`` keys are lower-case."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True)
class Upload:
    """One accepted upload: the file part (``name``, ``data``) and the ``file_resource`` XML, if any."""

    name: str
    data: bytes
    xml: ET.Element | None
    uri: str
    uniq: str


@dataclass
class Resource:
    """A stored resource: its XML ``tag`` (image, file, dataset), bytes, image metadata and child elements."""

    tag: str  # "image" or "file"
    name: str
    data: bytes
    meta: dict[str, str] = field(default_factory=dict)
    children: list[ET.Element] = field(default_factory=list)
    encoded: bytes = b""  # the image service's re-encoded TIFF, made on first request


@dataclass
class _Fault:
    substring: str
    kind: str  # "status", "cut" or "stall"
    value: float
    times: int
    method: str | None = None


class Faults:
    """Faults to inject into the next matching requests (thread-safe)."""

    def __init__(self) -> None:
        self._faults: list[_Fault] = []
        self._lock = threading.Lock()

    def add(self, substring: str, kind: str, value: float, /, *, times: int, method: str | None = None) -> None:
        """``kind``: ``status`` (answer ``value``), ``cut`` (half the file, then hang up) or ``stall`` (wait)."""
        with self._lock:
            self._faults.append(_Fault(substring, kind, value, times, method))

    def take(self, method: str, target: str, kinds: tuple[str, ...], /) -> _Fault | None:
        """The first fault of one of ``kinds`` for this request (path + query ``target``), used up once."""
        with self._lock:
            for fault in self._faults:
                if fault.kind in kinds and fault.substring in target and fault.method in (None, method):
                    fault.times -= 1
                    if fault.times <= 0:
                        self._faults.remove(fault)
                    return fault
        return None


def dataset_values(members: list[str], /) -> list[ET.Element]:
    """A dataset's members as BisQue's data service lists them: ``<value type="object">URI</value>``."""
    values = []
    for uri in members:
        value = ET.Element("value", type="object")
        value.text = uri
        values.append(value)
    return values


def parse_upload(content_type: str, body: bytes, /) -> tuple[str, bytes, ET.Element | None]:
    """``(file name, file bytes, file_resource XML)`` of a multipart upload as bqapi's ``postblob`` sends it.

    Raises:
        ValueError: the body is not multipart/form-data.
    """
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
    if not message.is_multipart():
        raise ValueError("upload is not multipart/form-data")
    name, data, xml = "", b"", None
    for part in message.iter_parts():
        field_name = part.get_param("name", header="content-disposition")
        if field_name == "file":
            name, data = part.get_filename() or "upload", part.get_payload(decode=True) or b""
        elif field_name == "file_resource":
            xml = ET.fromstring(part.get_payload(decode=True) or b"")
    return name, data, xml


def ingest_error(name: str, message: str, /) -> ET.Element:
    """The import service's answer (HTTP 200) when ingesting a file failed: ``import_service.process_filtered``."""
    answer = ET.Element("resource", type="uploaded")
    ET.SubElement(ET.SubElement(answer, "file", name=name), "tag", name="error", value=message)
    return answer


def reencode_tiff(data: bytes) -> bytes:
    """The pixels as a plain TIFF, as BisQue's image service (imgcnv) sends ``?format=tiff``: no ImageJ or OME
    metadata, so no voxel size. An undecodable file is sent as it is."""
    import tifffile

    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            pixels = tif.series[0].asarray()
    except (tifffile.TiffFileError, ValueError, IndexError):
        return data
    out = io.BytesIO()
    tifffile.imwrite(out, pixels, photometric="minisblack", metadata=None)
    return out.getvalue()


def tiff_meta(data: bytes) -> dict[str, str]:
    """``image_num_*`` and ``pixel_resolution_*`` (µm; 0 when unknown, as BisQue's converters report) of a TIFF."""
    import tifffile

    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            sizes = dict(zip(tif.series[0].axes, tif.series[0].shape))
            tags, imagej = tif.pages[0].tags, tif.imagej_metadata or {}
    except (tifffile.TiffFileError, ValueError, IndexError):
        return {}
    meta = {f"image_num_{a.lower()}": str(sizes.get(a, 1)) for a in "XYZCT"}
    for axis, tag in (("x", "XResolution"), ("y", "YResolution")):
        pixels_per_um = tags[tag].value[0] / tags[tag].value[1] if tag in tags and imagej else 0
        meta[f"pixel_resolution_{axis}"] = str(1.0 / pixels_per_um if pixels_per_um else 0.0)
    meta["pixel_resolution_z"] = str(float(imagej.get("spacing", 0.0)))
    meta.update({f"pixel_resolution_unit_{axis}": "microns" for axis in "xyz"})
    return meta


def merge_by_name(parent: ET.Element, child: ET.Element, *, depth: int) -> None:
    """Replace ``parent``'s same-named child (or append); at depth 2, merge one level further down."""
    same = [c for c in parent if c.tag == child.tag and c.get("name") == child.get("name")]
    if not same or child.get("name") is None:
        parent.append(child)
    elif depth > 1:
        for grandchild in child:
            merge_by_name(same[0], grandchild, depth=depth - 1)
    else:
        parent[list(parent).index(same[0])] = child


def services_xml(root: str, services: tuple[str, ...], /) -> ET.Element:
    """``GET /services``: every service URL ends in '/', since bqapi urljoin()s paths onto them."""
    resource = ET.Element("resource", uri=f"{root}/services")
    for service in services:
        ET.SubElement(resource, "tag", name="service", type=service, value=f"{root}/{service}/")
    return resource


def module_service(server: Any, rest: list[str], method: str, query: dict[str, str], body: bytes,
                   /) -> tuple[int, ET.Element | str]:
    """``module_server.py``: ``register_engine`` answers 405 for a name registered with an engine already;
    ``unregister_engine/<uniq>`` blanks the module's engine (``value``); ``GET /module_service/`` lists them.
    ``server``: the test server (its ``modules`` and ``add_module``). Returns ``(HTTP status, answer)``."""
    modules = server.modules
    if rest and rest[0] == "register_engine" and method == "POST":
        module = ET.fromstring(body)
        if any(m.get("name") == module.get("name") and m.get("value") for m in modules.values()):
            return 405, "Engine is already registered by that name"
        return 200, server.add_module(module, query.get("engine_uri", ""))
    if rest and rest[0] == "unregister_engine" and len(rest) == 2:
        modules[rest[1]].set("value", "")
        return 200, modules[rest[1]]
    listing = ET.Element("resource", uri=f"{server.root}/module_service/")
    listing.extend(ET.Element("module", dict(m.attrib)) for m in modules.values())
    return 200, listing
