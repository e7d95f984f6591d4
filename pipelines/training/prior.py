"""Stage 1 of ``facetier train``: the face prior (StyleGAN2 generator + pSp-style encoder).

The generator and encoder are trained together as an autoencoder over W+ (reconstruction:
L1 + MS-SSIM on the aligned crops, plus a small penalty that keeps W+ rows close to one
another so the layers compress), with an optional adversarial term from a small
discriminator (non-saturating loss, lazy R1) that sharpens the decodes, and an optional identity
term: the distance between dlib's descriptors (its ResNet run in torch, :mod:`codec.dlib_resnet`)
of the crop and of its reconstruction, both taken through the fixed, differentiable warp to
dlib's 150 px chip. The verification judge uses dlib's own detection and landmarks on the
decoded face instead of that warp, and reports guards (JPEG + resize, a second network) beside it.

Runs are seeded and resumable: the batch for step ``t`` is a pure function of (seed, t), and a
checkpoint holds weights, EMA weights, optimiser states and the step.
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
from facetier.codec.encoder import EncoderConfig, StyleEncoder, to_encoder_input
from facetier.codec.face_descriptor import FIXED_CHIP_ID, FaceDescriptor
from facetier.codec.metrics import ms_ssim
from facetier.codec.stylegan import Generator, GeneratorConfig
from torch import nn
from tqdm import tqdm

log = logging.getLogger(__name__)

PRIOR_CHECKPOINT = "prior_ckpt.pt"


@dataclass(frozen=True)
class PriorTrainConfig:
    steps: int = 20000
    batch_size: int = 8
    lr: float = 1e-3
    ema_decay: float = 0.999
    w_delta_weight: float = 1e-3
    ms_ssim_weight: float = 0.5
    adv_weight: float = 0.0  # > 0 enables the discriminator
    adv_start: int = 2000
    r1_gamma: float = 1.0
    r1_every: int = 16
    checkpoint_every: int = 250
    seed: int = 0
    train_generator: bool = True  # False: encoder only, against a frozen generator (e.g. the GAN's)
    ema_start: int = 500  # the EMA copies the model until this step (its early weights are not worth averaging)
    id_weight: float = 0.0  # > 0 adds dlib's descriptor distance between crop and reconstruction
    crop_scale: float = 1.0  # the crops' framing, which places dlib's chip in them


class Discriminator(nn.Module):
    """A small residual image discriminator (StyleGAN2-like, without minibatch std)."""

    def __init__(self, size: int, base: int = 32, max_ch: int = 256) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, base, 1), nn.LeakyReLU(0.2)]
        ch, res = base, size
        while res > 4:
            nxt = min(ch * 2, max_ch)
            layers += [nn.Conv2d(ch, nxt, 3, 1, 1), nn.LeakyReLU(0.2), nn.AvgPool2d(2)]
            ch, res = nxt, res // 2
        self.body = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(ch * 16, ch), nn.LeakyReLU(0.2), nn.Linear(ch, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class PriorModel(nn.Module):
    def __init__(self, gen_cfg: GeneratorConfig, enc_cfg: EncoderConfig) -> None:
        super().__init__()
        self.generator = Generator(gen_cfg)
        self.encoder = StyleEncoder(enc_cfg)
        self.latent_avg = nn.Parameter(torch.zeros(gen_cfg.n_latent, gen_cfg.style_dim))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(to_encoder_input(x, self.encoder.config.input_size)) + self.latent_avg[None]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.encode(x)
        return self.generator(w), w


def to_tensor(batch_uint8: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(batch_uint8)).to(device).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def sample_batch(faces: np.ndarray, step: int, batch_size: int, seed: int) -> np.ndarray:
    """The training batch of ``step``: a pure function of (seed, step), so a resumed run sees the same batches."""
    rng = np.random.default_rng([seed, step])
    idx = np.sort(rng.choice(len(faces), batch_size, replace=False))
    batch = faces[idx]
    flip = rng.random(batch_size) < 0.5
    batch = np.where(flip[:, None, None, None], batch[:, :, ::-1], batch)
    return batch


def reconstruction_loss(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, cfg: PriorTrainConfig,
                        judge: FaceDescriptor | None = None) -> dict[str, torch.Tensor]:
    l1 = (x - y).abs().mean()
    ms = 1 - ms_ssim((x + 1) / 2, (y.clamp(-1, 1) + 1) / 2).mean()
    delta = ((w - w.mean(1, keepdim=True)) ** 2).mean()
    total = l1 + cfg.ms_ssim_weight * ms + cfg.w_delta_weight * delta
    out = {"l1": l1, "ms_ssim_loss": ms, "w_delta": delta}
    if judge is not None and cfg.id_weight > 0:
        out["id_dist"] = identity_distance(judge, x, y)
        total = total + cfg.id_weight * out["id_dist"]
    return {"loss": total, **out}


def identity_distance(judge: FaceDescriptor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean distance between dlib's descriptors of crops ``x`` and reconstructions ``y`` (both in [-1, 1]).

    The dlib threshold for "same person" is 0.6 on this distance."""
    with torch.no_grad():
        target = judge.embed_tensor((x + 1) * 127.5)
    return (judge.embed_tensor((y.clamp(-1, 1) + 1) * 127.5) - target).norm(dim=1).mean()


