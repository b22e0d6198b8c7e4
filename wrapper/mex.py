"""The MEX of a run: progress in its status, and a finish or failure that is checked by reading it back.

bisque-api 0.5.12.2's ``finish_mex`` posts FAILED by itself when its POST fails and returns None either way,
and ``fail_mex`` gives up silently (both pinned by ``tests/wrapper/test_bisque_server.py``), so :class:`Mex`
re-reads the status after each. ``finish_mex(msg=...)`` appends to a shared default list and
``fail_mex(None)`` crashes: neither is used.
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import Any

import requests
from bqapi import BQSession
from bqapi.comm import MexAuth
from bqapi.exception import BQCommError

from .bisque_io import BisqueError, BoundedAdapter, HttpPolicy, describe, get_xml

__all__ = ["Mex", "post_status_directly"]

logger = logging.getLogger(__name__)


def _mex_xml(mex_url: str, status: str, message: str) -> bytes:
    mex = ET.Element("mex", uri=mex_url, value=status)
    ET.SubElement(mex, "tag", name="error_message", value=message)
    return ET.tostring(mex)


def post_status_directly(mex_url: str, token: str, message: str, /, *, policy: HttpPolicy) -> bool:
    """POST ``FAILED`` with ``message`` straight to the MEX, for when no session could be opened."""
    with requests.Session() as session:
        session.mount("http://", BoundedAdapter(policy))
        session.mount("https://", BoundedAdapter(policy))
        try:
            response = session.post(mex_url, data=_mex_xml(mex_url, "FAILED", message), auth=MexAuth(token),
                                    headers={"Content-Type": "text/xml", "Accept": "text/xml"})
        except requests.RequestException as exc:
            logger.error("could not mark the MEX FAILED: %s", describe(exc))
            return False
    if response.status_code != 200:
        logger.error("could not mark the MEX FAILED: HTTP %d", response.status_code)
    return response.status_code == 200


class Mex:
    """The MEX of this run: status updates, and a finish or failure that is checked by reading it back.

    With ``bq.mex`` None (a run by hand) every update is only logged.
    """

    def __init__(self, bq: BQSession | None, /) -> None:
        self.bq = bq if bq is not None and bq.mex is not None else None
        self.url: str = self.bq.mex.uri if self.bq is not None else ""
        self._last_percent = -100

    def update(self, status: str, /) -> None:
        """Set the MEX status (free text while running); a failed update is logged, not fatal."""
        logger.info("status: %s", status)
        if self.bq is None:
            return
        try:
            self.bq.update_mex(status)
        except (BQCommError, requests.RequestException) as exc:
            logger.warning("MEX status update %r failed: %s", status, describe(exc))

    def progress(self, prefix: str, /, *, step: int = 10) -> Callable[[int, int], None]:
        """A ``(done, total)`` callback that posts ``"<prefix> n%"`` every ``step`` percent."""

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

    def finish(self, outputs: dict[str, Any], /) -> None:
        """Post FINISHED with the ``outputs`` tag (a bqapi tag dict) and check that it holds.

        Raises:
            BisqueError: the MEX does not read FINISHED afterwards.
        """
        if self.bq is None:
            return
        try:
            self.bq.finish_mex(tags=[outputs])  # never msg=: it appends to a shared default list
        except (BQCommError, requests.RequestException) as exc:
            raise BisqueError(f"finishing the MEX: {describe(exc)}") from exc
        status = self.status()
        if status != "FINISHED":
            raise BisqueError(f"finishing the MEX: it reads {status!r} afterwards, not 'FINISHED'")

    def fail(self, message: str, /) -> bool:
        """Post FAILED with ``message``; True when the MEX reads FAILED afterwards."""
        if self.bq is None:
            return False
        try:
            self.bq.fail_mex(message)
        except (BQCommError, requests.RequestException) as exc:
            logger.error("fail_mex: %s", describe(exc))
        if self.status() == "FAILED":
            return True
        try:
            response = self.bq.c.post(self.url, data=_mex_xml(self.url, "FAILED", message),
                                      headers={"Content-Type": "text/xml", "Accept": "text/xml"})
            logger.info("posted FAILED again: HTTP %d", response.status_code)
        except requests.RequestException as exc:
            logger.error("posting FAILED: %s", describe(exc))
        return self.status() == "FAILED"
