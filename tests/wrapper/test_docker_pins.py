"""The Docker image's pins agree on one CUDA major, checked without ``docker build``.

The Dockerfile is parsed for its base image and pins; pip resolves each pinned wheel's metadata for the image's
Python and platform (``pip install --dry-run --report --no-deps --only-binary=:all:``, metadata only, no
install) from the package registry; the check reads the CUDA and cuDNN each wheel depends on. It skips, with
the reason, only when the registry cannot be reached. What it cannot check: NVIDIA's own index (the TensorRT
libs wheels live there; PyPI has their placeholders) and the base image tag (no registry for images here).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
UBUNTU_PYTHON = {"ubuntu24.04": "3.12", "ubuntu22.04": "3.10"}  # the distributions' python3
PLATFORM = "manylinux_2_28_x86_64"  # glibc 2.39 (24.04) / 2.35 (22.04) run manylinux_2_28 wheels
_OFFLINE = re.compile(r"(Failed to establish a new connection|Network is unreachable|Temporary failure in name "
                      r"resolution|Name or service not known|Max retries exceeded|ConnectTimeout|timed out)")


def dockerfile_args(text: str, /) -> dict[str, str]:
    """``ARG NAME=value`` of a Dockerfile (quotes removed)."""
    return {m[1]: m[2].strip('"') for m in re.finditer(r"^ARG (\w+)=(\S+)\s*$", text, flags=re.MULTILINE)}


def image_facts(args: dict[str, str], /) -> tuple[tuple[int, int], str]:
    """``((CUDA major, minor), python version)`` of the base image ``nvidia/cuda:X.Y.Z-<flavour>-ubuntuNN.NN``."""
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-(?:base|runtime|cudnn-runtime)-(ubuntu\d+\.\d+)",
                         args["CUDA_BASE"])
    assert match, f"CUDA_BASE {args['CUDA_BASE']!r} is not an nvidia/cuda runtime or base image"
    return (int(match[1]), int(match[2])), UBUNTU_PYTHON[match[3]]


def resolve(specs: list[str], python: str, /) -> dict[str, dict[str, Any]]:
    """Each spec's wheel metadata (by lower-case name) for ``python`` on Linux x86_64, from the registry."""
    command = [sys.executable, "-m", "pip", "install", "--isolated", "--dry-run", "--ignore-installed", "--quiet",
               "--no-deps", "--only-binary=:all:", "--python-version", python, "--implementation", "cp",
               "--abi", f"cp{python.replace('.', '')}", "--platform", PLATFORM, "--timeout", "20", "--retries", "1",
               "--report", "-", *specs]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, check=False)
    if done.returncode != 0 and _OFFLINE.search(done.stderr):
        pytest.skip(f"the package registry cannot be reached: {_OFFLINE.search(done.stderr)[0]}")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    return {i["metadata"]["name"].lower().replace("_", "-"): i["metadata"] for i in report["install"]}


def _requirement(meta: dict[str, Any], pattern: str) -> list[tuple[str, str]]:
    """``(name, version spec)`` of the requirements whose name matches ``pattern`` (extras included)."""
    found = []
    for requirement in meta.get("requires_dist") or []:
        match = re.match(r"([A-Za-z0-9_.-]+)\s*([^;]*)", requirement)
        if match and re.fullmatch(pattern, match[1].lower()):
            found.append((match[1].lower(), match[2].strip()))
    return found


def cuda_problems(metas: dict[str, dict[str, Any]], cuda: tuple[int, int], /) -> list[str]:
    """Why the resolved torch / onnxruntime-gpu / TensorRT bindings do not all run on CUDA ``cuda`` (empty: they do)."""
    major = cuda[0]
    problems = []
    torch_rt = _requirement(metas["torch"], r"nvidia-cuda-runtime(-cu\d+)?")
    if not torch_rt or not re.fullmatch(rf"==\s*{major}\.{cuda[1]}\.\S+", torch_rt[0][1]) or \
            not torch_rt[0][0].endswith(f"-cu{major}"):
        problems.append(f"torch {metas['torch']['version']} needs {torch_rt or 'no CUDA runtime wheel'}, "
                        f"the image has CUDA {major}.{cuda[1]}")
    ort = metas["onnxruntime-gpu"]
    ort_rt = _requirement(ort, r"nvidia-cuda-runtime(-cu\d+)?")
    if not ort_rt or not re.fullmatch(rf"~=\s*{major}\.\d+", ort_rt[0][1]):
        problems.append(f"onnxruntime-gpu {ort['version']} is built for {ort_rt or 'an unknown CUDA'}, "
                        f"not CUDA {major}")
    cudnn = {spec.lstrip("=~ ").split(".")[0] for pkg in ("torch", "onnxruntime-gpu")
             for _, spec in _requirement(metas[pkg], r"nvidia-cudnn-cu\d+")}
    if len(cudnn) != 1:
        problems.append(f"torch and onnxruntime-gpu want different cuDNN majors: {sorted(cudnn)}")
    trt = [name for name in metas if re.fullmatch(r"tensorrt-cu\d+-bindings", name)]
    if trt != [f"tensorrt-cu{major}-bindings"]:
        problems.append(f"TensorRT bindings {trt} are not the CUDA {major} build")
    return problems


