"""cellseg3d: the CellSegment3DUnet BisQue module's engine, exporter and wrapper."""

from setuptools import find_packages, setup

setup(
    name="cellseg3d",
    version="0.1.0",
    description="Fast 3D cell segmentation with a 3D UNet (torch / ONNX Runtime / TensorRT) for BisQue",
    python_requires=">=3.10",
    packages=find_packages(include=["engine", "engine.*", "export", "export.*", "wrapper", "wrapper.*", "benchmarks"]),
    package_data={"engine": ["py.typed", "default_bundle/*.json", "default_bundle/*.pt", "default_bundle/*.onnx"]},
    # edt (distance transforms) and connected-components-3d (components): field libraries, measured faster than
    # scipy for the labelling (benchmarks/PERFORMANCE.md); manylinux wheels for Python 3.10-3.12
    install_requires=["numpy>=1.24", "scipy>=1.10", "scikit-image>=0.21", "tifffile>=2023.7", "torch>=2.1", "tqdm", "edt>=2.4",
                      "connected-components-3d>=3.12", "fastremap>=1.21"],
    extras_require={
        "export": ["onnx>=1.15", "onnxruntime>=1.17", "onnxconverter-common>=1.14"],
        "bisque": ["bisque-api[lxml]==0.5.12.2"],
        "test": ["pytest>=8", "pytest-timeout", "pytest-benchmark>=4", "onnx>=1.15", "onnxruntime>=1.17", "onnxconverter-common>=1.14", "h5py", "pyyaml",
                 "bisque-api[lxml]==0.5.12.2"],
        # Peers for `cellseg3d bench`: MONAI is installed apart, with `pip install --no-deps monai` (it needs only
        # numpy and torch at run time; resolving its requirements could swap the CPU torch wheel for a CUDA one).
        # pytorch-3dunet's predictor and the original module's loop are re-implemented in benchmarks/peers.py.
        "bench": ["pytest-benchmark>=4", "matplotlib>=3.6"],
        # GPU runtimes name their CUDA major: plain `tensorrt` pulls the CUDA 13 build; onnxruntime-gpu on PyPI is a
        # CUDA 12 build up to 1.26 (1.26.0: CUDA 12.8) and CUDA 13 from 1.27 (1.31.1: CUDA 13.0), per build_and_package_info.
        "tensorrt-cu12": ["tensorrt-cu12>=10.16,<12"],
        "tensorrt-lean-cu12": ["tensorrt-lean-cu12>=10.16,<12"],
        "ort-gpu-cu12": ["onnxruntime-gpu>=1.20,<1.27"],
        "ort-gpu-cu13": ["onnxruntime-gpu>=1.27"],
    },
    entry_points={"console_scripts": ["cellseg3d=engine.cli:main"]},
)
