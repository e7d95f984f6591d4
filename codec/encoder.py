"""pSp-style encoder: image -> W+ (one style vector per generator layer).

An IR-SE residual backbone feeds a three-level feature pyramid; coarse W+ rows are read from
the deepest features, middle rows from the middle level and fine rows from the shallowest, as
in pSp's ``GradualStyleEncoder``. Parameter names match pSp / e4e, so their IR-SE50 encoders
load with :func:`EncoderConfig.psp`; facetier's embedded encoder is the same design, narrower.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from facetier.codec.stylegan import EqualLinear
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


@dataclass(frozen=True)
class EncoderConfig:
    input_size: int = 128
    n_styles: int = 12
    style_dim: int = 256
    stem_channels: int = 32
    stage_channels: tuple[int, ...] = (32, 48, 64, 96)
    stage_units: tuple[int, ...] = (1, 1, 2, 1)
    block_channels: int = 64  # width of the map-to-style conv stacks
    coarse_end: int = 3  # W+ rows [0, coarse_end) read the deepest features
    middle_end: int = 7
    mode: Literal["psp", "e4e"] = "psp"

    @staticmethod
    def psp(stylegan_size: int = 1024, mode: Literal["psp", "e4e"] = "psp") -> EncoderConfig:
        return EncoderConfig(
            input_size=256,
            n_styles=2 * int(math.log2(stylegan_size)) - 2,
            style_dim=512,
            stem_channels=64,
            stage_channels=(64, 128, 256, 512),
            stage_units=(3, 4, 14, 3),
            block_channels=512,
            mode=mode,
        )


class SEModule(nn.Module):
    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, max(1, channels // reduction), 1, bias=False)
        self.fc2 = nn.Conv2d(max(1, channels // reduction), channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(s))))


class BottleneckIRSE(nn.Module):
    def __init__(self, in_ch: int, depth: int, stride: int) -> None:
        super().__init__()
        if in_ch == depth:
            self.shortcut_layer: nn.Module = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(nn.Conv2d(in_ch, depth, 1, stride, bias=False), nn.BatchNorm2d(depth))
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_ch),
            nn.Conv2d(in_ch, depth, 3, 1, 1, bias=False),
            nn.PReLU(depth),
            nn.Conv2d(depth, depth, 3, stride, 1, bias=False),
            nn.BatchNorm2d(depth),
            SEModule(depth),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut_layer(x) + self.res_layer(x)


class GradualStyleBlock(nn.Module):
    """Strided convs down to 1x1, then a linear layer to one style vector."""

    def __init__(self, in_ch: int, out_ch: int, spatial: int, style_dim: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_ch, out_ch, 3, 2, 1), nn.LeakyReLU()]
        for _ in range(int(math.log2(spatial)) - 1):
            layers += [nn.Conv2d(out_ch, out_ch, 3, 2, 1), nn.LeakyReLU()]
        self.convs = nn.Sequential(*layers)
        self.linear = EqualLinear(out_ch, style_dim)
        self.out_ch = out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.convs(x).reshape(x.shape[0], self.out_ch))


def _upsample_add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=y.shape[2:], mode="bilinear", align_corners=True) + y


def to_encoder_input(x: torch.Tensor, size: int) -> torch.Tensor:
    """Images in [-1, 1] at the encoder's input size: pSp reads 256 px whatever the generator's size."""
    return x if x.shape[-1] == size else F.interpolate(x, size=size, mode="area")


class StyleEncoder(nn.Module):
    """Image in [-1, 1] (batch, 3, S, S) -> W+ offsets (batch, n_styles, style_dim)."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.input_layer = nn.Sequential(nn.Conv2d(3, c.stem_channels, 3, 1, 1, bias=False), nn.BatchNorm2d(c.stem_channels), nn.PReLU(c.stem_channels))
        units: list[nn.Module] = []
        in_ch = c.stem_channels
        self._taps: list[int] = []
        for depth, n in zip(c.stage_channels, c.stage_units):
            units.append(BottleneckIRSE(in_ch, depth, 2))
            units += [BottleneckIRSE(depth, depth, 1) for _ in range(n - 1)]
            in_ch = depth
            self._taps.append(len(units) - 1)
        self.body = nn.Sequential(*units)
        feat = c.stage_channels[-1]
        deepest = c.input_size // 2 ** len(c.stage_channels)
        spatial = [deepest if i < c.coarse_end else deepest * 2 if i < c.middle_end else deepest * 4 for i in range(c.n_styles)]
        self.styles = nn.ModuleList(GradualStyleBlock(feat, c.block_channels, s, c.style_dim) for s in spatial)
        self.latlayer1 = nn.Conv2d(c.stage_channels[-2], feat, 1)
        self.latlayer2 = nn.Conv2d(c.stage_channels[-3], feat, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_layer(x)
        feats = {}
        for i, unit in enumerate(self.body):
            x = unit(x)
            if i in self._taps:
                feats[i] = x
        c1, c2, c3 = (feats[t] for t in self._taps[-3:])
        p2 = _upsample_add(c3, self.latlayer1(c2))
        p1 = _upsample_add(p2, self.latlayer2(c1))
        level = [c3 if i < self.config.coarse_end else p2 if i < self.config.middle_end else p1 for i in range(self.config.n_styles)]
        if self.config.mode == "e4e":
            # e4e: one base style for every row plus a per-row delta
            w0 = self.styles[0](c3)
            deltas = [torch.zeros_like(w0)] + [self.styles[i](level[i]) for i in range(1, self.config.n_styles)]
            return w0[:, None] + torch.stack(deltas, 1)
        return torch.stack([s(f) for s, f in zip(self.styles, level)], 1)


class Subsample(nn.Module):
    """``MaxPool2d(1, stride)``, the identity shortcut of a strided unit, as the slice it is."""

    def __init__(self, stride: int) -> None:
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, :: self.stride, :: self.stride]


def _fold(conv_bn: nn.Sequential) -> nn.Sequential:
    """(conv, batch norm, rest...) with the batch norm folded into the convolution."""
    conv, bn, *rest = conv_bn
    return nn.Sequential(fuse_conv_bn_eval(conv, bn), *rest)


def inference_encoder(encoder: StyleEncoder) -> StyleEncoder:
    """An eval-mode copy for inference: each batch norm that follows a convolution folded into it and
    stride-only shortcuts sliced. The same function up to float rounding (about 1e-6); the batch
    norms that precede a padded convolution stay, since folding them would change the borders."""
    enc = copy.deepcopy(encoder).eval()
    enc.input_layer = _fold(enc.input_layer)
    for unit in enc.body:
        if isinstance(unit.shortcut_layer, nn.MaxPool2d):
            unit.shortcut_layer = Subsample(int(unit.shortcut_layer.stride))
        else:
            unit.shortcut_layer = _fold(unit.shortcut_layer)
        bn_in, conv1, act, conv2, bn_out, se = unit.res_layer
        unit.res_layer = nn.Sequential(bn_in, conv1, act, fuse_conv_bn_eval(conv2, bn_out), se)
    return enc
