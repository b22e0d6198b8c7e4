r"""A small BisQue server for tests: real HTTP on 127.0.0.1, for the real ``bqapi`` client (bisque-api 0.5.12.2).

It behaves like BisQue (UCSB-VRL/bisqueUCSB, ``source/bqserver``) where the module sees it:

    GET  /services                          service list (public); every URL ends in '/' (bqapi urljoin()s onto them)
    GET  /module_service/mex/<uniq>         MEX document; ``view=deep`` includes inputs and nested sub-MEXes
    POST|PUT /module_service/mex/<uniq>     MEX update: ``value`` is the status; tags merged by name
    GET  /data_service/<uniq>               resource document; a dataset's ``view=deep`` lists its members as
                                            <value type="object">URI</value>
    GET  /image_service/<uniq>?meta         image metadata: size and pixel_resolution_* from the stored file
                                            (0 where the file has none), overridden by ``add_image(meta=)``
    GET  /image_service/<uniq>?format=tiff  the image re-encoded as a plain TIFF: ImageJ/OME spacing is gone
    GET  /blob_service/<uniq>               the stored file, unchanged
    POST /import/transfer[_XXXXXX]          multipart upload; <resource type="uploaded"><image uri=.../></resource>,
                                            or HTTP 200 with <tag name="error"> when ingest fails
    GET  /auth_service/session              <session> with a user tag when basic auth is valid

Every request but ``/services`` needs ``Authorization: Mex <token>`` or basic auth (else 401). A MEX token may
update its MEX and the MEXes nested in it (BisQue's engine runs every sub-MEX with the top MEX's token),
no other (403). ``create_mex`` makes a MEX from inputs; ``create_mex_document`` stores a whole document
(``tests/wrapper/bisque_engine.py`` builds them as the web UI and the module service do).

Faults: ``fail_next``, ``close_connection_mid_download``, ``stall_next``, ``refuse_uploads`` (an HTTP status, or
an ingest error answered 200). Every request is logged in ``requests``.
"""

from __future__ import annotations

import base64
import secrets
import sys
import threading
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Self

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "wrapper"))  # tests/wrapper/bisque_content.py
from bisque_content import (
    Faults,
    RequestRecord,
    Resource,
    Upload,
    dataset_values,
    ingest_error,
    merge_by_name,
    module_service,
    parse_upload,
    reencode_tiff,
    services_xml,
    tiff_meta,
)

__all__ = ["BisqueTestServer", "RequestRecord", "Upload", "bisque_server"]

_SERVICES = ("data_service", "image_service", "blob_service", "module_service", "import", "auth_service")


