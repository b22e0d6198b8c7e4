"""cellseg3d engine: 3D cell segmentation with a 3D UNet, tiled, batched, on the fastest backend present.

Quick use::

    from engine import load_bundle, segment_file
    result = segment_file("stack.tif", "labels.tif")      # the shipped default model
    print(result.report.summary())

See README.md for the CLI (``cellseg3d segment``) and DESIGN.md for the architecture.
"""

from __future__ import annotations

from .backends import Backend, BackendOptions, select_backend
from .bundle import Bundle, load_bundle
from .errors import BackendUnavailableError, BundleError, CellSegError, InputError
from .pipeline import RunReport, SegmentOptions, SegmentResult, segment, segment_file

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
