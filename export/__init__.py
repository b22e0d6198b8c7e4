"""cellseg3d export: build-time conversion of a bundle's model for fast inference (DESIGN.md, issue 4).

``cellseg3d export BUNDLE|CHECKPOINT`` (``export/cli.py``) runs :func:`export.bundle_export.export_bundle`:

1. ``model.onnx`` (``onnx_export.py``): fp32, dynamic batch and spatial axes, one file, ``onnx.checker``
   full check, ONNX Runtime CPU within 1e-4 of torch on random and sample input;
2. ``model.fp16.onnx`` (``fp16.py``): fp16 with normalization and fp32 I/O kept, gated against torch fp32
   (``gate.py``: foreground Dice >= 0.99, max probability error reported);
3. a TensorRT plan (``tensorrt_build.py``) where TensorRT and a GPU are present, gated the same way.

Results are recorded in ``bundle.json``'s ``export`` section. The ``engine`` package never imports this one.
"""

from __future__ import annotations

__all__: list[str] = []