def save_checkpoint(state: dict[str, object], path: Path) -> None:
    """Write atomically: a kill mid-save never leaves a broken checkpoint behind."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm, 1 - decay)
        for be, bm in zip(ema.buffers(), model.buffers()):
            be.copy_(bm)


def train_prior(
    faces: np.ndarray,
    out_dir: Path,
    gen_cfg: GeneratorConfig,
    enc_cfg: EncoderConfig,
    cfg: PriorTrainConfig,
    device: torch.device,
    max_minutes: float | None = None,
) -> Path:
    """Train (or resume) the prior; returns the checkpoint path. Stops at ``cfg.steps`` or the time budget."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = out_dir / PRIOR_CHECKPOINT
    torch.manual_seed(cfg.seed)
    model = PriorModel(gen_cfg, enc_cfg).to(device)
    ema = copy.deepcopy(model).eval()
    disc = Discriminator(gen_cfg.size).to(device) if cfg.adv_weight > 0 else None
    if not cfg.train_generator:
        model.generator.requires_grad_(False)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, betas=(0.9, 0.99))
    opt_d = torch.optim.Adam(disc.parameters(), lr=cfg.lr, betas=(0.0, 0.99)) if disc else None
    step = 0
    if ckpt_path.exists():
        state = torch.load(ckpt_path, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        if "opt" in state:  # absent when an operator restarted from the EMA weights
            try:
                opt.load_state_dict(state["opt"])
            except ValueError:  # the trained parameters changed (e.g. --freeze-generator on a joint run)
                log.warning("the checkpoint's optimiser trained other parameters; continuing with a fresh optimiser")
        if disc is not None and "disc" in state:
            disc.load_state_dict(state["disc"])
            opt_d.load_state_dict(state["opt_d"])
        step = int(state["step"])
        log.info("resumed prior training at step %d", step)
    (out_dir / "prior_config.json").write_text(json.dumps({"generator": asdict(gen_cfg), "encoder": asdict(enc_cfg), "train": asdict(cfg)}, indent=1))
    log_file = (out_dir / "prior_log.jsonl").open("a")
    deadline = time.monotonic() + max_minutes * 60 if max_minutes else math.inf

    def save() -> None:
        state = {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": torch.tensor(step)}
        if disc is not None:
            state |= {"disc": disc.state_dict(), "opt_d": opt_d.state_dict()}
        save_checkpoint(state, ckpt_path)

    judge = FaceDescriptor(FIXED_CHIP_ID, cfg.crop_scale, device) if cfg.id_weight > 0 else None
    bar = tqdm(total=cfg.steps, initial=step, desc="prior", unit="step", mininterval=10)
    model.train()
    while step < cfg.steps and time.monotonic() < deadline:
        x = to_tensor(sample_batch(faces, step, cfg.batch_size, cfg.seed), device)
        y, w = model(x)
        losses = reconstruction_loss(x, y, w, cfg, judge)
        use_adv = disc is not None and step >= cfg.adv_start
        if use_adv:
            g_adv = F.softplus(-disc(y)).mean()
            losses["g_adv"] = g_adv
            losses["loss"] = losses["loss"] + cfg.adv_weight * g_adv
        if not torch.isfinite(losses["loss"].detach()) or (use_adv and float(losses["g_adv"].detach()) > 50):
            # a diverged discriminator (seen once on CPU at step 3500) would drag the prior with it:
            # skip this update and restart the discriminator from scratch
            log.warning("step %d: adversarial loss diverged (%.3g); resetting the discriminator", step, float(losses.get("g_adv", losses["loss"])))
            disc = Discriminator(gen_cfg.size).to(device) if disc is not None else None
            opt_d = torch.optim.Adam(disc.parameters(), lr=cfg.lr, betas=(0.0, 0.99)) if disc is not None else None
            step += 1
            continue
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        opt.step()
        if use_adv:
            d_loss = F.softplus(disc(y.detach())).mean() + F.softplus(-disc(x)).mean()
            if step % cfg.r1_every == 0:
                xr = x.detach().requires_grad_(True)
                (grad,) = torch.autograd.grad(disc(xr).sum(), xr, create_graph=True)
                d_loss = d_loss + cfg.r1_gamma / 2 * grad.pow(2).flatten(1).sum(1).mean() * cfg.r1_every
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
            losses["d_loss"] = d_loss
        ema_update(ema, model, cfg.ema_decay if step > cfg.ema_start else 0.0)
        step += 1
        bar.update(1)
        if step % 50 == 0:
            log_file.write(json.dumps({"step": step, **{k: round(float(v.detach()), 5) for k, v in losses.items()}}) + "\n")
            log_file.flush()
        if step % cfg.checkpoint_every == 0:
            save()
    save()
    bar.close()
    log_file.close()
    return ckpt_path
