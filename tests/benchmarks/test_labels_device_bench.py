"""``python -m benchmarks.labels_device`` on a small stack on the CPU's torch: every row runs, and every torch
step (the device floods included) gives the numpy step's output on this tie-free map."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.labels_device import main


def test_labels_device_benchmark_rows_are_equal(tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    assert main(["--shape", "24,64,64", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["step"] for r in rows][-2:] == ["split of shared components", "whole window (from the float map)"]
    assert all(r["equal"] for r in rows)
