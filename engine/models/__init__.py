"""Architecture registry: the networks a bundle may name, with the constructor options each accepts."""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from ..errors import BundleError
from .modified_unet import Modified3DUNet
from .unet3d import UNet3D

__all__ = ["ARCHITECTURES", "build_model", "model_divisor"]

ARCHITECTURES: dict[str, type[nn.Module]] = {"UNet3D": UNet3D, "Modified3DUNet": Modified3DUNet}


def build_model(name: str, kwargs: dict[str, Any]) -> nn.Module:
    """Instantiate architecture ``name`` with ``kwargs``; unknown names or options raise BundleError."""
    if name not in ARCHITECTURES:
        raise BundleError(f"unknown architecture {name!r}; known: {', '.join(sorted(ARCHITECTURES))}")
    cls = ARCHITECTURES[name]
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise BundleError(f"{name}: unknown option(s) {unknown}; allowed: {allowed}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise BundleError(f"{name}({kwargs}): {exc}") from exc


def model_divisor(model: nn.Module) -> int:
    """Patch sizes must be multiples of this for the network to map shape to shape."""
    return int(getattr(model, "divisor"))
