"""Stage 2 of ``facetier train``: per-layer transforms and conditional entropy models.

Each generative layer learns a linear analysis/synthesis pair (initialised from PCA of its
W+ rows) and a small MLP that predicts the mean and scale of its latents from the rounded
latents of the layers below. The objective is rate + lambda * distortion, with rate the
negative log2-likelihood of uniformly-noised latents under a discretised Gaussian and
distortion the MSE of the reconstructed W+ rows (normalised by the W+ variance). Export turns
the MLPs into int64 fixed-point networks (see ``codec/entropy.py``).
"""
from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from facetier.codec import entropy as ent
from facetier.codec.layers import LINEAR, LayerPlan
from facetier.codec.semantic import SemanticNet, principal_axes
from facetier.pipelines.training.semantic_fit import PixelInputs, encode_all
from torch import nn
from tqdm import tqdm

from facetier.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EntropyTrainConfig:
    steps: int = 3000
    batch_size: int = 256
    lr: float = 3e-3
    hidden: int = 64
    lambdas: tuple[float, ...] = (3000.0, 6000.0, 12000.0)  # per layer, bits per unit of normalised MSE
    seed: int = 0


class TrainableLayer(nn.Module):
    def __init__(self, d: int, k: int, context: int, hidden: int, mu: torch.Tensor, pca: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mu", mu)
        init_scale = 4.0 / std[:k].clamp_min(1e-6)
        self.analysis = nn.Parameter(pca[:, :k] * init_scale[None])
        self.synthesis = nn.Parameter((pca[:, :k] / init_scale[None]).T.contiguous())
        with warnings.catch_warnings():  # the base layer has no context: a 0-input layer is its bias
            warnings.simplefilter("ignore")
            self.fc1 = nn.Linear(context, hidden)
        self.mean = nn.Linear(hidden, k)
        self.log_scale = nn.Linear(hidden, k)
        nn.init.zeros_(self.mean.weight)
        nn.init.zeros_(self.mean.bias)
        nn.init.zeros_(self.log_scale.weight)
        nn.init.constant_(self.log_scale.bias, math.log(4.0))
        if context == 0:
            nn.init.constant_(self.fc1.bias, 1.0)

    def params(self, ctx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.relu(self.fc1(ctx))
        return self.mean(h), self.log_scale(h).clamp(math.log(ent.SCALE_MIN), math.log(ent.SCALE_MAX))

    def forward(self, w: torch.Tensor, ctx: torch.Tensor, noisy: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        y = (w - self.mu) @ self.analysis
        y_hat = y + torch.empty_like(y).uniform_(-0.5, 0.5) if noisy else torch.round(y)
        mean, log_scale = self.params(ctx)
        scale = log_scale.exp()
        normal = torch.distributions.Normal(mean, scale)
        p = normal.cdf(y_hat + 0.5) - normal.cdf(y_hat - 0.5)
        bits = -torch.log2(p.clamp_min(1e-9)).sum(1)
        w_hat = self.mu + y_hat @ self.synthesis
        return bits, w_hat, y


def train_entropy(wplus: np.ndarray, plan: LayerPlan, cfg: EntropyTrainConfig, semantic: SemanticNet | None = None,
                  semantic_inputs: PixelInputs | None = None) -> list[TrainableLayer]:
    """Fit the linear layers on W+ codes (n, n_latent, style_dim) of training faces.

    With a semantic base layer (already trained), the linear layers code what its rounded code
    leaves out of their rows, and their entropy models are conditioned on its symbols.
    """
    torch.manual_seed(cfg.seed)
    w = torch.from_numpy(wplus.astype(np.float32))
    specs = [s for s in plan.layers if s.kind == LINEAR]
    base_ctx = torch.zeros(len(w), 0)
    # distortion is normalised by the variance of the rows themselves, residual or not
    var = torch.stack([w[:, list(spec.rows)].reshape(len(w), -1).var(0).mean() for spec in specs])
    if plan.is_semantic:
        if semantic is None:
            raise ConfigError("a semantic layer plan needs the trained semantic network")
        with torch.no_grad():
            flat_w = w.reshape(len(w), -1)
            base_ctx = torch.round(encode_all(semantic, flat_w, semantic_inputs or PixelInputs(None, None)))
            w = w - semantic.decode(base_ctx).reshape(w.shape)
    flat = [w[:, list(spec.rows)].reshape(len(w), -1) for spec in specs]
    lambdas = cfg.lambdas[len(plan.layers) - len(specs):]
    layers = []
    context = base_ctx.shape[1]
    for spec, f in zip(specs, flat):
        mu = f.mean(0)
        basis, std = principal_axes(f - mu, spec.latent_dim, cfg.seed)
        layers.append(TrainableLayer(f.shape[1], spec.latent_dim, context, cfg.hidden, mu, basis, std))
        context += spec.latent_dim
    opt = torch.optim.Adam([p for layer in layers for p in layer.parameters()], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    gen = torch.Generator().manual_seed(cfg.seed)
    for step in tqdm(range(cfg.steps), desc="entropy", unit="step", mininterval=5):
        idx = torch.randint(0, len(w), (cfg.batch_size,), generator=gen)
        ctx = base_ctx[idx]
        loss = 0.0
        for layer, f, lam, v in zip(layers, flat, lambdas, var):
            bits, w_hat, y = layer(f[idx], ctx, noisy=True)
            dist = ((w_hat - f[idx]) ** 2).mean(1) / v
            loss = loss + (bits + lam * dist).mean()
            ctx = torch.cat([ctx, torch.round(y).detach()], 1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return layers


def _fixed(t: torch.Tensor, scale_bits: int) -> torch.Tensor:
    return torch.round(t.double() * (1 << scale_bits)).to(torch.int64)


def export_layers(layers: list[TrainableLayer], plan: LayerPlan) -> dict[str, torch.Tensor]:
    """Tensors for the bundle: float transforms and fixed-point conditioning networks."""
    out: dict[str, torch.Tensor] = {"entropy_tables": torch.from_numpy(ent.build_frequency_tables()).to(torch.int32)}
    f = ent.FRAC_BITS
    step = ent.log_scale_step()
    for spec, layer in zip([s for s in plan.layers if s.kind == LINEAR], layers):
        p = f"entropy.{spec.name}."
        out[p + "mu"] = layer.mu.detach().float()
        out[p + "analysis"] = layer.analysis.detach().float()
        out[p + "synthesis"] = layer.synthesis.detach().float()
        out[p + "w1"] = _fixed(layer.fc1.weight.detach().T, f)
        out[p + "b1"] = _fixed(layer.fc1.bias.detach(), f)
        out[p + "wm"] = _fixed(layer.mean.weight.detach().T * ent.MEAN_STEPS, f)
        out[p + "bm"] = _fixed(layer.mean.bias.detach() * ent.MEAN_STEPS, 2 * f)
        # scale index = (log_scale - log(SCALE_MIN)) / step, rounded by the integer network
        out[p + "ws"] = _fixed(layer.log_scale.weight.detach().T / step, f)
        out[p + "bs"] = _fixed((layer.log_scale.bias.detach() - math.log(ent.SCALE_MIN)) / step, 2 * f)
    return out
