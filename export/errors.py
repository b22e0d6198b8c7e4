"""The exporter's one error class (input problems use the engine's ``InputError``/``BundleError``)."""

from __future__ import annotations

from engine.errors import CellSegError

__all__ = ["ExportError"]


class ExportError(CellSegError, RuntimeError):
    """An exported file failed its check (checker, accuracy against torch, TensorRT build); nothing was kept."""
