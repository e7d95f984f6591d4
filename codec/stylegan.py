"""StyleGAN2 generator in plain PyTorch (no custom CUDA ops), CPU and CUDA.

Module and parameter names follow the widely used rosinality ``stylegan2-pytorch`` layout, so a
``g_ema`` state dict from an FFHQ checkpoint (and pSp / e4e ``decoder.*`` weights) loads as is.
Modulated convolutions are computed by scaling activations rather than building per-sample
weights; it is the same function as StyleGAN2's fused form and much faster on CPUs.
Noise inputs are fixed buffers, so decoding is deterministic.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

BLUR_KERNEL = (1, 3, 3, 1)


@dataclass(frozen=True)
class GeneratorConfig:
    size: int = 128
    style_dim: int = 256
    n_mlp: int = 8
    channels: dict[int, int] = field(default_factory=lambda: {4: 256, 8: 256, 16: 128, 32: 64, 64: 32, 128: 16})

    @property
    def log_size(self) -> int:
        return int(math.log2(self.size))

    @property
    def n_latent(self) -> int:
        return self.log_size * 2 - 2

    @staticmethod
    def ffhq(size: int = 1024, channel_multiplier: int = 2) -> GeneratorConfig:
        cm = channel_multiplier
        ch = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256 * cm, 128: 128 * cm, 256: 64 * cm, 512: 32 * cm, 1024: 16 * cm}
        return GeneratorConfig(size=size, style_dim=512, n_mlp=8, channels={k: v for k, v in ch.items() if k <= size})


def make_kernel(k: tuple[int, ...]) -> torch.Tensor:
    t = torch.tensor(k, dtype=torch.float32)
    t = t[None, :] * t[:, None]
    return t / t.sum()


def upfirdn2d(x: torch.Tensor, kernel: torch.Tensor, up: int = 1, down: int = 1, pad: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """Upsample by zero insertion, pad, FIR-filter, downsample (the reference formulation)."""
    b, c, h, w = x.shape
    if up > 1:
        x = x.reshape(b, c, h, 1, w, 1)
        x = F.pad(x, (0, up - 1, 0, 0, 0, up - 1))
        x = x.reshape(b, c, h * up, w * up)
    p0, p1 = pad
    k = torch.flip(kernel, [0, 1]).to(x)[None, None].repeat(c, 1, 1, 1)
    if p0 == p1 >= 0:  # the convolution pads with zeros itself, without a padded copy of x
        x = F.conv2d(x, k, groups=c, padding=p0)
        return x[:, :, ::down, ::down] if down > 1 else x
    x = F.pad(x, (max(p0, 0), max(p1, 0), max(p0, 0), max(p1, 0)))
    x = x[:, :, max(-p0, 0): x.shape[2] - max(-p1, 0), max(-p0, 0): x.shape[3] - max(-p1, 0)]
    x = F.conv2d(x, k, groups=c)
    return x[:, :, ::down, ::down] if down > 1 else x


class PixelNorm(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(torch.mean(x**2, dim=1, keepdim=True) + 1e-8)


class Blur(nn.Module):
    def __init__(self, kernel: tuple[int, ...], pad: tuple[int, int], upsample_factor: int = 1) -> None:
        super().__init__()
        k = make_kernel(kernel)
        if upsample_factor > 1:
            k = k * upsample_factor**2
        self.register_buffer("kernel", k)
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upfirdn2d(x, self.kernel, pad=self.pad)


class Upsample(nn.Module):
    def __init__(self, kernel: tuple[int, ...], factor: int = 2) -> None:
        super().__init__()
        self.factor = factor
        self.register_buffer("kernel", make_kernel(kernel) * factor**2)
        p = self.kernel.shape[0] - factor
        self.pad = ((p + 1) // 2 + factor - 1, p // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upfirdn2d(x, self.kernel, up=self.factor, pad=self.pad)


class EqualLinear(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, bias_init: float = 0.0, lr_mul: float = 1.0, activation: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim).div_(lr_mul))
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init)))
        self.scale = (1 / math.sqrt(in_dim)) * lr_mul
        self.lr_mul = lr_mul
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation:
            return F.leaky_relu(F.linear(x, self.weight * self.scale) + self.bias * self.lr_mul, 0.2) * math.sqrt(2)
        return F.linear(x, self.weight * self.scale, self.bias * self.lr_mul)


class ModulatedConv2d(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, style_dim: int, demodulate: bool = True, upsample: bool = False) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.in_ch, self.out_ch = in_ch, out_ch
        self.upsample = upsample
        self.demodulate = demodulate
        if upsample:
            factor = 2
            p = (len(BLUR_KERNEL) - factor) - (kernel_size - 1)
            self.blur = Blur(BLUR_KERNEL, pad=((p + 1) // 2 + factor - 1, p // 2 + 1), upsample_factor=factor)
        self.scale = 1 / math.sqrt(in_ch * kernel_size**2)
        self.padding = kernel_size // 2
        self.weight = nn.Parameter(torch.randn(1, out_ch, in_ch, kernel_size, kernel_size))
        self.modulation = EqualLinear(style_dim, in_ch, bias_init=1)

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        x, d = self.unnormalised(x, style)
        return x if d is None else x * d

    def unnormalised(self, x: torch.Tensor, style: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The convolution of the modulated input and the demodulation factors (b, out, 1, 1) to scale
        it by (None without demodulation), apart so a caller can fuse the scaling with what follows."""
        b = x.shape[0]
        s = self.modulation(style)  # (b, in)
        w = self.weight[0] * self.scale  # (out, in, k, k)
        x = x * s[:, :, None, None]
        if self.upsample:
            x = F.conv_transpose2d(x, w.transpose(0, 1), stride=2)
            x = self.blur(x)
        else:
            x = F.conv2d(x, w, padding=self.padding)
        if not self.demodulate:
            return x, None
        # Same as normalising each sample's modulated weight to unit norm.
        d = torch.rsqrt((s[:, None, :] ** 2 * w.pow(2).sum([2, 3])[None]).sum(2) + 1e-8)  # (b, out)
        return x, d.view(b, -1, 1, 1)


