"""A bare checkpoint -> a bundle, with the architecture read from the state dict's keys and shapes.

``cellseg3d export CHECKPOINT --out DIR`` uses this. What a state dict cannot say (GroupNorm's group count,
the non-linearity, what the output channels mean) takes pytorch-3dunet's and the original module's
defaults, and each assumption is logged as a warning; ``cellseg3d bundle`` states them explicitly.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from engine.bundle import (
    Bundle,
    Normalization,
    OutputSpec,
    PostprocessSpec,
    make_bundle,
    read_state_dict,
)
from engine.errors import BundleError

__all__ = ["bundle_from_checkpoint", "infer_architecture"]

logger = logging.getLogger(__name__)


def infer_architecture(state: dict[str, torch.Tensor], /, *, where: Path) -> tuple[str, dict[str, Any], list[str]]:
    """``(architecture, constructor kwargs, assumptions)`` for a state dict of UNet3D or Modified3DUNet.

    Raises:
        BundleError: the keys match neither architecture.
    """
    if "conv3d_c1_1.weight" in state and "conv3d_l4.weight" in state:
        first = state["conv3d_c1_1.weight"]
        kwargs: dict[str, Any] = {
            "in_channels": int(first.shape[1]), "n_classes": int(state["conv3d_l4.weight"].shape[0]), "base_n_filter": int(first.shape[0]),
        }
        return "Modified3DUNet", kwargs, []
    if "encoders.0.basic_module.SingleConv1.conv.weight" in state and "final_conv.weight" in state:
        levels = sorted({int(k.split(".")[1]) for k in state if k.startswith("encoders.")})
        f_maps = [int(state[f"encoders.{i}.basic_module.SingleConv2.conv.weight"].shape[0]) for i in levels]
        norm = "g" if any(".groupnorm." in k for k in state) else "b" if any(".batchnorm." in k for k in state) else ""
        kwargs = {
            "in_channels": int(state["encoders.0.basic_module.SingleConv1.conv.weight"].shape[1]),
            "out_channels": int(state["final_conv.weight"].shape[0]),
            "f_maps": f_maps,
            "layer_order": f"{norm}cr",
        }
        assumed = [f"layer_order={kwargs['layer_order']!r} (norm before conv, ReLU)", "final_sigmoid=True"]
        if norm == "g":
            kwargs["num_groups"] = 8
            assumed.append("num_groups=8")
        return "UNet3D", kwargs, assumed
    raise BundleError(f"{where}: keys match neither UNet3D (encoders.*, final_conv) nor Modified3DUNet (conv3d_c1_1, conv3d_l4)")


def bundle_from_checkpoint(checkpoint: Path, out: Path, /) -> Bundle:
    """Make a bundle in ``out`` from ``checkpoint`` (state dict, pytorch-3dunet or original-module checkpoint).

    Raises:
        BundleError: unreadable checkpoint, unknown architecture, or weights that do not load.
    """
    state = read_state_dict(checkpoint)
    arch, kwargs, assumed = infer_architecture(state, where=checkpoint)
    n_out = int(kwargs.get("out_channels", kwargs.get("n_classes", 1)))
    if arch == "Modified3DUNet":
        output = OutputSpec(kind="foreground", channel=min(1, n_out - 1), names=tuple(f"class{i}" for i in range(n_out)))
        assumed.append(f"output: foreground probability in channel {output.channel} (the original module's softmax)")
    else:
        output = OutputSpec(kind="boundary", channel=0, names=tuple(f"ch{i}" for i in range(n_out)))
        assumed.append("output: boundary probability in channel 0")
    for item in assumed:
        logger.warning("%s: assumed %s; make the bundle with 'cellseg3d bundle' to state it", checkpoint, item)
    template = Bundle(
        path=out, name=out.name, architecture=arch, arch_kwargs=kwargs, in_channels=int(kwargs["in_channels"]),
        normalization=Normalization(), output=output, patch_shape=(64, 128, 128), overlap=0.25,
        postprocess=PostprocessSpec(), description=f"made by 'cellseg3d export' from {checkpoint.name}",
        training={"assumed": assumed},
    )
    return make_bundle(checkpoint, out, template=template)
