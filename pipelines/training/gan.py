"""``facetier train gan``: the generator as the paper has it, a StyleGAN2 trained adversarially.

This is the other recipe for the prior: the generator learns from random latents alone (mapping
network, style mixing, non-saturating logistic loss, lazy R1 on real images, lazy path-length
regularisation, EMA of the generator), and the encoder is trained afterwards against the frozen
generator (``facetier train prior --freeze-generator``, which starts from this stage's EMA
generator and its mean W). The shipped prior is the joint autoencoder of ``train_prior``; this
stage exists so the two can be compared on the same data and compute, and so a GPU session can
train the adversarial prior the paper relies on.

Two simplifications against the official StyleGAN2 code: the path-length term differentiates
with respect to W+ and so regularises the synthesis network only (not the mapping network), and
the lazy regularisers do not rescale Adam's learning rate and betas. The logged ``d_loss``
includes the R1 term on the steps that apply it.

Runs are seeded and resumable: the real batch for step ``t`` is a pure function of (seed, t)
(``sample_batch``), and the checkpoint holds G, D, the EMA generator, both optimisers, the
path-length mean and the step.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from facetier.codec.encoder import EncoderConfig
from facetier.codec.stylegan import Generator, GeneratorConfig
from facetier.pipelines.training.prior import (
    PRIOR_CHECKPOINT,
    Discriminator,
    PriorModel,
    ema_update,
    sample_batch,
    save_checkpoint,
    to_tensor,
)
from tqdm import tqdm

from facetier.errors import ConfigError

log = logging.getLogger(__name__)

GAN_CHECKPOINT = "gan_ckpt.pt"


@dataclass(frozen=True)
class GanTrainConfig:
    steps: int = 100000
    batch_size: int = 8
    lr: float = 2.5e-4  # StyleGAN2's 2e-3 diverged within 150 steps with this plain-convolution discriminator
    ema_decay: float = 0.999
    mixing_prob: float = 0.9
    r1_gamma: float = 1.0
    r1_every: int = 16
    pl_weight: float = 2.0
    pl_every: int = 4
    pl_decay: float = 0.01
    checkpoint_every: int = 250
    seed: int = 0
    ema_start: int = 500


def random_wplus(generator: Generator, batch: int, mixing_prob: float, rng: torch.Generator) -> torch.Tensor:
    """W+ from random latents through the mapping network, with style mixing at a random row."""
    n, dim = generator.n_latent, generator.config.style_dim
    device = next(generator.parameters()).device
    z = torch.randn(2, batch, dim, generator=rng).to(device)
    w1, w2 = generator.mapping(z[0]), generator.mapping(z[1])
    wplus = w1[:, None].repeat(1, n, 1)
    if float(torch.rand((), generator=rng)) < mixing_prob:
        cut = int(torch.randint(1, n, (), generator=rng))
        wplus = torch.cat([wplus[:, :cut], w2[:, None].repeat(1, n - cut, 1)], 1)
    return wplus


def path_length_penalty(generator: Generator, wplus: torch.Tensor, pl_mean: torch.Tensor, decay: float,
                        rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """StyleGAN2's path-length regulariser: (|J^T y| - running mean)^2, and the updated mean."""
    wplus = wplus.detach().requires_grad_(True)
    img = generator(wplus)
    noise = torch.randn(img.shape, generator=rng).to(img.device) / math.sqrt(img.shape[2] * img.shape[3])
    (grad,) = torch.autograd.grad((img * noise).sum(), wplus, create_graph=True)
    lengths = grad.pow(2).sum(2).mean(1).sqrt()
    new_mean = pl_mean + decay * (lengths.detach().mean() - pl_mean)
    return (lengths - new_mean).pow(2).mean(), new_mean