@pytest.fixture(scope="module")
def pins() -> dict[str, str]:
    return dockerfile_args((ROOT / "Dockerfile").read_text())


def test_dockerfile_pins_are_exact_and_on_one_tensorrt_version(pins: dict[str, str]) -> None:
    specs = {k: v for k, v in pins.items() if k.endswith("_SPEC")}
    assert set(specs) == {"TORCH_SPEC", "TENSORRT_SPEC", "TENSORRT_LIBS_SPEC", "TENSORRT_BINDINGS_SPEC", "ORT_SPEC"}
    assert all(re.fullmatch(r"[a-z0-9-]+==[0-9][0-9a-z.+]*", spec) for spec in specs.values()), specs
    (cuda_major, _), _ = image_facts(pins)
    trt = [pins[k] for k in ("TENSORRT_SPEC", "TENSORRT_LIBS_SPEC", "TENSORRT_BINDINGS_SPEC")]
    assert len({spec.split("==")[1] for spec in trt}) == 1, trt
    assert all(spec.startswith(f"tensorrt-cu{cuda_major}") for spec in trt), trt


def test_pins_resolve_to_wheels_of_one_cuda_major_for_the_image(pins: dict[str, str]) -> None:
    cuda, python = image_facts(pins)
    assert python == "3.12"  # bqapi imports cgi: Python <= 3.12
    specs = [pins["TORCH_SPEC"], pins["ORT_SPEC"], pins["TENSORRT_BINDINGS_SPEC"]]
    metas = resolve(specs, python)
    assert {name: meta["version"] for name, meta in metas.items()} == dict(s.split("==") for s in specs)
    assert cuda_problems(metas, cuda) == []


def test_the_check_catches_an_unpinned_onnxruntime_gpu(pins: dict[str, str]) -> None:
    """The old ``onnxruntime-gpu>=1.20`` resolves to a CUDA 13 build on this CUDA 12 image: the check says so."""
    cuda, python = image_facts(pins)
    metas = resolve([pins["TORCH_SPEC"], "onnxruntime-gpu>=1.20", pins["TENSORRT_BINDINGS_SPEC"]], python)
    problems = cuda_problems(metas, cuda)
    assert any(p.startswith(f"onnxruntime-gpu {metas['onnxruntime-gpu']['version']} is built for") for p in problems), \
        problems


def test_runtime_stage_is_lean_and_declares_no_volume() -> None:
    """No anonymous VOLUME (one per run, kept by nobody); the cache path is an environment variable; the
    runtime stage gets the venv and the module folder, no build or export tools."""
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM (\S+) AS (\S+)$", text, flags=re.MULTILINE)
    assert [name for _, name in stages] == ["python", "build", "runtime"]
    assert not re.search(r"^VOLUME\b", text, flags=re.MULTILINE)
    assert "CELLSEG3D_ENGINES=/cache/engines" in text
    runtime = text.split("AS runtime", 1)[1]
    assert "WORKDIR /module" in runtime and "wrapper/PythonScriptWrapper.py" in runtime
    assert not re.search(r"pip install|onnxconverter|apt-get install", runtime)
    assert "sys.version_info[:2] <= (3, 12)" in text and "engine.cli export" in text and '".[bisque]"' in text
    allowed = {line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")}
    for sources in re.findall(r"^COPY (?!--from)(.+) \S+$", text, flags=re.MULTILINE):
        for source in sources.split():
            assert (ROOT / source).exists(), source
            assert source.split("/")[0].rstrip("/") in allowed, f"{source} is not in .dockerignore's allowlist"
