"""cellseg3d engine: 3D cell segmentation with a 3D UNet, tiled, batched, on the fastest backend present.

Quick use::

    from engine import load_bundle, segment_file
    result = segment_file("stack.tif", "labels.tif")      # the shipped default model
    print(result.report.summary())

See README.md for the CLI (``cellseg3d segment``) and DESIGN.md for the architecture.
"""

from __future__ import annotations

import importlib
from typing import Any

# exported name -> module: imported on first use, so ``engine.cli`` can check its arguments and open the
# input before torch is loaded (PEP 562)
_EXPORTS = {
    "segment": "pipeline", "segment_file": "pipeline", "SegmentOptions": "pipeline", "SegmentResult": "pipeline",
    "RunReport": "pipeline", "load_bundle": "bundle", "Bundle": "bundle", "select_backend": "backends",
    "Backend": "backends", "BackendOptions": "backends", "CellSegError": "errors", "InputError": "errors",
    "BundleError": "errors", "BackendUnavailableError": "errors",
}

__all__ = [
    "segment",
    "segment_file",
    "load_bundle",
    "select_backend",
    "Backend",
    "BackendOptions",
    "Bundle",
    "SegmentOptions",
    "SegmentResult",
    "RunReport",
    "CellSegError",
    "InputError",
    "BundleError",
    "BackendUnavailableError",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
