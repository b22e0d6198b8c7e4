"""Benchmarks: this engine against its peers on the same model, volume and machine.

What is timed (see ``benchmarks.methods``): the engine end to end (TIFF in -> labels out) on every backend
and precision that can run here, the network alone per backend, and the peers -- MONAI
``sliding_window_inference`` (gaussian blending, overlap 0.25, ``sw_batch_size`` 4), pytorch-3dunet's
predictor settings (patch + halo, averaging) and the original module's loop (16-slice z chunks, no
overlap). Every run records its foreground Dice against the fp32 reference, voxels/s, the network's
GFLOP/s and the fraction of the machine's peak measured in the same run (``benchmarks.measure``).

Entry points:

- ``cellseg3d bench [--gpu] [--sizes small,medium,large] [--out DIR]``: runs the suite in one process and
  writes ``results.json``, ``results.md`` and ``results.png`` (``benchmarks.cli``).
- ``pytest benchmarks/ --benchmark-json=out.json``: the same cases through pytest-benchmark
  (``benchmarks/test_bench_*.py``); ``python -m benchmarks.report out.json`` turns either JSON into the
  table and plot.
- ``python benchmarks/gpu_host.py OUT_DIR``: the self-contained GPU-host run (``benchmarks.gpu_host``).

Peers are optional (``pip install -e .[bench]``, and ``pip install --no-deps monai``); a peer that is not
installed is skipped with the reason in the table.
"""

from __future__ import annotations

__all__: list[str] = []
