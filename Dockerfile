# syntax=docker/dockerfile:1
#
# CellSegment3DUnet BisQue module image.
#
#   docker build -t cellsegment3dunet:2.0 .
#
# One CUDA major for every CUDA component, pinned (tests/wrapper/test_docker_pins.py resolves these pins
# against the package registry for this Python and platform and checks they agree, without docker):
#   base image   nvidia/cuda 12.8 "base" (driver hookup and cudart only; the CUDA libraries come as wheels)
#   torch        2.10.0 from PyPI: its Linux wheel is built for CUDA 12.8 (nvidia-*-cu12 wheels, cuDNN 9)
#   TensorRT     10.16.1.11 for CUDA 12 (tensorrt-cu12, -libs, -bindings; the libs wheels are on NVIDIA's index)
#   ONNX Runtime onnxruntime-gpu 1.26.0, built for CUDA 12 and cuDNN 9 (1.27 and later: CUDA 13)
# The wheels' library folders are registered with ldconfig, so TensorRT and ONNX Runtime find cuBLAS/cuDNN
# whatever was imported first.
#
# Stage "build" installs the project into /opt/venv and runs `cellseg3d export` on the shipped model:
# model.onnx + model.fp16.onnx (each checked against torch), plus the TensorRT plan when the build host
# exposes a GPU. `docker build` normally has none: the engine then builds the plan on the first run on the
# GPU host, checks it (Dice gate) and caches it in $CELLSEG3D_ENGINES (/cache/engines unless set otherwise):
# mount a host folder there (wrapper/deploy/docker_run_gpu.tmpl does) so the plan is built once per GPU kind.
# No VOLUME is declared: an anonymous volume per run would keep nothing and pile up on the host.
#
# Stage "runtime" is the base image plus the venv (torch, TensorRT, ONNX Runtime GPU, bqapi) and the module
# folder: no compilers, no ONNX export tools, no pip cache. Python 3.12 (bqapi imports `cgi`, gone in 3.13).
# Size: not measured (no docker on the project's machines); `docker image ls cellsegment3dunet:2.0` after a
# build gives it. Most of it is the CUDA library wheels torch depends on.
#
# BisQue's engine runs it as (wrapper/README.md; --ipc=host gives PyTorch enough shared memory):
#   docker create --gpus all --ipc=host -v HOST_CACHE:/cache/engines cellsegment3dunet:2.0 \
#       python PythonScriptWrapper.py <resource_url> <threshold> <min_dist> <label_threshd> <mex_url> <token>

ARG CUDA_BASE=nvidia/cuda:12.8.1-base-ubuntu24.04

# ---- Python 3.12 on the CUDA base (shared by both stages, so the venv copies across) ----------------
FROM ${CUDA_BASE} AS python
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    CELLSEG3D_ENGINES=/cache/engines
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -c 'import sys; sys.exit(0 if (3, 10) <= sys.version_info[:2] <= (3, 12) else "bqapi needs Python 3.10-3.12 (cgi)")'

# ---- build: install, export the model --------------------------------------------------------------
FROM python AS build
ARG TORCH_SPEC="torch==2.10.0"
ARG TENSORRT_SPEC="tensorrt-cu12==10.16.1.11"
ARG TENSORRT_LIBS_SPEC="tensorrt-cu12-libs==10.16.1.11"
ARG TENSORRT_BINDINGS_SPEC="tensorrt-cu12-bindings==10.16.1.11"
ARG ORT_SPEC="onnxruntime-gpu==1.26.0"
ARG NVIDIA_INDEX_URL=https://pypi.nvidia.com
RUN python3 -m venv /opt/venv \
 && pip install "${TORCH_SPEC}" \
 && pip install --extra-index-url "${NVIDIA_INDEX_URL}" \
      "${TENSORRT_SPEC}" "${TENSORRT_LIBS_SPEC}" "${TENSORRT_BINDINGS_SPEC}" "${ORT_SPEC}" "${TORCH_SPEC}"
WORKDIR /src
COPY setup.py ./
COPY engine/ engine/
COPY export/ export/
COPY wrapper/ wrapper/
# not editable: the packages (and the default bundle) land in /opt/venv's site-packages; the pins hold
RUN pip install ".[bisque]" "${TORCH_SPEC}" "${ORT_SPEC}" "${TENSORRT_BINDINGS_SPEC}"
# Export tools live in their own venv, which sees the runtime one through a .pth file: they never reach
# the runtime image. The export writes into the installed bundle; plans (GPU build hosts only) go to
# $CELLSEG3D_ENGINES, which the runtime stage copies.
RUN python3 -m venv /opt/export \
 && python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' \
      > "$(/opt/export/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/runtime-venv.pth" \
 && /opt/export/bin/pip install "onnx>=1.15" "onnxconverter-common>=1.14"
# the whole source bundle (sample volume included) over the installed copy, then export into it
RUN mkdir -p "${CELLSEG3D_ENGINES}" \
 && BUNDLE="$(python -c 'from engine.bundle import DEFAULT_BUNDLE_DIR; print(DEFAULT_BUNDLE_DIR)')" \
 && cp -a engine/default_bundle/. "${BUNDLE}/" \
 && /opt/export/bin/python -m engine.cli export "${BUNDLE}" \
 && ls -l "${BUNDLE}" "${CELLSEG3D_ENGINES}" \
 && printf '%s\n' "${TORCH_SPEC}" "${ORT_SPEC}" "${TENSORRT_BINDINGS_SPEC}" > /opt/venv/pins.txt \
 && find /opt/venv -name '__pycache__' -prune -exec rm -rf {} + \
 && python -c 'import glob, sysconfig; site = sysconfig.get_paths()["purelib"]; print("\n".join(sorted(glob.glob(site + "/nvidia/*/lib") + glob.glob(site + "/tensorrt_libs"))))' \
      > /opt/venv/cuda-wheel-libs.conf

# ---- runtime ---------------------------------------------------------------------------------------
FROM python AS runtime
LABEL org.opencontainers.image.title="CellSegment3DUnet" \
      org.opencontainers.image.description="BisQue module: 3D cell segmentation with a 3D UNet (TensorRT / ONNX Runtime / PyTorch). Run with --gpus all --ipc=host and a host folder at /cache/engines." \
      bisque.module="CellSegment3DUnet"
COPY --from=build /opt/venv /opt/venv
COPY --from=build /cache/engines /cache/engines
RUN cp /opt/venv/cuda-wheel-libs.conf /etc/ld.so.conf.d/cellseg3d-cuda-wheels.conf && ldconfig
WORKDIR /module
COPY wrapper/PythonScriptWrapper.py wrapper/CellSegment3DUnet.xml wrapper/runtime-module.cfg wrapper/README.md ./
COPY wrapper/public/ public/
# fail the build, not the first BisQue run, when an import is broken or a pin moved
RUN python -c "import bqapi, lxml, engine, engine.cells, wrapper.bisque_io, wrapper.mex, wrapper.module_run; engine.load_bundle()" \
 && python -c "import importlib.util as u, sys; sys.exit('onnx (export only) is in the runtime image' if u.find_spec('onnx') else 0)" \
 && python -c "import importlib.metadata as m; pins = [p.split('==') for p in open('/opt/venv/pins.txt').read().split()]; moved = [(n, v, m.version(n)) for n, v in pins if m.version(n) != v]; assert not moved, moved" \
 && python PythonScriptWrapper.py --help > /dev/null
CMD ["python", "PythonScriptWrapper.py", "--help"]
