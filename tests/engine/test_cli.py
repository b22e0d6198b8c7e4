"""The CLI: exit codes, one-line errors, the summary line, bundle making."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import tifffile

from engine.cli import main


def test_segment_prints_summary(tiny_bundle, blob_tiff: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "l.tif"
    assert main(["segment", str(blob_tiff), "-o", str(out), "--bundle", str(tiny_bundle.path), "--patch", "8,16,16", "--batch", "2"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{out}: ") and "backend=torch-cpu" in line and "patch=8x16x16 batch=2" in line
    assert tifffile.imread(out).shape == (20, 40, 44)


def test_tta_flag_reaches_the_run(tiny_bundle, blob_tiff: Path, tmp_path: Path, capsys) -> None:
    args = ["segment", str(blob_tiff), "-o", str(tmp_path / "l.tif"), "--bundle", str(tiny_bundle.path), "--patch", "8,16,16"]
    assert main([*args, "--tta"]) == 0
    assert "tta=flips8" in capsys.readouterr().out
    assert main(args) == 0
    assert "tta=" not in capsys.readouterr().out


def test_input_error_is_one_line_exit_2(tiny_bundle, tmp_path: Path, capsys) -> None:
    src = tmp_path / "flat.tif"
    tifffile.imwrite(src, np.zeros((10, 10), np.uint8))
    assert main(["segment", str(src), "-o", str(tmp_path / "o.tif"), "--bundle", str(tiny_bundle.path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "2D image" in err and err.startswith("cellseg3d segment: error:")
    assert not (tmp_path / "o.tif").exists()


def test_missing_bundle_exit_2(tmp_path: Path, blob_tiff: Path, capsys) -> None:
    assert main(["segment", str(blob_tiff), "-o", str(tmp_path / "o.tif"), "--bundle", str(tmp_path)]) == 2
    assert "no bundle.json" in capsys.readouterr().err


def test_bad_flag_exit_2(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "engine.cli", "segment", "x.tif", "-o", "y.tif", "--patch", "1,2"], capture_output=True, text=True)
    assert proc.returncode == 2 and "expected 3 positive integers" in proc.stderr


def test_info_lists_backends(tiny_bundle, capsys) -> None:
    assert main(["info", "--bundle", str(tiny_bundle.path)]) == 0
    out = capsys.readouterr().out
    assert "torch-cpu    available" in out and "torch-cuda" in out


def test_bundle_random_then_segment(tmp_path: Path, blob_tiff: Path, capsys) -> None:
    target = tmp_path / "rb"
    args = ["bundle", "--random", "-o", str(target), "--arch-kwargs", '{"in_channels": 1, "out_channels": 1, "f_maps": 8, "num_levels": 2}', "--patch", "8,16,16"]
    assert main(args) == 0
    assert (target / "bundle.json").is_file() and (target / "model.pt").is_file()
    assert main(["segment", str(blob_tiff), "-o", str(tmp_path / "o.tif"), "--bundle", str(target)]) == 0
    assert main(["bundle", "-o", str(tmp_path / "x")]) == 2


def test_sample_then_score(tmp_path: Path, capsys) -> None:
    image = tmp_path / "s.tif"
    assert main(["sample", str(image), "--shape", "16,48,48", "--seed", "3"]) == 0
    truth = tmp_path / "s_labels.tif"
    assert tifffile.imread(image).shape == (16, 48, 48)
    assert main(["score", str(truth), str(truth)]) == 0
    assert "F1@0.5=1.000" in capsys.readouterr().out
    assert main(["sample", str(tmp_path / "s.png")]) == 2
    assert main(["score", str(truth), str(image), "--iou", "0.5"]) == 0


def test_voxel_size_and_cell_diameter_rescale(tiny_bundle, blob_tiff: Path, tmp_path: Path, capsys) -> None:
    import dataclasses
    import shutil

    from engine.bundle import load_bundle, write_bundle_json

    folder = tmp_path / "scaled_bundle"
    shutil.copytree(tiny_bundle.path, folder)
    write_bundle_json(dataclasses.replace(load_bundle(folder), cell_diameter_voxels=(9.0, 24.0)))
    out = tmp_path / "l.tif"
    args = ["segment", str(blob_tiff), "-o", str(out), "--bundle", str(folder), "--voxel-size", "3,1,1", "--cell-diameter", "12"]
    assert main(args) == 0
    line = capsys.readouterr().out.strip()
    assert "scale=z3.00,y1.00,x1.00 (cells 4x12x12 vox, cell diameter option + voxel size)" in line
    assert tifffile.imread(out).shape == (20, 40, 44)
    assert main([*args[:4], "--bundle", str(folder), "--rescale", "off"]) == 0
    assert "scale=none (rescaling off)" in capsys.readouterr().out


def test_bad_voxel_size_exit_2() -> None:
    proc = subprocess.run([sys.executable, "-m", "engine.cli", "segment", "x.tif", "-o", "y.tif", "--voxel-size", "0,1,1"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "expected 3 positive numbers Z,Y,X in µm" in proc.stderr
