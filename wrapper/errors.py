"""The module's failure messages: one line, saying where and what, with no secret in it."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from .bisque_io import BisqueError
from .inputs import UsageError

__all__ = ["Terminated", "one_line"]


class Terminated(BaseException):
    """SIGTERM (``docker stop``): ends the whole run (every image of a dataset), reported like a failure."""


def one_line(exc: BaseException, stage: str, /, secrets: Sequence[str] = ()) -> str:
    """``stage: what went wrong`` on one line (BisQue errors already say where), secrets masked, at most 600
    characters (the MEX's ``error_message``)."""
    errors = sys.modules.get("engine.errors")  # not imported yet: cannot be an engine error (and spare torch)
    plain = (BisqueError, UsageError, Terminated) + ((errors.CellSegError,) if errors is not None else ())
    detail = str(exc) if isinstance(exc, plain) else f"{type(exc).__name__}: {exc}"
    text = " ".join((detail if isinstance(exc, BisqueError) else f"{stage}: {detail}").split())
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text[:600]
