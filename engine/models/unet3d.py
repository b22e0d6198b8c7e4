"""pytorch-3dunet's ``UNet3D``, re-implemented with identical module names.

State dicts written by ``pytorch3dunet.unet3d.model.UNet3D`` load unchanged (checkpoint key
``model_state_dict``), so users can bring their pytorch-3dunet checkpoints. Only what inference needs is
kept: ``DoubleConv`` blocks built from a layer-order string, max pooling, nearest upsampling + concat, a
1x1x1 final convolution and a sigmoid or softmax.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["UNet3D"]

_LAYER_CHARS = "gbcrled"


def _create_conv(
    in_channels: int, out_channels: int, order: str, num_groups: int
) -> list[tuple[str, nn.Module]]:
    """One conv layer with its norm and non-linearity, named as pytorch-3dunet names them."""
    modules: list[tuple[str, nn.Module]] = []
    conv_at = order.index("c")
    for i, char in enumerate(order):
        if char == "c":
            bias = not ("g" in order or "b" in order)
            modules.append(("conv", nn.Conv3d(in_channels, out_channels, 3, padding=1, bias=bias)))
        elif char == "g":
            channels = in_channels if i < conv_at else out_channels
            groups = 1 if channels < num_groups else num_groups
            if channels % groups:
                raise ValueError(f"GroupNorm: {channels} channels are not divisible by num_groups={groups}")
            modules.append(("groupnorm", nn.GroupNorm(num_groups=groups, num_channels=channels)))
        elif char == "b":
            modules.append(("batchnorm", nn.BatchNorm3d(in_channels if i < conv_at else out_channels)))
        elif char == "r":
            modules.append(("ReLU", nn.ReLU(inplace=True)))
        elif char == "l":
            modules.append(("LeakyReLU", nn.LeakyReLU(inplace=True)))
        elif char == "e":
            modules.append(("ELU", nn.ELU(inplace=True)))
        elif char == "d":
            modules.append(("dropout", nn.Dropout(p=0.1)))
    return modules


class _SingleConv(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, order: str, num_groups: int) -> None:
        super().__init__()
        for name, module in _create_conv(in_channels, out_channels, order, num_groups):
            self.add_module(name, module)


class _DoubleConv(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, *, encoder: bool, order: str, num_groups: int) -> None:
        super().__init__()
        if encoder:
            mid = max(out_channels // 2, in_channels)
        else:
            mid = out_channels
        self.add_module("SingleConv1", _SingleConv(in_channels, mid, order, num_groups))
        self.add_module("SingleConv2", _SingleConv(mid, out_channels, order, num_groups))


class _Encoder(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, *, pool: bool, order: str, num_groups: int) -> None:
        super().__init__()
        self.pooling = nn.MaxPool3d(kernel_size=2) if pool else None
        self.basic_module = _DoubleConv(in_channels, out_channels, encoder=True, order=order, num_groups=num_groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pooling is not None:
            x = self.pooling(x)
        return self.basic_module(x)


class _Decoder(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, *, order: str, num_groups: int) -> None:
        super().__init__()
        self.basic_module = _DoubleConv(in_channels, out_channels, encoder=False, order=order, num_groups=num_groups)

    def forward(self, encoder_features: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=encoder_features.shape[2:], mode="nearest")
        return self.basic_module(torch.cat((encoder_features, x), dim=1))


class UNet3D(nn.Module):
    """3D U-Net with pytorch-3dunet's structure and state-dict keys.

    Args:
        in_channels: input channels.
        out_channels: output channels (probability maps).
        final_sigmoid: sigmoid per channel if True, softmax over channels otherwise.
        f_maps: features of the first level (doubled per level) or one count per level.
        num_levels: levels when ``f_maps`` is an int.
        layer_order: letters from ``gbcrled`` in pytorch-3dunet's meaning, e.g. ``'gcr'``.
        num_groups: GroupNorm groups (1 where a layer has fewer channels).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        final_sigmoid: bool = True,
        f_maps: int | list[int] = 64,
        num_levels: int = 4,
        layer_order: str = "gcr",
        num_groups: int = 8,
    ) -> None:
        super().__init__()
        if isinstance(f_maps, int):
            f_maps = [f_maps * 2**k for k in range(num_levels)]
        f_maps = list(f_maps)
        if len(f_maps) < 2:
            raise ValueError(f"UNet3D needs at least 2 levels, got f_maps={f_maps}")
        if "c" not in layer_order or set(layer_order) - set(_LAYER_CHARS) or layer_order[0] in "rle":
            raise ValueError(f"layer_order {layer_order!r}: use letters from {_LAYER_CHARS!r}, with one 'c' and no leading non-linearity")
        self.f_maps = f_maps
        self.encoders = nn.ModuleList(
            _Encoder(in_channels if i == 0 else f_maps[i - 1], f, pool=i > 0, order=layer_order, num_groups=num_groups)
            for i, f in enumerate(f_maps)
        )
        rev = f_maps[::-1]
        self.decoders = nn.ModuleList(
            _Decoder(rev[i] + rev[i + 1], rev[i + 1], order=layer_order, num_groups=num_groups)
            for i in range(len(rev) - 1)
        )
        self.final_conv = nn.Conv3d(f_maps[0], out_channels, 1)
        self.final_activation: nn.Module = nn.Sigmoid() if final_sigmoid else nn.Softmax(dim=1)

    @property
    def out_channels(self) -> int:
        return self.final_conv.out_channels

    @property
    def divisor(self) -> int:
        """Spatial sizes must be multiples of this (one 2x pooling per level below the first)."""
        return 2 ** (len(self.f_maps) - 1)

    def forward_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits, ``(N, out_channels, Z, Y, X)``; training uses these."""
        features: list[torch.Tensor] = []
        for encoder in self.encoders:
            x = encoder(x)
            features.insert(0, x)
        for decoder, skip in zip(self.decoders, features[1:]):
            x = decoder(skip, x)
        return self.final_conv(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Probabilities, ``(N, out_channels, Z, Y, X)`` float, for ``x`` of ``(N, in_channels, Z, Y, X)``."""
        return self.final_activation(self.forward_logits(x))