class NoiseInjection(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return x + self.weight * noise


class FusedLeakyReLU(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(x + self.bias.view(1, -1, 1, 1), 0.2) * math.sqrt(2)


class ConstantInput(nn.Module):
    def __init__(self, channels: int, size: int = 4) -> None:
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channels, size, size))

    def forward(self, batch: int) -> torch.Tensor:
        return self.input.repeat(batch, 1, 1, 1)


class StyledConv(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, style_dim: int, upsample: bool = False) -> None:
        super().__init__()
        self.conv = ModulatedConv2d(in_ch, out_ch, kernel_size, style_dim, upsample=upsample)
        self.noise = NoiseInjection()
        self.activate = FusedLeakyReLU(out_ch)

    def forward(self, x: torch.Tensor, style: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return self.activate(self.noise(self.conv(x, style), noise))
        # Inference: the same function in four passes over the activations instead of six (on CPUs
        # these elementwise passes cost as much as the convolutions). leaky_relu(y) * √2 equals
        # leaky_relu(√2 · y), so the gain moves into the demodulation and the noise + bias map.
        y, d = self.conv.unnormalised(x, style)
        gain = math.sqrt(2)
        offset = (self.activate.bias.view(1, -1, 1, 1) + self.noise.weight * noise) * gain  # (1, out, H, W): no batch
        # in y's memory format: adding an NCHW map to NHWC activations took 7x a same-layout pass
        offset = offset.contiguous(memory_format=torch.channels_last if y.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format)
        y = y.mul_(gain if d is None else d * gain).add_(offset)  # in place: y keeps its memory format
        return F.leaky_relu_(y, 0.2)


class ToRGB(nn.Module):
    def __init__(self, in_ch: int, style_dim: int, upsample: bool = True) -> None:
        super().__init__()
        if upsample:
            self.upsample = Upsample(BLUR_KERNEL)
        self.conv = ModulatedConv2d(in_ch, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x: torch.Tensor, style: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        out = self.conv(x, style) + self.bias
        if skip is not None:
            out = out + self.upsample(skip)
        return out


class Generator(nn.Module):
    """Maps W+ (batch, n_latent, style_dim) to images in [-1, 1] (batch, 3, size, size)."""

    def __init__(self, config: GeneratorConfig) -> None:
        super().__init__()
        self.config = config
        self.memory_format = torch.contiguous_format  # of the activations; the runtime prior picks NHWC on CPUs
        ch = config.channels
        self.style = nn.Sequential(PixelNorm(), *[EqualLinear(config.style_dim, config.style_dim, lr_mul=0.01, activation=True) for _ in range(config.n_mlp)])
        self.input = ConstantInput(ch[4])
        self.conv1 = StyledConv(ch[4], ch[4], 3, config.style_dim)
        self.to_rgb1 = ToRGB(ch[4], config.style_dim, upsample=False)
        self.convs = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        self.noises = nn.Module()
        gen = torch.Generator().manual_seed(0)  # fixed noise: decoding must be deterministic
        for i in range(config.log_size * 2 - 3):
            res = (i + 5) // 2
            self.noises.register_buffer(f"noise_{i}", torch.randn(1, 1, 2**res, 2**res, generator=gen))
        in_ch = ch[4]
        for i in range(3, config.log_size + 1):
            out_ch = ch[2**i]
            self.convs.append(StyledConv(in_ch, out_ch, 3, config.style_dim, upsample=True))
            self.convs.append(StyledConv(out_ch, out_ch, 3, config.style_dim))
            self.to_rgbs.append(ToRGB(out_ch, config.style_dim))
            in_ch = out_ch

    @property
    def n_latent(self) -> int:
        return self.config.n_latent

    def mapping(self, z: torch.Tensor) -> torch.Tensor:
        return self.style(z)

    def forward(self, wplus: torch.Tensor) -> torch.Tensor:
        b = wplus.shape[0]
        noise = [getattr(self.noises, f"noise_{i}") for i in range(self.config.log_size * 2 - 3)]
        out = self.input(b).contiguous(memory_format=self.memory_format)
        out = self.conv1(out, wplus[:, 0], noise[0])
        skip = self.to_rgb1(out, wplus[:, 1])
        i = 1
        for conv_up, conv, n1, n2, to_rgb in zip(self.convs[::2], self.convs[1::2], noise[1::2], noise[2::2], self.to_rgbs):
            out = conv_up(out, wplus[:, i], n1)
            out = conv(out, wplus[:, i + 1], n2)
            skip = to_rgb(out, wplus[:, i + 2], skip)
            i += 2
        return skip
