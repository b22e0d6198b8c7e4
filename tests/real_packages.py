"""The real TensorRT and onnxruntime-gpu wheels, for tests that run the engine's code against them on a CPU.

The wheels are installed apart from the test venv with ``pip install --target`` (``.ci/run`` does it), because
onnxruntime-gpu and onnxruntime share the ``onnxruntime`` import name, and the full ``tensorrt`` bindings
import only where ``libnvinfer`` is: the registry's ``tensorrt-cu12-libs`` is a placeholder. Tests therefore
run their code in a child Python whose path starts with that folder. For the full bindings the child first
loads stand-in shared libraries with the real sonames (``libnvinfer.so.<major>``, ...) whose factory
functions return nullptr, which is what the real library does where CUDA cannot start.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

__all__ = ["ORT_GPU_ENV", "TRT_ENV", "package_dirs", "run_child", "standin_libs"]

# pip --target folders (os.pathsep-separated, one per TensorRT version): tensorrt-cu12, its bindings, tensorrt-lean-cu12
TRT_ENV = "CELLSEG3D_TRT_WHEELS"
ORT_GPU_ENV = "CELLSEG3D_ORT_GPU_WHEEL"  # pip --target folders (os.pathsep-separated): onnxruntime-gpu, one per version
ROOT = Path(__file__).resolve().parents[1]

# Every symbol the 11.x bindings import from libnvinfer, libnvinfer_plugin and libnvonnxparser (nm -D -u).
_STANDIN_C = """
#include <stddef.h>
#include <stdint.h>
#include <stdbool.h>
void* createInferBuilder_INTERNAL(void* logger, int32_t version) { return NULL; }
void* createInferRuntime_INTERNAL(void* logger, int32_t version) { return NULL; }
void* createInferRefitter_INTERNAL(void* engine, void* logger, int32_t version) { return NULL; }
void* createNvOnnxParser_INTERNAL(void* network, void* logger, int32_t version) { return NULL; }
void* createNvOnnxParserRefitter_INTERNAL(void* refitter, void* logger, int32_t version) { return NULL; }
void* getBuilderPluginRegistry(int32_t capability) { return NULL; }
int32_t getNvOnnxParserVersion(void) { return 0; }
void* getPluginRegistry(void) { return NULL; }
bool initLibNvInferPlugins(void* logger, const char* ns) { return false; }
"""


def package_dirs(env: str, /) -> list[Path]:
    """The existing folders in ``env`` (``os.pathsep``-separated)."""
    return [Path(p) for p in os.environ.get(env, "").split(os.pathsep) if p and Path(p).is_dir()]


def _trt_major(folder: Path) -> int:
    for info in folder.glob("tensorrt_cu*_bindings-*.dist-info"):
        match = re.search(r"-(\d+)\.\d+", info.name)
        if match:
            return int(match[1])
    raise FileNotFoundError(f"{folder}: no tensorrt-cu*-bindings installed there")


def standin_libs(folder: Path, out: Path, /) -> list[Path]:
    """Compile the stand-in ``libnvinfer``, ``libnvinfer_plugin`` and ``libnvonnxparser`` for the bindings in ``folder``."""
    major = _trt_major(folder)
    out.mkdir(parents=True, exist_ok=True)
    source = out / "standin.c"
    source.write_text(_STANDIN_C)
    libs = []
    for name in ("nvinfer", "nvinfer_plugin", "nvonnxparser"):
        lib = out / f"lib{name}.so.{major}"
        if not lib.is_file():
            subprocess.run(["cc", "-shared", "-fPIC", "-o", str(lib), f"-Wl,-soname,{lib.name}", str(source)], check=True)
        libs.append(lib)
    return libs


def run_child(code: str, /, *, paths: list[Path], preload: list[Path] = (), timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a child Python with ``paths`` first on its path (then the repo and tests/), after
    loading ``preload`` libraries globally."""
    prelude = "import ctypes, os\n" + "".join(f"ctypes.CDLL({str(p)!r}, mode=os.RTLD_GLOBAL)\n" for p in preload)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*map(str, paths), str(ROOT), str(ROOT / "tests")])}
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT, check=False,
    )
