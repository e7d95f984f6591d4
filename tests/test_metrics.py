"""Image metrics: the banded-matrix blur inside SSIM is the Gaussian convolution it replaces."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from facetier.codec.metrics import _gauss, ms_ssim, psnr, ssim


def _ssim_by_convolution(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """SSIM written the textbook way: a depthwise separable Gaussian convolution of each moment."""
    c = a.shape[1]
    g = _gauss(window, sigma, a.device, a.dtype)
    kx, ky = g.view(1, 1, 1, -1).repeat(c, 1, 1, 1), g.view(1, 1, -1, 1).repeat(c, 1, 1, 1)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(t, kx, groups=c), ky, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    s_aa, s_bb, s_ab = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2, blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    return (((2 * mu_a * mu_b + c1) / (mu_a**2 + mu_b**2 + c1)) * ((2 * s_ab + c2) / (s_aa + s_bb + c2))).flatten(1).mean(1)


def test_ssim_equals_the_convolution_definition() -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(3, 3, 40, 56, generator=gen)
    b = (a + 0.2 * torch.randn(a.shape, generator=gen)).clamp(0, 1)
    torch.testing.assert_close(ssim(a, b), _ssim_by_convolution(a, b), atol=1e-5, rtol=0)
    torch.testing.assert_close(ssim(a, b, window=7), _ssim_by_convolution(a, b, window=7), atol=1e-5, rtol=0)


def test_identical_images_score_one_and_noise_lowers_both_metrics() -> None:
    a = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ms_ssim(a, a), torch.ones(2), atol=1e-5, rtol=0)
    noisy = (a + 0.1 * torch.randn(a.shape, generator=torch.Generator().manual_seed(2))).clamp(0, 1)
    noisier = (a + 0.3 * torch.randn(a.shape, generator=torch.Generator().manual_seed(2))).clamp(0, 1)
    assert (ms_ssim(noisier, a) < ms_ssim(noisy, a)).all() and (ms_ssim(noisy, a) < 1).all()
    assert (psnr(noisier, a) < psnr(noisy, a)).all()


def test_ms_ssim_keeps_gradients() -> None:
    a = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    b = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(4)).requires_grad_(True)
    (1 - ms_ssim(b, a)).sum().backward()
    assert b.grad is not None and b.grad.abs().sum() > 0
