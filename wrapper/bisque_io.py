"""BisQue I/O for the module: a bounded bqapi session, checked downloads, uploads and the MEX status.

bisque-api 0.5.12.2 is used as it is, around its pitfalls (each pinned by ``tests/wrapper/test_bisque_server.py``):

* ``init_mex`` mounts a 30-retry policy (about 50 minutes of backoff) and passes no timeout for XML calls and
  an hour for files: :func:`new_session` mounts one bounded adapter with timeouts instead and disables
  ``setup_retry``. Only GETs are retried; POSTs (MEX updates, uploads) never are.
* ``load()`` and ``init_mex`` swallow 401/403/404 and pixel/blob fetches do not check the HTTP status, so
  documents and files are fetched here with the session's ``requests`` API and every status is checked,
  every download's length compared with ``Content-Length`` and the result checked to be a TIFF.

The MEX status (progress, finish, failure) is ``wrapper.mex``'s job.
Messages never contain the token: it travels only in the ``Authorization`` header.
"""

from __future__ import annotations

import logging
import os
import re
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
import urllib3
from bqapi import BQSession
from bqapi.comm import MexAuth
from bqapi.exception import BQCommError
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

__all__ = [
    "BisqueError",
    "BoundedAdapter",
    "Fetched",
    "HttpPolicy",
    "check_response",
    "dataset_members",
    "describe",
    "fetch_resource",
    "get_xml",
    "new_session",
    "open_mex_session",
    "open_user_session",
    "upload_file",
    "voxel_size_from_meta",
]

logger = logging.getLogger(__name__)

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, both byte orders
_CHUNK = 1 << 20


class BisqueError(RuntimeError):
    """A BisQue request failed; the message is one line and says what, where and why.

    ``reportable`` is False when the MEX itself cannot be updated (the token was refused).
    """

    def __init__(self, message: str, /, *, reportable: bool = True) -> None:
        super().__init__(message)
        self.reportable = reportable


@dataclass(frozen=True)
class HttpPolicy:
    """Timeouts (seconds) and the retry budget for every request of a session."""

    connect_timeout: float = 10.0
    read_timeout: float = 120.0
    retries: int = 3
    backoff: float = 1.0

    @classmethod
    def from_env(cls) -> HttpPolicy:
        """Defaults, overridden by ``CELLSEG3D_HTTP_TIMEOUT`` (read), ``_RETRIES`` and ``_BACKOFF``."""
        env = os.environ
        return cls(
            read_timeout=float(env.get("CELLSEG3D_HTTP_TIMEOUT", cls.read_timeout)),
            retries=int(env.get("CELLSEG3D_HTTP_RETRIES", cls.retries)),
            backoff=float(env.get("CELLSEG3D_HTTP_BACKOFF", cls.backoff)),
        )


