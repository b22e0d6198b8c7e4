"""The original CellSegment3DUnet network: Isensee et al.'s "Modified 3D UNet".

Attribute names match the original module's ``Modified3DUNet`` so its checkpoints (key ``state_dict``)
load unchanged. Five context levels (stride-2 convolutions, residual blocks, InstanceNorm3d, LeakyReLU),
a localization path with deep-supervision sums, and a softmax over ``n_classes``. The original returned a
flattened softmax; here the same values come back as ``(N, n_classes, Z, Y, X)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Modified3DUNet"]


def _conv(c_in: int, c_out: int, k: int = 3, stride: int = 1) -> nn.Conv3d:
    return nn.Conv3d(c_in, c_out, kernel_size=k, stride=stride, padding=k // 2, bias=False)


def _conv_norm_lrelu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(_conv(c_in, c_out), nn.InstanceNorm3d(c_out), nn.LeakyReLU())


def _norm_lrelu_conv(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.InstanceNorm3d(c_in), nn.LeakyReLU(), _conv(c_in, c_out))


def _norm_lrelu_upscale_conv_norm_lrelu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.InstanceNorm3d(c_in), nn.LeakyReLU(), nn.Upsample(scale_factor=2, mode="nearest"),
        _conv(c_in, c_out), nn.InstanceNorm3d(c_out), nn.LeakyReLU(),
    )


class Modified3DUNet(nn.Module):
    """Isensee-style 3D UNet of the original module.

    Args:
        in_channels: input channels.
        n_classes: output classes (softmax over them).
        base_n_filter: features of the first level (doubled per level, five levels).
    """

    divisor = 16

    def __init__(self, in_channels: int = 1, n_classes: int = 2, *, base_n_filter: int = 16) -> None:
        super().__init__()
        b = base_n_filter
        self.n_classes = self.out_channels = n_classes
        self.lrelu = nn.LeakyReLU()
        self.dropout3d = nn.Dropout3d(p=0.6)
        self.conv3d_c1_1 = _conv(in_channels, b)
        self.conv3d_c1_2 = _conv(b, b)
        self.lrelu_conv_c1 = nn.Sequential(nn.LeakyReLU(), _conv(b, b))
        self.inorm3d_c1 = nn.InstanceNorm3d(b)
        for level, (c_in, c_out) in enumerate([(b, 2 * b), (2 * b, 4 * b), (4 * b, 8 * b), (8 * b, 16 * b)], start=2):
            setattr(self, f"conv3d_c{level}", _conv(c_in, c_out, stride=2))
            setattr(self, f"norm_lrelu_conv_c{level}", _norm_lrelu_conv(c_out, c_out))
            if level < 5:
                setattr(self, f"inorm3d_c{level}", nn.InstanceNorm3d(c_out))
        self.norm_lrelu_upscale_conv_norm_lrelu_l0 = _norm_lrelu_upscale_conv_norm_lrelu(16 * b, 8 * b)
        self.conv3d_l0 = _conv(8 * b, 8 * b, k=1)
        self.inorm3d_l0 = nn.InstanceNorm3d(8 * b)
        for level, c in enumerate([16 * b, 8 * b, 4 * b], start=1):
            setattr(self, f"conv_norm_lrelu_l{level}", _conv_norm_lrelu(c, c))
            setattr(self, f"conv3d_l{level}", _conv(c, c // 2, k=1))
            setattr(self, f"norm_lrelu_upscale_conv_norm_lrelu_l{level}", _norm_lrelu_upscale_conv_norm_lrelu(c // 2, c // 4))
        self.conv_norm_lrelu_l4 = _conv_norm_lrelu(2 * b, 2 * b)
        self.conv3d_l4 = _conv(2 * b, n_classes, k=1)
        self.ds2_1x1_conv3d = _conv(8 * b, n_classes, k=1)
        self.ds3_1x1_conv3d = _conv(4 * b, n_classes, k=1)

    def _context(self, x: torch.Tensor, level: int) -> torch.Tensor:
        """Stride-2 conv, then the residual block that applies the same conv twice (as the original does)."""
        x = getattr(self, f"conv3d_c{level}")(x)
        block = getattr(self, f"norm_lrelu_conv_c{level}")
        return x + block(self.dropout3d(block(x)))

    def forward_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (``seg_layer`` of the original), ``(N, n_classes, Z, Y, X)``."""
        out = self.conv3d_c1_1(x)
        residual = out
        out = self.lrelu_conv_c1(self.dropout3d(self.conv3d_c1_2(self.lrelu(out)))) + residual
        skips = [self.lrelu(out)]
        out = self.lrelu(self.inorm3d_c1(out))
        for level in (2, 3, 4):
            out = self.lrelu(getattr(self, f"inorm3d_c{level}")(self._context(out, level)))
            skips.append(out)
        out = self.norm_lrelu_upscale_conv_norm_lrelu_l0(self._context(out, 5))
        out = self.lrelu(self.inorm3d_l0(self.conv3d_l0(out)))
        deep = []
        for level in (1, 2, 3):
            out = getattr(self, f"conv_norm_lrelu_l{level}")(torch.cat([out, skips[4 - level]], dim=1))
            deep.append(out)
            out = getattr(self, f"norm_lrelu_upscale_conv_norm_lrelu_l{level}")(getattr(self, f"conv3d_l{level}")(out))
        out = self.conv_norm_lrelu_l4(torch.cat([out, skips[0]], dim=1))
        ds = F.interpolate(self.ds2_1x1_conv3d(deep[1]), scale_factor=2.0, mode="nearest") + self.ds3_1x1_conv3d(deep[2])
        return self.conv3d_l4(out) + F.interpolate(ds, scale_factor=2.0, mode="nearest")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax probabilities ``(N, n_classes, Z, Y, X)`` for ``x`` of ``(N, in_channels, Z, Y, X)``."""
        return torch.softmax(self.forward_logits(x), dim=1)
