"""pytest-benchmark: every method on every requested size, one timed round each.

Run: ``pytest benchmarks/ --bench-sizes small --benchmark-json out.json`` then
``python -m benchmarks.report out.json``. Each benchmark's ``extra_info`` holds the full record (Dice vs
the fp32 reference, voxels/s, GFLOP/s, fraction of peak, stage timings).
"""

from __future__ import annotations

import os

import pytest

from benchmarks.cases import Case
from benchmarks.methods import Context, Method, run_method
from benchmarks.suite import machine_info


def test_method(benchmark, method: Method, size: str, bench_case: Case, bench_context: Context) -> None:
    record = benchmark.pedantic(run_method, args=(method, bench_case, bench_context), rounds=1, iterations=1)
    if "skipped" in record:
        pytest.skip(record["skipped"])
    record["loadavg"] = list(os.getloadavg())
    record["machine"] = machine_info(bench_context.device)
    benchmark.extra_info.update(record)
    assert record["seconds"] > 0 and record["net_voxels"] > 0
    if record.get("dice") is not None:
        assert 0.0 <= record["dice"] <= 1.0
