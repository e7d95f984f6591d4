"""Image quality metrics on tensors in [0, 1]: PSNR, SSIM and MS-SSIM (Gaussian windows)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of (batch, C, H, W) tensors in [0, 1]."""
    mse = ((a - b) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return -10 * torch.log10(mse)


def _gauss(window: int, sigma: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    x = torch.arange(window, device=device, dtype=dtype) - (window - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _band(size: int, g: torch.Tensor) -> torch.Tensor:
    """(size, size - len(g) + 1) matrix whose product is a 'valid' 1-D convolution with ``g``."""
    out = size - len(g) + 1
    band = torch.zeros(size, out, device=g.device, dtype=g.dtype)
    for i, v in enumerate(g):
        band[torch.arange(out) + i, torch.arange(out)] = v
    return band


def _ssim_parts(a: torch.Tensor, b: torch.Tensor, window: int, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    c = a.shape[1]
    g = _gauss(window, sigma, a.device, a.dtype)
    # The five local moments blurred at once, each separable pass as one matrix product with a
    # banded matrix: a depthwise convolution is several times slower on CPU.
    stack = torch.cat([a, b, a * a, b * b, a * b], 1)
    blurred = _band(stack.shape[-2], g).T @ (stack @ _band(stack.shape[-1], g))
    mu_a, mu_b, e_aa, e_bb, e_ab = blurred.split(c, 1)
    c1, c2 = 0.01**2, 0.03**2
    s_aa = e_aa - mu_a**2
    s_bb = e_bb - mu_b**2
    s_ab = e_ab - mu_a * mu_b
    cs = (2 * s_ab + c2) / (s_aa + s_bb + c2)
    lum = (2 * mu_a * mu_b + c1) / (mu_a**2 + mu_b**2 + c1)
    return (lum * cs).flatten(1).mean(1), cs.flatten(1).mean(1)


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    return _ssim_parts(a, b, window, sigma)[0]


def ms_ssim(a: torch.Tensor, b: torch.Tensor, levels: int | None = None, window: int = 7, sigma: float = 1.5) -> torch.Tensor:
    """MS-SSIM with the standard scale weights, as many scales as the image size allows.

    128 px crops allow four scales with a 7-tap window (the reference uses five with 11 taps at
    176 px and up); the weights are renormalised over the scales used.
    """
    weights = torch.tensor([0.0448, 0.2856, 0.3001, 0.2363, 0.1333], device=a.device, dtype=a.dtype)
    max_levels = 1
    size = min(a.shape[-2:])
    while max_levels < 5 and size // 2 ** max_levels >= window:
        max_levels += 1
    levels = min(levels or max_levels, max_levels)
    w = weights[:levels] / weights[:levels].sum()
    vals = []
    for i in range(levels):
        s, cs = _ssim_parts(a, b, window, sigma)
        vals.append(s.clamp_min(1e-6) if i == levels - 1 else cs.clamp_min(1e-6))
        if i < levels - 1:
            a, b = F.avg_pool2d(a, 2), F.avg_pool2d(b, 2)
    return torch.prod(torch.stack(vals, 0) ** w[:, None], 0)
