"""Benchmark JSON -> markdown table + matplotlib PNG (voxels/s per method and size).

Reads either the suite's ``results.json`` (``cellseg3d bench``, ``benchmarks/gpu_host.py``) or a
pytest-benchmark ``--benchmark-json`` file written by ``benchmarks/test_bench_*.py`` (whose records sit in
each benchmark's ``extra_info``). ``python -m benchmarks.report RESULTS.json [--out DIR]`` writes
``results.md`` and ``results.png`` beside it (or into ``DIR``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["load_results", "markdown", "plot", "write_report", "main"]

BASELINE = "monai fp32"


def load_results(path: Path, /) -> dict[str, Any]:
    """The suite document in ``path``; a pytest-benchmark JSON is converted to the same shape.

    Raises:
        ValueError: the file is neither format (the message names it).
    """
    doc = json.loads(Path(path).read_text())
    if isinstance(doc, dict) and "results" in doc:
        return doc
    if isinstance(doc, dict) and "benchmarks" in doc:
        results = []
        for bench in doc["benchmarks"]:
            info = dict(bench.get("extra_info") or {})
            if "method" not in info:
                continue
            info.setdefault("seconds", bench["stats"]["min"])
            results.append(info)
        machine = {**doc.get("machine_info", {}), **(doc["benchmarks"][0].get("extra_info", {}).get("machine", {}) if doc["benchmarks"] else {})}
        return {"machine": machine, "results": results, "cases": [], "notes": ["from pytest-benchmark"]}
    raise ValueError(f"{path}: neither a 'cellseg3d bench' results.json nor a pytest-benchmark JSON")


def _fmt(value: Any, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


def _speedups(results: list[dict[str, Any]]) -> dict[tuple[str, str], float]:
    base = {r["size"]: r["seconds"] for r in results if r.get("method") == BASELINE and "skipped" not in r}
    out = {}
    for r in results:
        if "skipped" not in r and r.get("kind") != "model" and r.get("size") in base:
            out[(r["size"], r["method"])] = base[r["size"]] / r["seconds"]
    return out


def _machine_line(doc: dict[str, Any]) -> str:
    m = doc.get("machine", {})
    cores = f"{m.get('cores_available', '?')} cores"
    if m.get("cpu_flags") is not None:  # runs recorded before the flags were: none shown
        cores += "; flags: " + (" ".join(m["cpu_flags"]) or "none of the vector and bf16 ones")
    parts = [str(m.get("gpu") or ""), f"{m.get('cpu', '?')} ({cores})", f"torch {m.get('torch', '?')}"]
    load = m.get("loadavg_start")
    if load:
        parts.append(f"load avg at start {load[0]:.2f}" + (f", at end {m['loadavg_end'][0]:.2f}" if m.get("loadavg_end") else ""))
    return "; ".join(p for p in parts if p)


def markdown(doc: dict[str, Any], /) -> str:
    """The results as markdown: a header with the machine and model, then one table per size."""
    results = doc.get("results", [])
    speed = _speedups(results)
    lines = [f"Machine: {_machine_line(doc)}  "]
    if doc.get("bundle"):
        b = doc["bundle"]
        lines.append(f"Model: {b.get('origin')}; bundle patch {'x'.join(map(str, b.get('patch_shape', [])))}, overlap {b.get('overlap')}; "
                     f"peers' patch {'x'.join(map(str, doc.get('peer_patch', [])))}  ")
    if doc.get("flops_per_voxel"):
        peaks = ", ".join(f"{k} {v:.0f}" for k, v in doc.get("peak_gflops", {}).items())
        lines.append(f"Network: {doc['flops_per_voxel'] / 1e3:.1f} kFLOP per voxel; machine peak (large matmul, same run) GFLOP/s: {peaks}  ")
    for note in doc.get("notes", []):
        lines.append(f"Note: {note}  ")
    sizes = list(dict.fromkeys(r["size"] for r in results))
    cases = {c["size"]: c for c in doc.get("cases", [])}
    header = ("| method | s | Mvox/s | x MONAI fp32 | net voxels / stack | GFLOP/s | % of peak | Dice vs fp32 ref | cells "
              "| F1 vs truth | patch | stages (s) |")
    for size in sizes:
        rows = [r for r in results if r["size"] == size]
        shape = "x".join(map(str, rows[0].get("shape", [])))
        lines += ["", f"### {size} ({shape})", ""]
        if size in cases:
            c = cases[size]
            f1 = f", F1 vs truth {c['reference_f1_truth']:.3f}" if c.get("reference_f1_truth") is not None else ""
            lines += [f"Reference: {c.get('reference')} ({c.get('reference_seconds', 0):.1f} s, {c.get('reference_cells', '?')} cells{f1}).", ""]
        lines += [header, "|" + "---|" * (header.count("|") - 1)]
        for r in rows:
            if "skipped" in r:
                lines.append(f"| {r['method']} | skipped: {str(r['skipped']).replace('|', '/')[:160]} |" + " |" * 10)
                continue
            stages = " ".join(f"{k} {v:.2f}" for k, v in (r.get("timings") or {}).items())
            if r.get("rounds_seconds"):
                stages += " (rounds: " + ", ".join(f"{v:.1f}" for v in r["rounds_seconds"] if v is not None) + ")"
            pct = _fmt(r.get("peak_fraction"), ".0f", 100.0)
            lines.append(
                f"| {r['method']} | {r['seconds']:.2f} | {r['voxels_per_s'] / 1e6:.2f} | {_fmt(speed.get((size, r['method'])), '.1f')} "
                f"| {_fmt(r.get('overlap_factor'), '.2f')} | {_fmt(r.get('gflops'), '.0f')} | {pct} | {_fmt(r.get('dice'), '.4f')} "
                f"| {r.get('n_cells', '-')} | {_fmt(r.get('f1_truth'), '.3f')} | {'x'.join(map(str, r.get('patch') or [])) or '-'} | {stages} |"
            )
    lines += ["", "Rows: `engine` = TIFF in -> labels TIFF out through this engine; `model` = the network alone on one batch "
              "(voxels/s of network input); peers get the engine's reading, normalization, post-processing and writing around "
              "their own inference. `net voxels / stack` = voxels pushed through the network / voxels in the stack (overlap cost). "
              "Dice = foreground mask (interior > threshold) vs the fp32 reference; F1 vs truth = cells matched at IoU > 0.5 "
              "against the synthetic volume's ground truth (meaningful for a trained model only)."]
    return "\n".join(lines) + "\n"


def plot(doc: dict[str, Any], path: Path, /) -> Path:
    """Horizontal bars of voxels/s (log scale) per method, one panel per size; written to ``path`` (PNG).

    Colours: this engine end to end, the network alone, the peers.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [r for r in doc.get("results", []) if "skipped" not in r]
    sizes = list(dict.fromkeys(r["size"] for r in results))
    colours = {"engine": "tab:blue", "model": "tab:gray", "peer": "tab:orange"}
    rows = max((sum(1 for r in results if r["size"] == s) for s in sizes), default=1)
    fig, axes = plt.subplots(len(sizes) or 1, 1, figsize=(8.0, 1.0 + 0.32 * rows * max(1, len(sizes))), squeeze=False)
    for ax, size in zip(axes[:, 0], sizes):
        mine = [r for r in results if r["size"] == size][::-1]
        ax.barh([r["method"] for r in mine], [r["voxels_per_s"] / 1e6 for r in mine],
                color=[colours.get(r.get("kind", "peer"), "tab:orange") for r in mine])
        for i, r in enumerate(mine):
            ax.text(r["voxels_per_s"] / 1e6, i, f" {r['seconds']:.1f} s", va="center", fontsize=7)
        ax.set_xscale("log")
        ax.set_title(f"{size} {'x'.join(map(str, mine[0]['shape']))}", fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
    axes[-1, 0].set_xlabel("Mvoxel/s (log; blue: this engine end to end, grey: network alone, orange: peers end to end)", fontsize=8)
    fig.suptitle(_machine_line(doc)[:120], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(doc: dict[str, Any], out_dir: Path, /) -> list[Path]:
    """Write ``results.md`` and (when matplotlib is installed) ``results.png`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / "results.md"
    md.write_text(markdown(doc))
    written = [md]
    try:
        written.append(plot(doc, out_dir / "results.png"))
    except ImportError:
        (out_dir / "results.png.txt").write_text("matplotlib is not installed; pip install -e .[bench]\n")
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.report RESULTS.json [--out DIR]``."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="results.json or a pytest-benchmark JSON")
    parser.add_argument("--out", type=Path, default=None, help="folder for results.md/png (default: beside the JSON)")
    args = parser.parse_args(argv)
    try:
        doc = load_results(args.results)
    except (OSError, ValueError) as exc:
        print(f"benchmarks.report: error: {exc}", file=sys.stderr)
        return 2
    for path in write_report(doc, args.out or args.results.parent):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
