"""Tiny random-weight bundles of both architectures, for export, backend and engine tests (seconds on 2 CPU
cores); a plain module, not a conftest, so every test folder imports the same one."""

from __future__ import annotations

from pathlib import Path

import torch

from engine.bundle import (
    Bundle,
    Normalization,
    OutputSpec,
    PostprocessSpec,
    make_bundle,
)

__all__ = ["ARCHITECTURES", "make_tiny_bundle", "tiny_template"]

ARCHITECTURES = ("UNet3D", "Modified3DUNet")


def tiny_template(path: Path, **overrides: object) -> Bundle:
    """A 3-level UNet3D with 8 features: fast enough for CPU tests on odd shapes."""
    fields = dict(
        path=path,
        name="tiny",
        architecture="UNet3D",
        arch_kwargs={"in_channels": 1, "out_channels": 2, "f_maps": 8, "num_levels": 3},
        in_channels=1,
        normalization=Normalization(kind="percentile", low=1.0, high=99.8),
        output=OutputSpec(kind="boundary", channel=0, names=("boundary", "foreground")),
        patch_shape=(16, 32, 32),
        overlap=0.25,
        postprocess=PostprocessSpec(method="watershed", threshold=0.5, min_dist=3, label_threshd=5),
    )
    fields.update(overrides)
    return Bundle(**fields)  # type: ignore[arg-type]

_SPECS = {
    "UNet3D": (
        {"in_channels": 1, "out_channels": 1, "f_maps": 8, "num_levels": 3},
        OutputSpec(kind="boundary", channel=0, names=("boundary",)),
    ),
    "Modified3DUNet": (
        {"in_channels": 1, "n_classes": 2, "base_n_filter": 4},
        OutputSpec(kind="foreground", channel=1, names=("background", "cell")),
    ),
}


def make_tiny_bundle(architecture: str, out: Path, /, *, seed: int = 0, patch_shape: tuple[int, int, int] = (16, 32, 32)) -> Bundle:
    """A bundle in ``out`` with seeded random weights (UNet3D f_maps 8, 3 levels; Modified3DUNet base_n_filter 4)."""
    kwargs, output = _SPECS[architecture]
    template = Bundle(
        path=out, name=out.name, architecture=architecture, arch_kwargs=dict(kwargs), in_channels=1,
        normalization=Normalization(), output=output, patch_shape=patch_shape, overlap=0.25,
        postprocess=PostprocessSpec(method="components", threshold=0.5, min_dist=2, label_threshd=4),
        description="tiny random-weight test bundle",
    )
    torch.manual_seed(seed)
    return make_bundle(None, out, template=template)
