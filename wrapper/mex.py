"""MEX documents: progress in the status, a finish or failure checked by reading it back, and sub-MEXes.

Every update is posted here, by URL, not through bqapi's ``update_mex``/``finish_mex``: those only know the
session's own MEX (``bq.mex``), while a dataset MEX run in one container updates its sub-MEXes with the same
token (BisQue's engine gives every sub-MEX the top MEX's token: ``command_run.BaseRunner.init_runstate``).
A finish merges into the MEX document fetched with ``view=deep`` and posts it whole, as bisque-api
0.5.12.2's ``finish_mex(merge=True)`` does; unlike it, a failed POST is reported, not turned into FAILED
behind the caller's back, and the status is read back after each finish or failure.
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping
from typing import Any

import requests
from bqapi import BQSession
from bqapi.comm import MexAuth

from .bisque_io import (
    BisqueError,
    BoundedAdapter,
    HttpPolicy,
    check_response,
    describe,
    get_xml,
)

__all__ = ["Mex", "post_status_directly", "sub_mex_urls", "tag_element"]

logger = logging.getLogger(__name__)
_XML = {"Content-Type": "text/xml", "Accept": "text/xml"}


def tag_element(tag: Mapping[str, Any], /) -> ET.Element:
    """A bqapi-style tag dict (``name``, ``value``, ``type``, nested ``tag`` list) as a ``<tag>`` element."""
    elem = ET.Element("tag", {k: str(v) for k, v in tag.items() if k != "tag" and v is not None})
    elem.extend(tag_element(child) for child in tag.get("tag", ()))
    return elem


def _failed_xml(mex_url: str, message: str) -> bytes:
    mex = ET.Element("mex", uri=mex_url, value="FAILED")
    ET.SubElement(mex, "tag", name="error_message", value=message)
    return ET.tostring(mex)


def post_status_directly(mex_url: str, token: str, message: str, /, *, policy: HttpPolicy) -> bool:
    """POST ``FAILED`` with ``message`` straight to the MEX, for when no session could be opened."""
    with requests.Session() as session:
        session.mount("http://", BoundedAdapter(policy))
        session.mount("https://", BoundedAdapter(policy))
        try:
            response = session.post(mex_url, data=_failed_xml(mex_url, message), auth=MexAuth(token), headers=_XML)
        except requests.RequestException as exc:
            logger.error("could not mark the MEX FAILED: %s", describe(exc))
            return False
    if response.status_code != 200:
        logger.error("could not mark the MEX FAILED: HTTP %d", response.status_code)
    return response.status_code == 200


def sub_mex_urls(mex: Any, /) -> list[str]:
    """The URLs of the MEXes nested in ``mex`` (a dataset MEX's per-image sub-MEXes, or a block's members)."""
    return [child.get("uri", "") for child in mex.findall("mex") if child.get("uri")]


class Mex:
    """One MEX: status updates, and a finish or failure that is checked by reading it back.

    Args:
        bq: the session (its token may update this MEX); None for a run by hand: every update is only logged.
        url: the MEX; default the session's own.
    """

    def __init__(self, bq: BQSession | None, /, url: str | None = None) -> None:
        self.bq = bq if bq is not None and (url or bq.mex is not None) else None
        self.url: str = url or (self.bq.mex.uri if self.bq is not None else "")
        self._last_percent = -100

    def _post(self, doc: ET.Element, what: str) -> None:
        try:
            response = self.bq.c.post(self.url, data=ET.tostring(doc), headers=_XML, params={"view": "short"})
        except requests.RequestException as exc:
            raise BisqueError(f"{what}: {describe(exc)}") from exc
        check_response(response, what)

    def update(self, status: str, /) -> None:
        """Set the MEX status (free text while running); a failed update is logged, not fatal."""
        logger.info("status: %s", status)
        if self.bq is None:
            return
        try:
            self._post(ET.Element("mex", uri=self.url, value=status), f"setting the status {status!r}")
        except BisqueError as exc:
            logger.warning("%s", exc)

    def progress(self, prefix: str, /, *, step: int = 10) -> Callable[[int, int], None]:
        """A ``(done, total)`` callback that posts ``"<prefix> n%"`` every ``step`` percent."""
        self._last_percent = -100

        def report(done: int, total: int) -> None:
            percent = 100 * done // max(total, 1)
            if percent >= self._last_percent + step or (done == total and percent != self._last_percent):
                self._last_percent = percent
                self.update(f"{prefix} {percent}%")

        return report

    def status(self) -> str | None:
        """The MEX's current status as the server has it, or None when it cannot be read."""
        if self.bq is None:
            return None
        try:
            return get_xml(self.bq, self.url, "reading the MEX status", view="short").get("value")
        except BisqueError as exc:
            logger.error("%s", exc)
            return None

    def _close(self, status: str, tags: list[ET.Element], what: str) -> None:
        """Fetch the document, set ``status``, merge ``tags`` (an ``outputs`` tag into the existing one), post."""
        doc = get_xml(self.bq, self.url, what, view="deep")
        doc.set("value", status)
        for tag in tags:
            same = doc.find(f"tag[@name='{tag.get('name')}']")
            if same is not None and tag.get("name") == "outputs":
                same.extend(list(tag))
            elif same is not None:
                doc.remove(same)
                doc.append(tag)
            else:
                doc.append(tag)
        self._post(doc, what)

    def finish(self, outputs: Mapping[str, Any], /) -> None:
        """Post FINISHED with the ``outputs`` tag (a bqapi tag dict) and check that it holds.

        Raises:
            BisqueError: the post failed, or the MEX does not read FINISHED afterwards.
        """
        if self.bq is None:
            return
        self._close("FINISHED", [tag_element(outputs)], "finishing the MEX")
        status = self.status()
        if status != "FINISHED":
            raise BisqueError(f"finishing the MEX: it reads {status!r} afterwards, not 'FINISHED'")

    def fail(self, message: str, /) -> bool:
        """Post FAILED with ``message``; True when the MEX reads FAILED afterwards."""
        if self.bq is None:
            return False
        error = ET.Element("tag", name="error_message", value=message)
        try:
            self._close("FAILED", [error], "marking the MEX FAILED")
        except BisqueError as exc:  # e.g. the deep document could not be read: post the status alone
            logger.error("%s; posting FAILED alone", exc)
            try:
                self._post(ET.fromstring(_failed_xml(self.url, message)), "posting FAILED")
            except BisqueError as again:
                logger.error("%s", again)
        return self.status() == "FAILED"