def train_gan(faces: np.ndarray, out_dir: Path, gen_cfg: GeneratorConfig, cfg: GanTrainConfig, device: torch.device,
              max_minutes: float | None = None) -> Path:
    """Train (or resume) the adversarial generator; returns the checkpoint path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = out_dir / GAN_CHECKPOINT
    torch.manual_seed(cfg.seed)
    gen = Generator(gen_cfg).to(device)
    disc = Discriminator(gen_cfg.size).to(device)
    ema = copy.deepcopy(gen).eval()
    opt_g = torch.optim.Adam(gen.parameters(), lr=cfg.lr, betas=(0.0, 0.99))
    opt_d = torch.optim.Adam(disc.parameters(), lr=cfg.lr, betas=(0.0, 0.99))
    pl_mean = torch.zeros((), device=device)
    w_avg = torch.zeros(gen_cfg.style_dim, device=device)
    step = 0
    if ckpt_path.exists():
        state = torch.load(ckpt_path, map_location=device, weights_only=True)
        gen.load_state_dict(state["generator"])
        disc.load_state_dict(state["disc"])
        ema.load_state_dict(state["ema"])
        opt_g.load_state_dict(state["opt_g"])
        opt_d.load_state_dict(state["opt_d"])
        pl_mean, w_avg, step = state["pl_mean"].to(device), state["w_avg"].to(device), int(state["step"])
        log.info("resumed GAN training at step %d", step)
    (out_dir / "gan_config.json").write_text(json.dumps({"generator": asdict(gen_cfg), "train": asdict(cfg)}, indent=1))
    log_file = (out_dir / "gan_log.jsonl").open("a")
    deadline = time.monotonic() + max_minutes * 60 if max_minutes else math.inf

    def save() -> None:
        state = {"generator": gen.state_dict(), "disc": disc.state_dict(), "ema": ema.state_dict(), "opt_g": opt_g.state_dict(),
                 "opt_d": opt_d.state_dict(), "pl_mean": pl_mean, "w_avg": w_avg, "step": torch.tensor(step)}
        save_checkpoint(state, ckpt_path)

    bar = tqdm(total=cfg.steps, initial=step, desc="gan", unit="step", mininterval=10)
    while step < cfg.steps and time.monotonic() < deadline:
        rng = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        real = to_tensor(sample_batch(faces, step, cfg.batch_size, cfg.seed), device)
        logs: dict[str, float] = {}
        # discriminator
        with torch.no_grad():
            fake = gen(random_wplus(gen, cfg.batch_size, cfg.mixing_prob, rng))
        d_loss = F.softplus(disc(fake)).mean() + F.softplus(-disc(real)).mean()
        if step % cfg.r1_every == 0:
            xr = real.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(disc(xr).sum(), xr, create_graph=True)
            r1 = grad.pow(2).flatten(1).sum(1).mean()
            d_loss = d_loss + cfg.r1_gamma / 2 * r1 * cfg.r1_every
            logs["r1"] = float(r1.detach())
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        # generator
        wplus = random_wplus(gen, cfg.batch_size, cfg.mixing_prob, rng)
        g_loss = F.softplus(-disc(gen(wplus))).mean()
        logs |= {"d_loss": float(d_loss.detach()), "g_loss": float(g_loss.detach())}
        if step % cfg.pl_every == 0:
            pl, pl_mean = path_length_penalty(gen, wplus[: max(1, cfg.batch_size // 2)], pl_mean, cfg.pl_decay, rng)
            g_loss = g_loss + cfg.pl_weight * cfg.pl_every * pl
            logs["pl"] = float(pl.detach())
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
        with torch.no_grad():
            w_avg.lerp_(wplus[:, 0].mean(0), 0.005)
        ema_update(ema, gen, cfg.ema_decay if step > cfg.ema_start else 0.0)
        step += 1
        bar.update(1)
        if step % 50 == 0:
            log_file.write(json.dumps({"step": step, **{k: round(v, 5) for k, v in logs.items()}}) + "\n")
            log_file.flush()
        if step % cfg.checkpoint_every == 0:
            save()
    save()
    bar.close()
    log_file.close()
    return ckpt_path


def prior_from_gan(work: Path, gen_cfg: GeneratorConfig, enc_cfg: EncoderConfig) -> Path:
    """Start ``train_prior --freeze-generator``: the GAN's EMA generator, a fresh encoder, W+ mean = the GAN's mean W."""
    gan_path, ckpt_path = work / GAN_CHECKPOINT, work / PRIOR_CHECKPOINT
    if not gan_path.exists():
        raise ConfigError(f"--freeze-generator needs a GAN to start from, and {gan_path} does not exist; run `facetier train gan` first")
    state = torch.load(gan_path, map_location="cpu", weights_only=True)
    model = PriorModel(gen_cfg, enc_cfg)
    model.generator.load_state_dict(state["ema"])
    with torch.no_grad():
        model.latent_avg.copy_(state["w_avg"][None].repeat(gen_cfg.n_latent, 1))
    save_checkpoint({"model": model.state_dict(), "ema": model.state_dict(), "step": torch.tensor(0)}, ckpt_path)
    log.info("encoder training starts from the GAN at step %d (%s)", int(state["step"]), gan_path)
    return ckpt_path
