"""Tiny random-weight bundles of both architectures, for export and backend tests (seconds on 2 CPU cores)."""

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

__all__ = ["ARCHITECTURES", "make_tiny_bundle"]

ARCHITECTURES = ("UNet3D", "Modified3DUNet")

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
