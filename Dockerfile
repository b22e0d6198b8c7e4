# syntax=docker/dockerfile:1
#
# CellSegment3DUnet BisQue module image.
#
#   docker build -t cellsegment3dunet:2.0 .
#
# Stage "build" installs the project into /opt/venv and runs `cellseg3d export` on the shipped model:
# model.onnx + model.fp16.onnx (each checked against torch), plus the TensorRT plan when the build host
# exposes a GPU. `docker build` normally has none: the engine then builds the plan on the first run on the
# GPU host, checks it (Dice gate) and caches it in $CELLSEG3D_ENGINES, a volume - mount a host folder there
# to keep plans across containers.
#
# Stage "runtime" is the CUDA runtime base plus the venv (torch CUDA, TensorRT, ONNX Runtime GPU, bqapi):
# no compilers, no ONNX export tools. Python 3.12 (bqapi imports `cgi`, gone in 3.13).
#
# BisQue's engine runs it as (see runtime-module.cfg; --ipc=host gives PyTorch enough shared memory):
#   docker create --ipc=host --gpus all cellsegment3dunet:2.0 \
#       python PythonScriptWrapper.py <resource_url> <threshold> <min_dist> <label_threshd> <mex_url> <token>

ARG CUDA_BASE=nvidia/cuda:12.6.3-runtime-ubuntu24.04

# ---- Python 3.12 on the CUDA runtime base (shared by both stages, so the venv copies across) ----------
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
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
ARG TORCH_SPEC="torch>=2.5,<3"
ARG TENSORRT_SPEC="tensorrt-cu12>=10.3,<11"
ARG ORT_SPEC="onnxruntime-gpu>=1.20"
RUN python3 -m venv /opt/venv \
 && pip install --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}" \
 && pip install "${TENSORRT_SPEC}" "${ORT_SPEC}"
WORKDIR /src
COPY setup.py ./
COPY engine/ engine/
COPY export/ export/
COPY wrapper/ wrapper/
# not editable: the packages (and the default bundle) land in /opt/venv's site-packages
RUN pip install ".[bisque]"
# Export tools live in their own venv, which sees the runtime one through a .pth file: they never reach
# the runtime image. The export writes into the installed bundle; plans (GPU build hosts only) go to
# $CELLSEG3D_ENGINES, which the runtime stage copies and declares a volume.
RUN python3 -m venv /opt/export \
 && python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' \
      > "$(/opt/export/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/runtime-venv.pth" \
 && /opt/export/bin/pip install "onnx>=1.15" "onnxconverter-common>=1.14"
# the whole source bundle (sample volume included) over the installed copy, then export into it
RUN mkdir -p "${CELLSEG3D_ENGINES}" \
 && BUNDLE="$(python -c 'from engine.bundle import DEFAULT_BUNDLE_DIR; print(DEFAULT_BUNDLE_DIR)')" \
 && cp -a engine/default_bundle/. "${BUNDLE}/" \
 && /opt/export/bin/python -m engine.cli export "${BUNDLE}" \
 && ls -l "${BUNDLE}" "${CELLSEG3D_ENGINES}"

# ---- runtime ---------------------------------------------------------------------------------------
FROM python AS runtime
LABEL org.opencontainers.image.title="CellSegment3DUnet" \
      org.opencontainers.image.description="BisQue module: 3D cell segmentation with a 3D UNet (TensorRT / ONNX Runtime / PyTorch). Run with --ipc=host and a GPU." \
      bisque.module="CellSegment3DUnet"
COPY --from=build /opt/venv /opt/venv
COPY --from=build /cache/engines /cache/engines
WORKDIR /module
COPY wrapper/PythonScriptWrapper.py wrapper/CellSegment3DUnet.xml wrapper/runtime-module.cfg wrapper/README.md ./
COPY wrapper/public/ public/
# fail the build, not the first BisQue run, when an import is broken
RUN python -c "import bqapi, lxml, engine, engine.cells, wrapper.bisque_io, wrapper.mex; engine.load_bundle()" \
 && python -c "import importlib.util as u, sys; sys.exit('onnx (export only) is in the runtime image' if u.find_spec('onnx') else 0)" \
 && python PythonScriptWrapper.py --help > /dev/null
# TensorRT plans built on first run on a GPU host are cached here; mount a host folder to keep them
VOLUME ["/cache/engines"]
CMD ["python", "PythonScriptWrapper.py", "--help"]