class BoundedAdapter(HTTPAdapter):
    """Every request gets the policy's timeout: bqapi passes None for XML calls and 3600 s for files."""

    def __init__(self, policy: HttpPolicy) -> None:
        retry = Retry(total=policy.retries, connect=policy.retries, read=policy.retries, status=policy.retries,
                      backoff_factor=policy.backoff, status_forcelist=(500, 502, 503, 504),
                      allowed_methods=frozenset({"GET", "HEAD"}))
        super().__init__(max_retries=retry)
        self._timeout = (policy.connect_timeout, policy.read_timeout)

    def send(self, request: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        kwargs["timeout"] = self._timeout
        return super().send(request, **kwargs)


def new_session(policy: HttpPolicy, /) -> BQSession:
    """A ``BQSession`` whose requests are bounded by ``policy``; call ``init_mex``/``init_local`` on it."""
    bq = BQSession()
    adapter = BoundedAdapter(policy)
    bq.c.mount("http://", adapter)
    bq.c.mount("https://", adapter)
    bq.setup_retry = lambda *args, **kwargs: None  # else init_* mounts 30 retries on the server root
    bq.policy = policy  # read by the download loop here
    return bq


def describe(exc: BaseException, /) -> str:
    """One line for a transport failure, without the request's headers."""
    reason = getattr(exc.args[0], "reason", None) if exc.args else None  # urllib3's MaxRetryError inside
    if isinstance(exc, requests.exceptions.RetryError):
        return f"the server kept failing ({reason or exc})"
    if isinstance(reason, urllib3.exceptions.NewConnectionError):  # a ConnectTimeoutError subclass: test first
        return f"connection failed (cannot connect to {reason.conn.host}:{reason.conn.port})"
    if isinstance(exc, requests.exceptions.ConnectTimeout) or isinstance(reason, urllib3.exceptions.ConnectTimeoutError):
        return "no connection (timed out)"
    if isinstance(exc, requests.exceptions.ReadTimeout) or isinstance(reason, urllib3.exceptions.ReadTimeoutError):
        return "no answer (timed out)"
    if isinstance(exc, (requests.exceptions.ChunkedEncodingError, urllib3.exceptions.ProtocolError)):
        return "the connection was closed mid-transfer"
    if isinstance(exc, requests.exceptions.ConnectionError):
        return f"connection failed ({reason or exc})"
    return f"{type(exc).__name__}: {exc}"


def check_response(response: requests.Response, what: str, /) -> None:
    """Raise :class:`BisqueError` (one line: what, and the HTTP status) unless the answer is 200."""
    code = response.status_code
    if code == 200:
        return
    if code in (401, 403):
        raise BisqueError(f"{what}: access denied (HTTP {code})")
    if code == 404:
        raise BisqueError(f"{what}: not found (HTTP 404)")
    raise BisqueError(f"{what}: the server answered HTTP {code}")


def _get(bq: BQSession, url: str, what: str, **kwargs: Any) -> requests.Response:
    try:
        response = bq.c.get(url, **kwargs)
    except requests.RequestException as exc:
        raise BisqueError(f"{what}: {describe(exc)}") from exc
    check_response(response, what)
    return response


def get_xml(bq: BQSession, url: str, what: str, **params: str) -> ET.Element:
    response = _get(bq, url, what, params=params, headers={"Accept": "text/xml"})
    try:
        doc = ET.fromstring(response.content)
    except ET.ParseError as exc:
        raise BisqueError(f"{what}: the answer is not XML ({exc})") from exc
    return doc[0] if doc.tag == "response" and len(doc) else doc


def _root(url: str) -> str:
    parts = urllib3.util.parse_url(url)
    return f"{parts.scheme}://{parts.netloc}"


def open_mex_session(mex_url: str, token: str, /, *, policy: HttpPolicy) -> BQSession:
    """Start a session on the MEX the engine gave us (``bq.mex`` is loaded on return).

    Raises:
        BisqueError: services or MEX unreadable; ``reportable`` is False when the token was refused.
    """
    bq = new_session(policy)
    try:
        bq.init_mex(mex_url, token)
    except (requests.RequestException, BQCommError) as exc:
        raise BisqueError(f"starting the session at {_root(mex_url)}: {describe(exc)}") from exc
    if not bq.service_map:
        raise BisqueError(f"{_root(mex_url)}/services: no service list; is this a BisQue server?")
    if bq.mex is None:  # load() swallowed the error and init_mex dropped the credentials: ask once more
        try:
            code = bq.c.get(mex_url, params={"view": "short"}, auth=MexAuth(token)).status_code
        except requests.RequestException as exc:
            raise BisqueError(f"reading the MEX {mex_url}: {describe(exc)}") from exc
        refused = code in (401, 403)
        why = "the token was refused" if refused else "the server could not return it"
        raise BisqueError(f"reading the MEX {mex_url}: {why} (HTTP {code})", reportable=not refused)
    return bq


def open_user_session(root: str, user: str, password: str, /, *, policy: HttpPolicy) -> BQSession:
    """A basic-auth session without a MEX, for running the module by hand.

    Raises:
        BisqueError: the server cannot be reached or refused the credentials.
    """
    bq = new_session(policy)
    try:
        ok = bq.init_local(user, password, bisque_root=root, create_mex=False)
    except (requests.RequestException, BQCommError) as exc:
        raise BisqueError(f"logging in to {root}: {describe(exc)}") from exc
    if ok is None:
        raise BisqueError(f"logging in to {root} as {user!r}: the credentials were refused")
    return bq


@dataclass(frozen=True)
class Fetched:
    """A downloaded input: local ``path``, the resource's ``name``, ``kind`` (XML tag), ``uniq`` and ``url``."""

    path: Path
    name: str
    kind: str
    uniq: str
    url: str


def _safe_name(name: str) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).name).strip("._") or "input"
    return base if base.lower().endswith((".tif", ".tiff")) else f"{base}.tif"


def _download(bq: BQSession, url: str, dest: Path, what: str) -> int:
    """Stream ``url`` to ``dest``; retry a cut or stalled transfer within the policy. Returns the size."""
    policy: HttpPolicy = bq.policy
    for attempt in range(policy.retries + 1):
        try:
            with _get(bq, url, what, stream=True, headers={"Accept": "*/*"}) as response:
                expected = response.headers.get("Content-Length")
                size = 0
                with open(dest, "wb") as handle:
                    for block in response.iter_content(_CHUNK):
                        handle.write(block)
                        size += len(block)
            if expected is not None and size != int(expected):
                raise requests.exceptions.ChunkedEncodingError(f"got {size} of {expected} bytes")
            return size
        except (requests.RequestException, urllib3.exceptions.HTTPError) as exc:
            if attempt == policy.retries:
                raise BisqueError(f"{what}: {describe(exc)} ({attempt + 1} tries)") from exc
            logger.warning("%s: %s; trying again", what, describe(exc))
            time.sleep(policy.backoff * 2**attempt)
    raise AssertionError("unreachable")  # pragma: no cover


