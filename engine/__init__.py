"""cellseg3d engine: 3D cell segmentation with a 3D UNet, tiled, batched, on the fastest backend present.

Quick use::

    from engine import load_bundle, segment_file
    result = segment_file("stack.tif", "labels.tif")      # the shipped default model
    print(result.report.summary())

See README.md for the CLI (``cellseg3d segment``) and DESIGN.md for the architecture.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

# torch backs its large CPU tensors with transparent huge pages when this is set before its first allocation:
# a forward pass then takes ~25x fewer page faults (162,558 -> 6,199 for a 32x64x128 patch) and 15-25% less
# time on this project's 2-core CPU (benchmarks/PERFORMANCE.md). The caller's own setting wins.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

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
