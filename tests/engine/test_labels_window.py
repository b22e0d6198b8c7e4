"""A labelling window on the network's device equals the host window: the same seeds, markers and labels.

``DeviceWindow`` is made on the CPU's torch here (the engine picks it only for a GPU; the CUDA run is
``test_labels.py::test_labelling_on_cuda_equals_the_host_labelling``, skipped without one): boundary and foreground maps, anisotropic sampling (distances by edt on
the host), saturated maps (plateaus flooded on the host), registered seed points, whole volumes and slabs
in xy tiles through the slab labeller fed tensors, and a device that runs out of memory mid-window or
joining a window's planes.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from slab_helpers import membrane_probs, nuclei_probs

from engine.bundle import OutputSpec, PostprocessSpec
from engine.labels import MemoryLabelStore, SlabLabeler, label_cells
from engine.labels.window import DeviceWindow, HostWindow, open_window

BOUNDARY = OutputSpec(kind="boundary", channel=0, names=("boundary",))
FOREGROUND = OutputSpec(kind="foreground", channel=0, names=("foreground",))
CPU = torch.device("cpu")
slabs_module = importlib.import_module("engine.labels.slabs")
window_module = importlib.import_module("engine.labels.window")


def _windows(image: np.ndarray, kind: str, threshold: float, sampling, min_dist: int):  # noqa: ANN001, ANN202
    host = HostWindow.compute(image, kind=kind, threshold=threshold, sampling=sampling, threads=1)
    device = DeviceWindow(image, kind=kind, threshold=threshold, sampling=sampling, threads=1, device=CPU)
    return (host, host.peaks(min_dist)), (device, device.peaks(min_dist))


@pytest.mark.parametrize(
    "probs, kind, sampling, min_dist",
    [  # each case splits components that hold several seeds on the host; the saturated map has 6414 plateau voxels
        (membrane_probs((40, 48, 52), seed=1), "boundary", None, 3),
        (membrane_probs((40, 48, 52), seed=1, ties=True), "boundary", None, 3),
        (membrane_probs((40, 48, 52), seed=4), "boundary", (2.0, 1.0, 1.0), 3),
        (nuclei_probs((40, 48, 52), seed=2), "foreground", None, 1),
    ],
    ids=["membranes", "saturated", "anisotropic", "foreground"],
)
def test_device_window_equals_host_window(probs: np.ndarray, kind: str, sampling, min_dist: int) -> None:  # noqa: ANN001
    image = probs[0]
    (host, host_peaks), (device, device_peaks) = _windows(image, kind, 0.5, sampling, min_dist=min_dist)
    assert len(host_peaks) > 10 and np.array_equal(device_peaks, host_peaks)
    extra = np.array([[0, 0, 0], [5, 7, 9], [5, 7, 10]])  # registered seeds of blocks done before, two touching
    points = np.concatenate([host_peaks, extra])
    assert np.array_equal(device.place(points), host.place(points))
    assert device.n_markers == host.n_markers and np.array_equal(device.markers_at(points), host.markers_at(points))
    want = host.flood(boundary=kind == "boundary", open_background=True)
    got = device.flood(boundary=kind == "boundary", open_background=True)
    assert want.max() > 10 and got.dtype == want.dtype and np.array_equal(got, want)


def _out_of_memory(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
    raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")


@pytest.mark.parametrize("failing", ["descend", "connected_components"])
def test_device_out_of_memory_mid_window_finishes_on_the_host(monkeypatch, caplog, failing: str) -> None:  # noqa: ANN001
    """Out of memory in the flood's descent, or in placing the seeds (their components): the window goes on
    on the host, with the same markers and labels, and lets its device tensors go."""
    image = membrane_probs((40, 48, 52), seed=1)[0]
    (host, peaks), (device, _) = _windows(image, "boundary", 0.5, None, min_dist=3)
    monkeypatch.setattr(window_module.dev, failing, _out_of_memory)
    assert np.array_equal(device.place(peaks), host.place(peaks))
    assert np.array_equal(device.markers_at(peaks), host.markers_at(peaks))
    got = device.flood(boundary=True, open_background=True)
    assert np.array_equal(got, host.flood(boundary=True, open_background=True))
    assert "finishing the window on the host" in caplog.text and not hasattr(device, "image_t")


def test_device_out_of_memory_at_the_start_labels_on_the_host(monkeypatch, caplog) -> None:  # noqa: ANN001
    image = membrane_probs((40, 48, 52), seed=1)[0]
    monkeypatch.setattr(window_module, "DeviceWindow", _out_of_memory)
    window, _ = open_window(image, kind="boundary", threshold=0.5, sampling=None, threads=1, device=torch.device("meta"),
                            min_dist=3)
    assert isinstance(window, HostWindow) and "labelling it on the host" in caplog.text


@pytest.mark.parametrize("method, depth, halo, tile", [("watershed", 60, 0, None), ("watershed", 16, 12, None),
                                                     ("watershed", 20, 12, 24), ("components", 16, 0, None)])
def test_slab_labeller_fed_tensors_equals_the_host(monkeypatch, method: str, depth: int, halo: int, tile) -> None:  # noqa: ANN001
    """Planes pushed as tensors (a GPU run's, here on the CPU's torch) stay tensors: windows on the device
    (``DeviceWindow``), components and region-graph faces by torch, within and across cores. Whole volume,
    cores and cores in xy tiles: the same labels as host arrays give."""
    probs = membrane_probs((60, 48, 52), seed=1)
    spec = PostprocessSpec(method=method, threshold=0.5, min_dist=3, label_threshd=5, merge_threshold=0.5)
    torch_steps: list[str] = []
    for module, name in ((window_module, "DeviceWindow"), (slabs_module, "connected_components"), (slabs_module, "faces")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, _name=name, **k: torch_steps.append(_name) or _real(*a, **k))

    def labels(as_tensors: bool) -> np.ndarray:
        store = MemoryLabelStore(probs.shape[1:])
        labeler = SlabLabeler(probs.shape[1:], output=BOUNDARY, spec=spec, sampling=None, depth=depth, halo=halo,
                              tile=tile, store=store, threads=1)
        for z0 in range(0, probs.shape[1], 5):
            planes = probs[:, z0 : z0 + 5]
            labeler.push(z0, torch.from_numpy(planes.copy()) if as_tensors else planes)
        return labeler.finish().lut[store.labels]

    want = labels(as_tensors=False)
    assert not torch_steps
    got = labels(as_tensors=True)
    expected = {"connected_components"} if method == "components" else {"DeviceWindow", "faces"}
    assert set(torch_steps) == expected
    assert want.max() > 20 and np.array_equal(got, want)


def test_planes_that_do_not_fit_the_device_are_joined_on_the_host(monkeypatch, caplog) -> None:  # noqa: ANN001
    """Joining a window's planes out of device memory: that window on the host, the same labels."""
    probs = membrane_probs((40, 48, 52), seed=1)
    spec = PostprocessSpec(method="watershed", threshold=0.5, min_dist=3, label_threshd=5, merge_threshold=0.5)
    want = label_cells(probs, output=BOUNDARY, spec=spec)
    cat, calls = torch.cat, []

    def cat_out_of_memory_once(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(1)
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")
        return cat(*args, **kwargs)

    store = MemoryLabelStore(probs.shape[1:])
    labeler = SlabLabeler(probs.shape[1:], output=BOUNDARY, spec=spec, sampling=None, depth=40, halo=0, store=store, threads=1)
    monkeypatch.setattr(torch, "cat", cat_out_of_memory_once)
    for z0 in range(0, 40, 8):
        labeler.push(z0, torch.from_numpy(probs[:, z0 : z0 + 8].copy()))
    got = labeler.finish().lut[store.labels]
    assert "out of memory joining planes 0-40" in caplog.text
    assert want.max() > 20 and np.array_equal(got, want)


def test_a_numpy_float64_threshold_gives_one_mask_on_both() -> None:
    """numpy 2 compares float32 with a float64 scalar in float64, torch in float32: both windows take the
    threshold as a Python float (float32 comparison), so voxels at exactly float32(0.3) are outside on both
    (the host kept them before)."""
    image = np.zeros((6, 12, 12), np.float32)
    image[1:5, 2:10, 2:10] = 0.9
    image[1:5, 2:10, 6] = np.float32(0.3)
    threshold = np.float64(0.3)
    host = HostWindow.compute(image, kind="foreground", threshold=threshold, sampling=None, threads=1)
    device = DeviceWindow(image, kind="foreground", threshold=threshold, sampling=None, threads=1, device=CPU)
    assert np.array_equal(host.mask, device.mask_t.numpy())
    assert int(host.mask.sum()) == 4 * 8 * 7
