"""The U-Net of Ronneberger et al. (2015), laid out exactly like Pytorch-UNet.

Module and attribute names (``inc``, ``down1..4``, ``up1..4``, ``outc``, ``double_conv``,
``maxpool_conv``, ``up``, ``conv``) match Pytorch-UNet's current code, so its ``MODEL.pth`` state dicts
load unchanged when ``base_channels=64``. Smaller widths (16, 32) give fast CPU models of the same shape.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DoubleConv", "Down", "Up", "OutConv", "UNet", "SplitUp", "count_parameters", "export_form"]


class DoubleConv(nn.Module):
    """(conv 3x3 => BN => ReLU) * 2; ``conv_bias`` matches Pytorch-UNet releases older than v2."""

    def __init__(self, in_channels: int, out_channels: int, mid_channels: int | None = None,
                 conv_bias: bool = False):
        super().__init__()
        mid_channels = mid_channels or out_channels
        self.double_conv = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, kernel_size=3, padding=1, bias=conv_bias),
            nn.BatchNorm2d(mid_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid_channels, out_channels, kernel_size=3, padding=1, bias=conv_bias),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.double_conv(x)


class Down(nn.Module):
    """Max-pool by 2, then a DoubleConv."""

    def __init__(self, in_channels: int, out_channels: int, conv_bias: bool = False):
        super().__init__()
        self.maxpool_conv = nn.Sequential(
            nn.MaxPool2d(2), DoubleConv(in_channels, out_channels, conv_bias=conv_bias)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.maxpool_conv(x)


def _pad_like_eager(x1: Tensor, x2: Tensor) -> Tensor:
    diff_y = x2.size(2) - x1.size(2)
    diff_x = x2.size(3) - x1.size(3)
    return F.pad(x1, [diff_x // 2, diff_x - diff_x // 2, diff_y // 2, diff_y - diff_y // 2])


@functools.cache
def _pad_scripted() -> Callable[[Tensor, Tensor], Tensor]:
    # Tracing records the sizes above as constants, which silently breaks an exported model at any other
    # input size. A scripted function keeps the size arithmetic in the traced graph.
    return torch.jit.script(_pad_like_eager)


def pad_to(x1: Tensor, x2: Tensor) -> Tensor:
    """Zero-pad ``x1`` (up-sampled decoder features) to the spatial size of the skip tensor ``x2``.

    Odd input sizes (e.g. 959 px, Carvana at scale 0.5) make the two differ by one pixel.
    """
    if torch.jit.is_tracing():
        return _pad_scripted()(x1, x2)
    return _pad_like_eager(x1, x2)


class Up(nn.Module):
    """Up-sample, pad to the skip connection, concatenate, DoubleConv."""

    def __init__(self, in_channels: int, out_channels: int, bilinear: bool = True,
                 conv_bias: bool = False):
        super().__init__()
        if bilinear:
            self.up: nn.Module = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
            self.conv = DoubleConv(in_channels, out_channels, in_channels // 2, conv_bias=conv_bias)
        else:
            self.up = nn.ConvTranspose2d(in_channels, in_channels // 2, kernel_size=2, stride=2)
            self.conv = DoubleConv(in_channels, out_channels, conv_bias=conv_bias)

    def forward(self, x1: Tensor, x2: Tensor) -> Tensor:
        x1 = pad_to(self.up(x1), x2)
        return self.conv(torch.cat([x2, x1], dim=1))


class OutConv(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class UNet(nn.Module):
    """U-Net returning logits of shape (N, n_classes, H, W) for input (N, n_channels, H, W).

    ``bilinear=False`` (transposed convolutions) is Pytorch-UNet's current default; ``bilinear=True`` is
    the variant of its released Carvana weights (17.3 M parameters at ``base_channels=64``).
    """

    def __init__(self, n_channels: int = 3, n_classes: int = 2, bilinear: bool = False,
                 base_channels: int = 64, conv_bias: bool = False):
        super().__init__()
        if n_channels < 1 or n_classes < 1:
            raise ValueError("n_channels and n_classes must be >= 1")
        if base_channels < 2 or base_channels % 2:
            raise ValueError(f"base_channels must be an even number >= 2, got {base_channels}")
        self.n_channels = n_channels
        self.n_classes = n_classes
        self.bilinear = bilinear
        self.base_channels = base_channels
        b = base_channels
        factor = 2 if bilinear else 1
        self.inc = DoubleConv(n_channels, b, conv_bias=conv_bias)
        self.down1 = Down(b, b * 2, conv_bias)
        self.down2 = Down(b * 2, b * 4, conv_bias)
        self.down3 = Down(b * 4, b * 8, conv_bias)
        self.down4 = Down(b * 8, b * 16 // factor, conv_bias)
        self.up1 = Up(b * 16, b * 8 // factor, bilinear, conv_bias)
        self.up2 = Up(b * 8, b * 4 // factor, bilinear, conv_bias)
        self.up3 = Up(b * 4, b * 2 // factor, bilinear, conv_bias)
        self.up4 = Up(b * 2, b, bilinear, conv_bias)
        self.outc = OutConv(b, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        x1 = self.inc(x)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        x4 = self.down3(x3)
        x5 = self.down4(x4)
        x = self.up1(x5, x4)
        x = self.up2(x, x3)
        x = self.up3(x, x2)
        x = self.up4(x, x1)
        return self.outc(x)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------------
# The form the ONNX export traces: same function, less memory


def _fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """Weight and bias of ``bn(conv(x))`` as one convolution (eval-mode statistics), in float64."""
    running_mean, running_var = bn.running_mean, bn.running_var
    if running_mean is None or running_var is None:
        raise ValueError("folding a BatchNorm needs its running statistics (track_running_stats=True)")
    scale = bn.weight.double() / torch.sqrt(running_var.double() + bn.eps)
    weight = conv.weight.double() * scale[:, None, None, None]
    bias = bn.bias.double() - running_mean.double() * scale
    if conv.bias is not None:
        bias = bias + conv.bias.double() * scale
    return weight, bias


def _conv_like(weight: Tensor, bias: Tensor | None, like: nn.Conv2d) -> nn.Conv2d:
    kernel_size = cast(tuple[int, int], like.kernel_size)  # Conv2d stores a 2-tuple
    padding = cast("str | tuple[int, int]", like.padding)
    conv = nn.Conv2d(weight.shape[1], weight.shape[0], kernel_size=kernel_size, padding=padding,
                     bias=bias is not None).to(device=like.weight.device, dtype=like.weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(weight.to(like.weight.dtype))
        if bias is not None and conv.bias is not None:
            conv.bias.copy_(bias.to(like.weight.dtype))
    return conv


class SplitUp(nn.Module):
    """An :class:`Up` block that never builds the concatenation: ``conv(cat([x2, x1]))`` is computed as
    ``conv_skip(x2) + conv_up(x1)`` (the convolution is linear in its input channels), with both
    BatchNorms folded into the convolutions. ONNX Runtime fuses the addition and the ReLU into
    ``conv_up``, so the decoder holds neither the concatenated tensor (the largest activation of the
    network: 2x the channels at full resolution) nor its layout-converted copy, which lowers ONNX
    Runtime's peak memory at the same speed.
    """

    def __init__(self, up: Up):
        super().__init__()
        seq = up.conv.double_conv  # Conv2d, BatchNorm2d, ReLU, Conv2d, BatchNorm2d, ReLU
        first, bn1 = cast(nn.Conv2d, seq[0]), cast(nn.BatchNorm2d, seq[1])
        second, bn2 = cast(nn.Conv2d, seq[3]), cast(nn.BatchNorm2d, seq[4])
        weight, bias = _fold_bn(first, bn1)
        skip_channels = first.in_channels // 2  # cat([x2, x1]): the skip tensor's channels come first
        self.up = up.up
        self.conv_skip = _conv_like(weight[:, :skip_channels], bias, first)
        self.conv_up = _conv_like(weight[:, skip_channels:], None, first)
        self.conv2 = _conv_like(*_fold_bn(second, bn2), second)

    def forward(self, x1: Tensor, x2: Tensor) -> Tensor:
        # The skip tensor's half first, sizing the padding from its result: the skip tensor is then dead
        # before the up-sampled map is made, so the two never coexist in memory.
        skip = self.conv_skip(x2)
        x1 = pad_to(self.up(x1), skip)
        return F.relu(self.conv2(F.relu(self.conv_up(x1) + skip)))


def export_form(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (eval mode) in the form the ONNX export traces: a :class:`UNet`'s decoder blocks
    become :class:`SplitUp`; anything else is returned as a plain eval-mode copy. Same outputs up to
    float rounding (the export's parity check compares the exported file with the original model)."""
    model = copy.deepcopy(model).eval()
    if isinstance(model, UNet):
        for name in ("up1", "up2", "up3", "up4"):
            block = getattr(model, name)
            if isinstance(block, Up):
                setattr(model, name, SplitUp(block))
    return model
