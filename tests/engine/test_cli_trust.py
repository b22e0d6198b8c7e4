"""What users trust the command line for: bad inputs and values give one line naming the file and exit 2
with nothing written and the input unchanged; signals remove temporaries and exit 128 + n; the start
checks the input before torch is imported; many stacks run with one model load and skip a failing one."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tifffile

from engine.cli import main

REPO = Path(__file__).resolve().parents[2]


def _stack(path: Path, data: np.ndarray | None = None, **kw: object) -> Path:
    rng = np.random.default_rng(0)
    tifffile.imwrite(path, (rng.random((12, 32, 32)) * 1000).astype(np.uint16) if data is None else data, **kw)
    return path


def _truncated(d: Path) -> Path:
    full = _stack(d / "full.tif", imagej=True, metadata={"axes": "ZYX"})
    data = full.read_bytes()
    full.unlink()
    (d / "in.tif").write_bytes(data[: len(data) // 2])
    return d / "in.tif"


def _malicious_bundle(d: Path, tiny: Path) -> None:
    import torch

    class Payload:
        def __reduce__(self):  # noqa: ANN204 - what an attacker's checkpoint does on unpickling
            return (os.system, ("echo pwned",))

    shutil.copytree(tiny, d / "bundle")
    torch.save({"w": Payload()}, d / "bundle" / "model.pt")


def _nan(d: Path) -> Path:
    data = np.ones((12, 32, 32), np.float32)
    data[3, 3, 3] = np.nan
    return _stack(d / "in.tif", data)


# (id, make the input in folder d -> input path, extra arguments, words the one line must hold)
CASES: list[tuple[str, Callable[[Path], Path], list[str], tuple[str, ...]]] = [
    ("missing", lambda d: d / "in.tif", [], ("in.tif", "no such file")),
    ("folder without TIFFs", lambda d: (d / "in.tif").mkdir() or d / "in.tif", [], ("in.tif", "folder")),
    ("not a TIFF", lambda d: (d / "in.tif").write_bytes(b"\x93NUMPY" + bytes(100)) and d / "in.tif", [], ("in.tif", "not a readable TIFF")),
    ("truncated", _truncated, [], ("in.tif", "truncated")),
    ("2D", lambda d: _stack(d / "in.tif", np.ones((32, 32), np.uint16)), [], ("in.tif", "2D")),
    ("NaN", _nan, [], ("in.tif", "NaN")),
    ("constant", lambda d: _stack(d / "in.tif", np.full((12, 32, 32), 7, np.uint16)), [], ("in.tif", "constant")),
    ("channel out of range", lambda d: _stack(d / "in.tif"), ["--channel", "3"], ("in.tif", "channel 3")),
    ("output is the input", lambda d: _stack(d / "in.tif"), ["-o", "{d}/in.tif"], ("in.tif", "is the input")),
    ("prob onto labels", lambda d: _stack(d / "in.tif"), ["--prob", "{d}/out/l.tif"], ("l.tif", "also the output")),
    ("table onto labels", lambda d: _stack(d / "in.tif"), ["--table", "{d}/out/l.tif"], ("l.tif", "also the output")),
    ("output folder missing", lambda d: _stack(d / "in.tif"), ["-o", "{d}/nowhere/l.tif"], ("nowhere", "does not exist")),
    ("prob is a folder", lambda d: _stack(d / "in.tif"), ["--prob", "{d}/out"], ("out", "is a folder")),
    ("malicious checkpoint", lambda d: _stack(d / "in.tif"), ["--bundle", "{d}/bundle", "--backend", "torch-cpu"], ("model.pt", "refused by the safe loader")),
    ("batch 0", lambda d: _stack(d / "in.tif"), ["--batch", "0"], ("--batch", ">= 1")),
    ("threads 0", lambda d: _stack(d / "in.tif"), ["--threads", "0"], ("--threads", ">= 1")),
    ("slab depth 0", lambda d: _stack(d / "in.tif"), ["--slab-depth", "0"], ("--slab-depth",)),
    ("overlap 1", lambda d: _stack(d / "in.tif"), ["--overlap", "1"], ("--overlap", "< 1")),
    ("threshold 1.5", lambda d: _stack(d / "in.tif"), ["--threshold", "1.5"], ("--threshold",)),
    ("negative diameter", lambda d: _stack(d / "in.tif"), ["--cell-diameter", "-3"], ("--cell-diameter",)),
    ("unknown option", lambda d: _stack(d / "in.tif"), ["--fast"], ("unrecognized arguments: --fast",)),
]


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(("make", "extra", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_one_line_exit_2_nothing_written(make, extra, words, tiny_bundle, tmp_path: Path, capsys) -> None:
    (tmp_path / "out").mkdir()
    if "{d}/bundle" in extra:
        _malicious_bundle(tmp_path, tiny_bundle.path)
    source = make(tmp_path)
    before = _digest(tmp_path)
    args = [a.replace("{d}", str(tmp_path)) for a in extra]
    if "-o" not in args:
        args += ["-o", str(tmp_path / "out" / "l.tif")]
    if "--bundle" not in args:
        args += ["--bundle", str(tiny_bundle.path)]
    assert main(["segment", str(source), *args, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(("cellseg3d segment: error:", "cellseg3d: error:")), err
    assert all(w in err for w in words), err
    assert "weights_only=False" not in err
    assert _digest(tmp_path) == before  # nothing written, the input untouched


def test_extra_series_is_warned_about(tiny_bundle, tmp_path: Path, caplog) -> None:
    src = tmp_path / "two.tif"
    with tifffile.TiffWriter(src) as tif:
        tif.write(np.random.default_rng(1).integers(0, 999, (12, 32, 32), dtype=np.uint16))
        tif.write(np.zeros((4, 8, 8), np.uint16), photometric="minisblack")
    assert main(["segment", str(src), "-o", str(tmp_path / "l.tif"), "--bundle", str(tiny_bundle.path), "--no-progress"]) == 0
    assert any("2 image series" in r.getMessage() for r in caplog.records)


def test_usage_error_is_one_line_and_imports_no_torch(tmp_path: Path) -> None:
    code = (
        "import sys\nfrom engine.cli import main\n"
        f"rc = main(['segment', {str(tmp_path / 'missing.tif')!r}, '-o', {str(tmp_path / 'l.tif')!r}])\n"
        "assert 'torch' not in sys.modules, 'torch imported before the input was checked'\nsys.exit(rc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "no such file" in proc.stderr, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "engine.cli", "segment"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "required" in proc.stderr, proc.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_removes_temporaries_one_line(signum: int, tmp_path: Path) -> None:
    src = tmp_path / "s.tif"
    assert main(["sample", str(src), "--shape", "48,160,160", "--seed", "2"]) == 0
    out = tmp_path / "out"
    out.mkdir()
    # a shell's background job ignores SIGINT and Python keeps an inherited ignore: the child starts with the
    # default disposition, as a terminal's foreground job does
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "segment", str(src), "-o", str(out / "l.tif"), "--prob", str(out / "p.tif"), "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 300
    while not list(out.glob(".*.tmp")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # wait for the run to have a temporary output open
    assert proc.poll() is None, f"the run ended before it could be interrupted: {proc.communicate()}"
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum
    assert err.strip().splitlines() == [f"cellseg3d segment: interrupted by {signal.Signals(signum).name}; unfinished outputs removed"]
    assert list(out.iterdir()) == []


def test_many_stacks_one_load_failing_one_skipped(tiny_bundle, tmp_path: Path, capsys) -> None:
    stacks = tmp_path / "stacks"
    stacks.mkdir()
    for name in ("a", "b"):
        _stack(stacks / f"{name}.tif")
    _stack(stacks / "c.tif", np.full((12, 32, 32), 5, np.uint16))  # constant: fails, is skipped
    out = tmp_path / "out"
    args = ["segment", str(stacks), "-o", f"{out}/", "--table", str(tmp_path / "tables"), "--report", str(tmp_path / "reports"),
            "--bundle", str(tiny_bundle.path), "--no-progress"]
    assert main(args) == 1
    captured = capsys.readouterr()
    assert sorted(p.name for p in out.iterdir()) == ["a_labels.tif", "b_labels.tif"]
    assert captured.out.count("cells | backend=") == 2
    assert "c.tif" in captured.err and "1 of 3 stacks failed" in captured.err
    report = json.loads((tmp_path / "reports" / "a_report.json").read_text())
    assert report["input"] == str(stacks / "a.tif") and report["backend"] == "torch-cpu" and "torch" in report["versions"]
    rows = (tmp_path / "tables" / "b_cells.csv").read_text().splitlines()
    n_cells = json.loads((tmp_path / "reports" / "b_report.json").read_text())["n_cells"]
    assert rows[0].startswith("id,volume_voxels") and len(rows) == 1 + n_cells


def test_many_stacks_by_glob_and_names_that_collide(tiny_bundle, tmp_path: Path, capsys) -> None:
    for name in ("x1", "x2"):
        _stack(tmp_path / f"{name}.tif")
    out = tmp_path / "out"
    assert main(["segment", str(tmp_path / "x*.tif"), "-o", f"{out}/", "--bundle", str(tiny_bundle.path), "--no-progress"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["x1_labels.tif", "x2_labels.tif"]
    (tmp_path / "sub").mkdir()
    _stack(tmp_path / "sub" / "x1.tif")
    assert main(["segment", str(tmp_path / "x1.tif"), str(tmp_path / "sub" / "x1.tif"), "-o", str(out)]) == 2
    assert "same name" in capsys.readouterr().err