def fetch_resource(bq: BQSession, resource_url: str, dest_dir: Path, /, *, source: str = "auto") -> Fetched:
    """Download the TIFF of ``resource_url`` into ``dest_dir``.

    Args:
        resource_url: a data_service URL of an image (or of a file holding a TIFF).
        source: ``auto`` (an image through the image service as TIFF, any other resource as its blob),
            ``image-service`` or ``blob`` (the original file).

    Raises:
        BisqueError: unreadable resource, a dataset, a failed or cut download, or data that is not a TIFF.
    """
    doc = get_xml(bq, resource_url, f"reading {resource_url}", view="short")
    kind, uniq = doc.tag, doc.get("resource_uniq", "")
    name = doc.get("name") or uniq or "input"
    if kind == "dataset":
        raise BisqueError(f"{resource_url} is a dataset: segment its members (dataset_members), one at a time")
    if not uniq:
        raise BisqueError(f"{resource_url}: the document has no resource_uniq (a <{kind}>)")
    if source == "auto":
        source = "image-service" if kind == "image" else "blob"
    if source == "image-service":
        url = bq.service_url("image_service", uniq, query={"format": "tiff"})
    else:
        url = bq.service_url("blob_service", uniq)
    dest = dest_dir / _safe_name(name)
    size = _download(bq, url, dest, f"downloading {name} ({url})")
    with open(dest, "rb") as handle:
        head = handle.read(64)
    if head[:4] not in _TIFF_MAGIC:
        raise BisqueError(f"{name} ({url}): not a TIFF; the server sent {size} bytes starting with {head[:24]!r}")
    logger.info("%s: %d bytes from %s", name, size, url)
    return Fetched(path=dest, name=name, kind=kind, uniq=uniq, url=url)


def dataset_members(bq: BQSession, dataset_url: str, /) -> list[str] | None:
    """The member URIs of a dataset (``./value`` of its deep document, the xpath BisQue's module service
    iterates over: ``module_server.create_mex``), or None when ``dataset_url`` is not a dataset.

    Raises:
        BisqueError: the document cannot be read.
    """
    doc = get_xml(bq, dataset_url, f"reading {dataset_url}", view="deep")
    if doc.tag != "dataset":
        return None
    return [v.text.strip() for v in doc.findall("value") if v.text and v.text.strip()]


def voxel_size_from_meta(bq: BQSession, uniq: str, /) -> tuple[float, float, float] | None:
    """``(z, y, x)`` µm from ``image_service/<uniq>?meta`` (``pixel_resolution_*``), or None."""
    url = bq.service_url("image_service", uniq, query={"meta": ""})
    try:
        doc = get_xml(bq, url, f"reading the metadata of {uniq}")
    except BisqueError as exc:
        logger.info("no voxel size from the image service: %s", exc)
        return None
    found = {t.get("name"): t.get("value") for t in doc.iter("tag")}
    try:
        values = tuple(float(found.get(f"pixel_resolution_{axis}") or "nan") for axis in "zyx")
    except ValueError:
        return None
    units = {str(found.get(f"pixel_resolution_unit_{axis}", "microns")).lower() for axis in "zyx"}
    if not all(v > 0 for v in values) or not units <= {"microns", "micron", "um", "µm", "none"}:
        return None
    return values  # type: ignore[return-value]


def upload_file(bq: BQSession, path: Path, /, *, kind: str, name: str) -> str:
    """Upload ``path`` as a ``<kind name=...>`` resource; returns its data_service URI.

    Never repeated: after a timeout the server may have stored it already.

    Raises:
        BisqueError: refused, no answer, or an answer without the new resource.
    """
    xml = ET.tostring(ET.Element(kind, name=name), encoding="unicode")
    try:
        answer = bq.postblob(str(path), xml=xml)
    except BQCommError as exc:
        raise BisqueError(f"uploading {name}: refused (HTTP {exc.response_code})") from exc
    except requests.Timeout as exc:
        raise BisqueError(f"uploading {name}: {describe(exc)}; not repeated, as the server may have stored it") from exc
    except requests.RequestException as exc:
        raise BisqueError(f"uploading {name}: {describe(exc)}") from exc
    try:
        doc = ET.fromstring(answer)
    except ET.ParseError as exc:
        raise BisqueError(f"uploading {name}: the answer is not XML ({exc})") from exc
    error = next((t.get("value") for t in doc.iter("tag") if t.get("name") == "error"), None)
    if error is not None:  # BisQue's import service answers 200 with <tag name="error"> when ingest fails
        raise BisqueError(f"uploading {name}: the server refused it ({' '.join(str(error).split())[:200]})")
    uri = next((e.get("uri") for e in doc.iter() if e.get("uri") and e is not doc), None) or doc.get("uri")
    if not uri:
        raise BisqueError(f"uploading {name}: the answer names no resource ({answer[:120]!r})")
    logger.info("uploaded %s as %s", name, uri)
    return uri
