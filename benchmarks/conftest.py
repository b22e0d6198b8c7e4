"""pytest-benchmark fixtures for ``pytest benchmarks/`` (never collected by the normal ``pytest`` run).

Options: ``--bench-sizes small,medium`` (default ``small``, or ``$CELLSEG3D_BENCH_SIZES``), ``--bench-gpu``
(CUDA methods), ``--bench-model default|reference``. The model, the peaks and each size's reference are
made once per session; every test then times one method on one size.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:  # ``pytest`` (not ``python -m pytest``) with --import-mode=importlib
    sys.path.insert(0, str(_ROOT))

from benchmarks.cases import Case, bench_bundle, make_case, parse_sizes, reference_probabilities, scratch_dir  # noqa: E402
from benchmarks.methods import Context, default_methods  # noqa: E402


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("cellseg3d benchmarks")
    group.addoption("--bench-sizes", default=os.environ.get("CELLSEG3D_BENCH_SIZES", "small"), help="comma-separated sizes (default: %(default)s)")
    group.addoption("--bench-gpu", action="store_true", help="benchmark the CUDA methods")
    group.addoption("--bench-model", choices=("default", "reference"), default="default", help="bundle to benchmark")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "method" in metafunc.fixturenames:
        methods = default_methods(gpu=metafunc.config.getoption("--bench-gpu"))
        metafunc.parametrize("method", methods, ids=[m.name.replace(" ", "-") for m in methods])
    if "size" in metafunc.fixturenames:
        metafunc.parametrize("size", parse_sizes(metafunc.config.getoption("--bench-sizes")), scope="session")


@pytest.fixture(scope="session")
def bench_context(request: pytest.FixtureRequest) -> Iterator[Context]:
    import torch

    from benchmarks.measure import flops_per_voxel, machine_peaks
    from engine.backends.torch_backend import default_threads

    gpu = request.config.getoption("--bench-gpu")
    if gpu and not torch.cuda.is_available():
        pytest.skip("--bench-gpu: no CUDA device")
    torch.set_num_threads(default_threads())
    work = scratch_dir()
    bundle, _origin = bench_bundle(work, prefer_default=request.config.getoption("--bench-model") == "default")
    device = torch.device("cuda" if gpu else "cpu")
    peaks = machine_peaks(device)
    fpv = flops_per_voxel(bundle.build_model(), in_channels=bundle.in_channels, patch_shape=bundle.patch_shape)
    (work / "labels").mkdir()
    yield Context(bundle=bundle, device=device, flops_per_voxel=fpv, peaks=peaks, out_dir=work / "labels",
                  repeats=1, slab_voxels=2**25 if gpu else 2**23)
    shutil.rmtree(work, ignore_errors=True)


_CASES: dict[str, Case] = {}


@pytest.fixture
def bench_case(bench_context: Context, size: str) -> Case:
    """The volume of ``size`` with its fp32 reference (made once per session)."""
    if size not in _CASES:
        case = make_case(size, bench_context.out_dir.parent)
        reference_probabilities(case, bench_context.bundle, device=bench_context.device)
        _CASES[size] = case
    return _CASES[size]
