"""The benchmark suite collects, and one tiny case runs through pytest-benchmark into a report.

The suite itself never runs in the normal test command (pytest.ini: ``testpaths = tests``); these tests
start it in a subprocess on the ``tiny`` size with one cheap method.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _pytest(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--timeout=300", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)


def test_normal_run_does_not_collect_the_suite() -> None:
    proc = _pytest("--collect-only", "-q", "tests/engine/test_postprocess.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ini = (ROOT / "pytest.ini").read_text()
    assert "testpaths = tests" in ini


def test_suite_collects() -> None:
    pytest.importorskip("pytest_benchmark")
    proc = _pytest("benchmarks", "--collect-only", "-q", "--bench-sizes", "tiny")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in ("engine-torch-cpu-fp32-tiny", "monai-fp32-tiny", "pytorch-3dunet-fp32-tiny", "original-loop-fp32-tiny", "model-torch-cpu-fp32-tiny"):
        assert name in proc.stdout, proc.stdout


def test_one_tiny_case_runs_and_reports(tmp_path: Path) -> None:
    pytest.importorskip("pytest_benchmark")
    out = tmp_path / "bench.json"
    proc = _pytest("benchmarks", "-q", "--bench-sizes", "tiny", "--bench-model", "reference", "-k", "original-loop",
                   f"--benchmark-json={out}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    from benchmarks.report import load_results, markdown

    doc = load_results(out)
    (record,) = doc["results"]
    assert record["method"] == "original-loop fp32" and record["size"] == "tiny"
    assert record["dice"] == pytest.approx(1.0)  # fp32, one chunk covers the tiny volume exactly as the reference
    assert record["voxels_per_s"] > 0 and record["gflops"] > 0 and 0 < record["peak_fraction"]
    table = markdown(doc)
    assert "| original-loop fp32 |" in table and "### tiny (16x48x48)" in table
    # every figure names the CPU features it depends on (a bf16 or AVX-512 host runs another speed)
    from benchmarks.suite import SPEED_FLAGS
    from engine.backends.torch_backend import cpu_flags

    flags = doc["machine"]["cpu_flags"]
    assert set(flags) == set((cpu_flags() or frozenset()) & SPEED_FLAGS)
    assert table.splitlines()[0].startswith("Machine: ") and ("flags: " + " ".join(flags)) in table.splitlines()[0]