class BisqueTestServer:
    """Serve BisQue's module-facing API from memory on ``127.0.0.1:<free port>``, in a daemon thread.

    Args:
        user: the basic-auth user, also the owner in MEX tokens (``"<user>:<mex uniq>"``).
        password: the basic-auth password.
    """

    def __init__(self, *, user: str = "admin", password: str = "admin") -> None:
        self.user, self.password = user, password
        self.requests: list[RequestRecord] = []
        self.uploads: list[Upload] = []
        self._resources: dict[str, Resource] = {}
        self._mexes: dict[str, ET.Element] = {}
        self._history: dict[str, list[str]] = {}
        self._tokens: dict[str, str] = {}  # token -> mex uniq
        self._scopes: dict[str, set[str]] = {}  # top MEX uniq -> the MEXes its token may update
        self._faults = Faults()
        self.modules: dict[str, ET.Element] = {}  # registered module definitions by uniq
        self._upload_refusal: int | str | None = None
        self._lock = threading.RLock()
        self._released = threading.Event()
        self.errors: list[BaseException] = []  # exceptions raised while handling requests (server bugs)
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.bisque = self  # type: ignore[attr-defined]
        self.root = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True,
                                        name=f"BisqueTestServer {self.root}")
        self._thread.start()

    def __repr__(self) -> str:
        return f"<BisqueTestServer {self.root}>"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop serving, release stalled requests and free the port."""
        self._released.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    # ---- content -------------------------------------------------------------------------------------
    def add_image(self, data: bytes, name: str, /, *, meta: dict[str, str] | None = None) -> tuple[str, str]:
        """Store TIFF bytes as an image; ``meta`` becomes ``image_service/<uniq>?meta`` tags.

        Returns:
            ``(resource_uri, resource_uniq)``; the URI is the data_service document.
        """
        return self._add(Resource("image", name, bytes(data), dict(meta or {})))

    def add_blob(self, data: bytes, name: str, /) -> tuple[str, str]:
        """Store any file as a ``<file>`` resource; returns ``(resource_uri, resource_uniq)``."""
        return self._add(Resource("file", name, bytes(data)))

    def add_dataset(self, name: str, members: list[str], /) -> tuple[str, str]:
        """Store a dataset of ``members`` (resource URIs); returns ``(resource_uri, resource_uniq)``."""
        return self._add(Resource("dataset", name, b"", children=dataset_values(members)))

    def create_mex(self, inputs: dict[str, str], /, *, status: str = "RUNNING",
                   name: str = "CellSegment3DUnet") -> tuple[str, str]:
        """A MEX whose ``inputs`` tag holds valueless ``mex_url``, ``bisque_token``, then ``inputs`` (untyped).

        Returns:
            ``(mex_url, token)`` as the engine passes them to the module.
        """
        mex = ET.Element("mex", name=name)
        section = ET.SubElement(mex, "tag", name="inputs")
        for system_input in ("mex_url", "bisque_token"):  # valueless, as BisQue's module service stores them
            ET.SubElement(section, "tag", name=system_input, type="system-input")
        for key, value in inputs.items():
            ET.SubElement(section, "tag", name=key, value=str(value))
        return self.create_mex_document(mex, statuses=(status,))

    def create_mex_document(self, mex: ET.Element, /, *, statuses: tuple[str, ...] = ("RUNNING",)) -> tuple[str, str]:
        """Store a whole MEX document (nested ``<mex>`` sub-MEXes and blocks too, each its own MEX) that has
        passed through ``statuses``; the token may update all of them.

        Returns:
            ``(mex_url, token)`` of the top MEX.
        """
        with self._lock:
            top = ""
            for elem in mex.iter("mex"):  # the top first; nested elements are shared with the top's document
                uniq = self._new_uniq()
                elem.set("uri", f"{self.root}/module_service/mex/{uniq}")
                elem.set("resource_uniq", uniq)
                top = top or uniq
                self._mexes[uniq], self._history[uniq] = elem, list(statuses if uniq == top else ())
                self._scopes.setdefault(top, set()).add(uniq)
            mex.set("value", statuses[-1])
            token = f"{self.user}:{top}"
            self._tokens[token] = top
            return mex.get("uri", ""), token

    def add_module(self, module: ET.Element, engine_uri: str, /) -> ET.Element:
        """Register a module definition (``<module name=...>``) served by ``engine_uri``; returns it with its URI."""
        with self._lock:
            uniq = self._new_uniq()
            module.attrib.update(uri=f"{self.root}/data_service/{uniq}", resource_uniq=uniq, value=engine_uri)
            self.modules[uniq] = module
            return module

    def resource_document(self, uri: str, /) -> ET.Element:
        """A copy of a data_service resource's deep document (a dataset lists its members)."""
        with self._lock:
            return ET.fromstring(ET.tostring(self._resource_xml(self._mex_uniq(uri))))

    def mex_status(self, mex_url: str, /) -> str:
        """The MEX's current status (its ``value`` attribute)."""
        return self.mex_document(mex_url).get("value", "")

    def mex_history(self, mex_url: str, /) -> list[str]:
        """Every status the MEX had, in order, starting with the one it was created with."""
        with self._lock:
            return list(self._history[self._mex_uniq(mex_url)])

    def mex_document(self, mex_url: str, /) -> ET.Element:
        """A copy of the full MEX document."""
        with self._lock:
            return ET.fromstring(ET.tostring(self._mexes[self._mex_uniq(mex_url)]))

    def mex_outputs(self, mex_url: str, /) -> dict[str, ET.Element]:
        """The tags inside ``<tag name="outputs">``, by name."""
        section = self.mex_document(mex_url).find("tag[@name='outputs']")
        return {} if section is None else {t.get("name", ""): t for t in section}

    # ---- faults --------------------------------------------------------------------------------------
    def fail_next(self, substring: str, status: int, /, *, times: int = 1, method: str | None = None) -> None:
        """Answer the next ``times`` requests (of ``method``, if given) whose path+query contains
        ``substring`` with ``status``."""
        self._faults.add(substring, "status", status, times=times, method=method)

    def close_connection_mid_download(self, substring: str, /, *, times: int = 1) -> None:
        """For the next matching file downloads, promise the full length, send half and hang up."""
        self._faults.add(substring, "cut", 0, times=times)

    def stall_next(self, substring: str, seconds: float, /, *, times: int = 1) -> None:
        """Hold the next matching requests for ``seconds`` (or until ``close``) before answering."""
        self._faults.add(substring, "stall", seconds, times=times)

    def refuse_uploads(self, refusal: int | str | None, /) -> None:
        """Answer every upload with an HTTP status, or (a string) with HTTP 200 and ``<tag name="error">`` as
        BisQue's import service does when ingesting fails; ``None`` accepts uploads again."""
        with self._lock:
            self._upload_refusal = refusal

    # ---- internals -----------------------------------------------------------------------------------
    def _new_uniq(self) -> str:
        return "00-" + secrets.token_urlsafe(16).replace("-", "x").replace("_", "y")

    def _add(self, resource: Resource) -> tuple[str, str]:
        with self._lock:
            uniq = self._new_uniq()
            self._resources[uniq] = resource
            return f"{self.root}/data_service/{uniq}", uniq

    def _mex_uniq(self, mex_url: str) -> str:
        return urllib.parse.urlsplit(mex_url).path.rstrip("/").rsplit("/", 1)[-1]

    def _resource_xml(self, uniq: str, *, deep: bool = True) -> ET.Element:
        res = self._resources[uniq]
        elem = ET.Element(res.tag, name=res.name, resource_uniq=uniq, uri=f"{self.root}/data_service/{uniq}",
                          value=f"{self.root}/blob_service/{uniq}")
        if deep:
            elem.extend(ET.fromstring(ET.tostring(child)) for child in res.children)
        return elem

    def _update_mex(self, uniq: str, posted: ET.Element) -> None:
        """Apply a posted ``<mex value=STATUS>``: set the status, merge ``<tag>`` children by name. Nested
        ``<mex>`` elements (a whole document posted back, as bqapi's ``finish_mex`` does) are their own MEXes,
        identified by URI, and left as they are."""
        mex = self._mexes[uniq]
        if posted.get("value"):
            mex.set("value", posted.get("value", ""))
            self._history[uniq].append(posted.get("value", ""))
        for child in posted:
            if child.tag == "mex":
                continue
            merge_by_name(mex, child, depth=2 if child.get("name") in ("inputs", "outputs") else 1)

    def _store_upload(self, name: str, data: bytes, xml: ET.Element | None) -> ET.Element:
        tag = xml.tag if xml is not None else ("image" if name.lower().endswith((".tif", ".tiff")) else "file")
        name = (xml.get("name") if xml is not None else None) or name
        children = list(xml) if xml is not None else []
        uri, uniq = self._add(Resource(tag, name, data, children=children))
        self.uploads.append(Upload(name=name, data=data, xml=xml, uri=uri, uniq=uniq))
        answer = ET.Element("resource", type="uploaded")
        answer.append(self._resource_xml(uniq))
        return answer


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        """Record handler exceptions; a client that hung up (timeout, cut download) is not an error."""
        exc = sys.exc_info()[1]
        if exc is not None and not isinstance(exc, ConnectionError):
            self.bisque.errors.append(exc)  # type: ignore[attr-defined]
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in two writes: avoid 40 ms delayed-ACK stalls
    server: ThreadingHTTPServer

    def log_message(self, format: str, *args: object) -> None:
        pass

    @property
    def bisque(self) -> BisqueTestServer:
        return self.server.bisque  # type: ignore[attr-defined]

    def _dispatch(self) -> None:
        split = urllib.parse.urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        bq = self.bisque
        with bq._lock:
            bq.requests.append(RequestRecord(self.command, split.path, split.query,
                                             {k.lower(): v for k, v in self.headers.items()}, body))
        target = self.path
        stall = bq._faults.take(self.command, target, ("stall",))
        if stall is not None:
            bq._released.wait(stall.value)
        failure = bq._faults.take(self.command, target, ("status",))
        if failure is not None:
            return self._send(int(failure.value), b"injected failure", "text/plain")
        parts = [urllib.parse.unquote(p) for p in split.path.strip("/").split("/") if p]
        query = dict(urllib.parse.parse_qsl(split.query, keep_blank_values=True))
        if parts == ["services"]:
            return self._send_xml(services_xml(bq.root, _SERVICES))
        token_uniq = self._authenticate()
        if token_uniq is None:
            return self._send(401, b"authentication required", "text/plain",
                              {"WWW-Authenticate": 'Basic realm="bisque"'})
        try:
            self._route(parts, query, body, token_uniq)
        except (KeyError, ValueError, ET.ParseError) as exc:
            self._send(400 if isinstance(exc, (ValueError, ET.ParseError)) else 404,
                       f"{type(exc).__name__}: {exc}".encode(), "text/plain")

    do_GET = do_POST = do_PUT = _dispatch

    def _authenticate(self) -> str | None:
        """The MEX uniq of a valid Mex token, ``""`` for valid basic auth, ``None`` when unauthorized."""
        scheme, _, credential = (self.headers.get("Authorization") or "").partition(" ")
        if scheme == "Mex":
            return self.bisque._tokens.get(credential)
        if scheme == "Basic":
            try:
                user, _, password = base64.b64decode(credential).decode().partition(":")
            except ValueError:
                return None
            return "" if (user, password) == (self.bisque.user, self.bisque.password) else None
        return None

    def _route(self, parts: list[str], query: dict[str, str], body: bytes, token_uniq: str) -> None:
        bq = self.bisque
        service, rest = (parts[0], parts[1:]) if parts else ("", [])
        resource = None
        with bq._lock:
            if service == "module_service" and rest[:1] == ["mex"] and len(rest) == 2:
                return self._mex(rest[1], query, body, token_uniq)
            if service == "module_service" and (not rest or rest[0] in ("register_engine", "unregister_engine")):
                return self._module_service(rest, query, body)
            if self.command == "GET" and service == "data_service" and rest:
                return self._send_xml(bq._resource_xml(rest[-1], deep="short" not in query.get("view", "")))
            if self.command == "GET" and service == "auth_service" and rest == ["session"]:
                session = ET.Element("session")
                ET.SubElement(session, "tag", name="user", value=bq.user)
                return self._send_xml(session)
            if self.command == "POST" and service == "import" and rest and rest[0].startswith("transfer"):
                return self._upload(body)
            if self.command == "GET" and service == "image_service" and len(rest) == 1 and "meta" in query:
                return self._send_xml(self._meta_xml(rest[0]))
            if self.command == "GET" and service in ("image_service", "blob_service") and len(rest) == 1:
                if set(query) - {"format"} or query.get("format", "tiff").lower() not in ("tiff", "tif"):
                    return self._send(501, f"not implemented: {query}".encode(), "text/plain")
                resource = bq._resources[rest[0]]
                if service == "image_service" and resource.tag == "image":
                    data = resource.encoded = resource.encoded or reencode_tiff(resource.data)
                else:
                    data = resource.data
        if resource is not None:  # sent outside the lock: a cut or slow download must not block others
            return self._send_file(resource, data)
        self._send(404, f"no route for {self.command} {self.path}".encode(), "text/plain")

    def _mex(self, uniq: str, query: dict[str, str], body: bytes, token_uniq: str) -> None:
        bq = self.bisque
        mex = bq._mexes[uniq]
        if self.command in ("POST", "PUT"):
            if token_uniq != "" and uniq not in bq._scopes.get(token_uniq, {token_uniq}):
                return self._send(403, b"this token may not update that MEX", "text/plain")
            bq._update_mex(uniq, ET.fromstring(body))
        if query.get("view", "short") in ("deep", "full"):
            return self._send_xml(mex)
        return self._send_xml(ET.Element("mex", dict(mex.attrib)))

    def _module_service(self, rest: list[str], query: dict[str, str], body: bytes) -> None:
        status, answer = module_service(self.bisque, rest, self.command, query, body)
        return self._send_xml(answer) if status == 200 else self._send(status, str(answer).encode(), "text/plain")

    def _meta_xml(self, uniq: str) -> ET.Element:
        resource = self.bisque._resources[uniq]
        meta = ET.Element("resource", uri=f"{self.bisque.root}/image_service/{uniq}?meta")
        ET.SubElement(meta, "tag", name="filename", value=resource.name)
        for key, value in {**tiff_meta(resource.data), **resource.meta}.items():
            ET.SubElement(meta, "tag", name=key, value=str(value))
        return meta

    def _upload(self, body: bytes) -> None:
        bq = self.bisque
        if isinstance(bq._upload_refusal, int):
            return self._send(bq._upload_refusal, b"uploads refused", "text/plain")
        name, data, xml = parse_upload(self.headers.get("Content-Type", ""), body)
        if isinstance(bq._upload_refusal, str):
            return self._send_xml(ingest_error(name, bq._upload_refusal))
        self._send_xml(bq._store_upload(name, data, xml))

    def _send_file(self, resource: Resource, data: bytes) -> None:
        ctype = "image/tiff" if resource.tag == "image" else "application/octet-stream"
        if self.bisque._faults.take(self.command, self.path, ("cut",)) is not None:
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self._send(200, data, ctype, {"Content-Disposition": f'attachment; filename="{resource.name}"'})

    def _send_xml(self, elem: ET.Element) -> None:
        self._send(200, ET.tostring(elem, encoding="utf-8", xml_declaration=False), "text/xml")

    def _send(self, status: int, body: bytes, ctype: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def bisque_server() -> Iterator[BisqueTestServer]:
    """A fresh ``BisqueTestServer`` per test, closed afterwards."""
    with BisqueTestServer() as server:
        yield server
