"""Backend registry and selection.

``select_backend('auto')`` walks :data:`BACKEND_ORDER`, importing each backend lazily (a missing runtime
costs only its own backend) and logging why each one it passes over cannot run; a backend whose constructor
finds the bundle unusable for it (a stale ONNX, a corrupt plan) is skipped with a warning too. An explicit
choice that cannot run raises with the reason; it is never silently replaced.
"""

from __future__ import annotations

import importlib
import logging

from ..backend_names import BACKEND_CHOICES, BACKEND_MODULES, BACKEND_ORDER
from ..bundle import Bundle
from ..errors import BackendUnavailableError, BundleError
from .base import Backend, BackendOptions

__all__ = ["BACKEND_CHOICES", "BACKEND_ORDER", "Backend", "BackendOptions", "backend_class", "backend_status", "select_backend"]

logger = logging.getLogger(__name__)

_REGISTRY = BACKEND_MODULES  # name -> (module, class), see engine.backend_names


def backend_class(name: str, /) -> type[Backend]:
    """The class registered as ``name``; its module is imported now.

    Raises:
        BackendUnavailableError: unknown name, or its module cannot be imported (the message says which).
    """
    if name not in _REGISTRY:
        raise BackendUnavailableError(f"unknown backend {name!r}; choose from {', '.join(BACKEND_CHOICES)}")
    module_name, class_name = _REGISTRY[name]
    try:
        module = importlib.import_module(f"{__name__}.{module_name}")
    except ImportError as exc:
        raise BackendUnavailableError(f"backend {name}: {exc}") from exc
    cls: type[Backend] = getattr(module, class_name)
    return cls


def backend_status() -> dict[str, str | None]:
    """For each backend in order, None when it can run here, else the reason it cannot."""
    status: dict[str, str | None] = {}
    for name in BACKEND_ORDER:
        try:
            status[name] = backend_class(name).unavailable_reason()
        except BackendUnavailableError as exc:
            status[name] = str(exc)
    return status


def select_backend(name: str, bundle: Bundle, /, *, options: BackendOptions | None = None) -> Backend:
    """Construct backend ``name`` (or the first available one for ``auto``) for ``bundle``.

    Raises:
        BackendUnavailableError: ``name`` is unknown or cannot run here; for ``auto``, none can.
    """
    options = options or BackendOptions()
    candidates = BACKEND_ORDER if name == "auto" else (name,)
    reasons = []
    for candidate in candidates:
        try:
            cls = backend_class(candidate)
            reason = cls.unavailable_reason()
        except BackendUnavailableError as exc:
            reason = str(exc)
        if reason is None:
            try:
                return cls(bundle, options=options)
            except (BackendUnavailableError, BundleError) as exc:  # not exported, stale ONNX, corrupt plan, CPU session
                if name != "auto":
                    raise
                logger.warning("backend %s skipped: %s", candidate, exc)
                reasons.append(f"{candidate}: {exc}")
                continue
        if name != "auto":
            raise BackendUnavailableError(f"backend {candidate} cannot run here: {reason}")
        logger.info("backend %s skipped: %s", candidate, reason)
        reasons.append(f"{candidate}: {reason}")
    raise BackendUnavailableError("no backend can run here: " + "; ".join(reasons))
