"""The engine's exception hierarchy: one base class, subclasses that are also builtins.

Messages name the file or value at fault and, where there is one, the fix.
"""

from __future__ import annotations

__all__ = [
    "CellSegError",
    "InputError",
    "BundleError",
    "BackendUnavailableError",
]


class CellSegError(Exception):
    """Base class of every error the engine raises on purpose."""


class InputError(CellSegError, ValueError):
    """The input image (file or array) cannot be segmented as given."""


class BundleError(CellSegError, ValueError):
    """A model bundle or checkpoint is missing, malformed or does not match its architecture."""


class BackendUnavailableError(CellSegError, RuntimeError):
    """An explicitly requested backend cannot run on this machine; the message says why."""
