"""Architectures: checkpoints of pytorch-3dunet and of the original module load unchanged and match."""

from __future__ import annotations

import pytest
import torch

from engine.errors import BundleError
from engine.models import build_model

from helpers.original_modified_unet import Modified3DUNet as OriginalModified3DUNet


@pytest.mark.parametrize(
    "kwargs, shape",
    [
        ({"f_maps": 8, "num_levels": 3}, (1, 1, 33, 65, 65)),
        ({"f_maps": [8, 16, 32, 64], "final_sigmoid": False}, (2, 1, 16, 32, 48)),
        ({"f_maps": 16, "num_levels": 4, "num_groups": 4}, (1, 1, 16, 32, 32)),
    ],
)
def test_unet3d_matches_pytorch3dunet(kwargs: dict, shape: tuple[int, ...]) -> None:
    ref_module = pytest.importorskip("pytorch3dunet.unet3d.model", reason="pip install --no-deps pytorch3dunet")
    torch.manual_seed(0)
    ref = ref_module.UNet3D(1, 2, **kwargs).eval()
    ours = build_model("UNet3D", {"in_channels": 1, "out_channels": 2, **kwargs}).eval()
    with torch.no_grad():
        for p in ref.parameters():  # GroupNorm starts at identity; randomize so the test sees it
            p.add_(torch.randn_like(p) * 0.1)
    ours.load_state_dict({"model_state_dict": ref.state_dict()}["model_state_dict"], strict=True)
    x = torch.rand(shape)
    with torch.no_grad():
        assert (ref(x) - ours(x)).abs().max().item() <= 1e-5


def test_modified_unet_matches_original() -> None:
    torch.manual_seed(0)
    ref = OriginalModified3DUNet(1, 2, base_n_filter=4).eval()
    ours = build_model("Modified3DUNet", {"in_channels": 1, "n_classes": 2, "base_n_filter": 4}).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.rand(1, 1, 16, 32, 48)
    with torch.no_grad():
        flat, seg = ref(x)
        ours_probs = ours(x)
    expected = flat.view(1, 16, 32, 48, 2).permute(0, 4, 1, 2, 3)
    assert (ours_probs - expected).abs().max().item() <= 1e-5
    assert (ours.forward_logits(x) - seg).abs().max().item() <= 1e-5


def test_unknown_architecture_and_option_are_named() -> None:
    with pytest.raises(BundleError, match="unknown architecture 'UNet2D'"):
        build_model("UNet2D", {})
    with pytest.raises(BundleError, match=r"unknown option\(s\) \['fmaps'\]"):
        build_model("UNet3D", {"in_channels": 1, "out_channels": 1, "fmaps": 8})


def test_bad_layer_order_rejected() -> None:
    with pytest.raises(BundleError, match="layer_order"):
        build_model("UNet3D", {"in_channels": 1, "out_channels": 1, "layer_order": "rcg"})
