"""``facetier eval-prior``: how well a trained prior reconstructs unseen faces, before any layer coding.

For each ``facetier train`` work folder (its ``prior_ckpt.pt``, EMA weights): PSNR, MS-SSIM and
dlib's identity distance between the aligned crop and G(E(crop)). With ``--invert-steps N`` it
also optimises each face's W+ for N steps from the encoder's answer (L1 + MS-SSIM against the
crop, generator fixed): the gap between the two rows is what a better encoder could win, the
second row is what the generator can render at all. This separates the two parts of the prior
that ``facetier measure`` (which also includes the layers' quantisation) cannot.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from facetier.codec.align import FaceDetector, align_faces
from facetier.codec.checkpoints import (
    encoder_config_from_json,
    generator_config_from_json,
)
from facetier.codec.encoder import EncoderConfig
from facetier.codec.face_descriptor import DETECTED_CHIP_ID, FaceDescriptor
from facetier.codec.metrics import ms_ssim, psnr
from facetier.codec.stylegan import GeneratorConfig
from facetier.pipelines.evaluation.protocol import (
    EVAL_FOLDS,
    SAME_PERSON,
    Pair,
    first_faces,
    lfw_crops,
    save_gallery,
    select_pairs,
    verification,
)
from facetier.pipelines.training.bundles import EMBEDDED_ALIGNMENT, load_prior
from facetier.pipelines.training.prior import (
    PRIOR_CHECKPOINT,
    PriorModel,
    PriorTrainConfig,
    reconstruction_loss,
    to_tensor,
)
from tqdm import tqdm

from facetier.errors import ConfigError

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class PriorStats:
    work: str
    step: int
    method: str  # "encoder" or "inverted-<steps>"
    psnr_db: float
    ms_ssim: float
    dlib_distance: float  # mean distance between the crop's and the reconstruction's embedding
    same_person: float  # share of reconstructions dlib still calls the same person
    lfw_accuracy: float | None = None  # LFW verification with both faces reconstructed (with --lfw)


def _as_uint8(images: torch.Tensor) -> np.ndarray:
    return images.clamp(-1, 1).add(1).div(2).mul(255).round().byte().permute(0, 2, 3, 1).numpy()


INVERSION_LOSS = PriorTrainConfig(w_delta_weight=0.0)  # the prior's reconstruction loss, without its W+ compressibility term


def invert(model: PriorModel, x: torch.Tensor, steps: int, lr: float = 0.01) -> torch.Tensor:
    """Per-face W+ optimisation from the encoder's W+ (the generator stays fixed)."""
    with torch.no_grad():
        w = model.encode(x)
    w = w.clone().requires_grad_(True)
    opt = torch.optim.Adam([w], lr=lr)
    for _ in range(steps):
        loss = reconstruction_loss(x, model.generator(w), w, INVERSION_LOSS)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward(inputs=[w])  # the generator's weights stay fixed: no gradients for them
        opt.step()
    return w.detach()


@dataclass(frozen=True)
class PriorEvaluation:
    source: str
    faces: int
    results: list[PriorStats]
    pairs: int | None = None
    crop_lfw_accuracy: float | None = None  # the same pairs on the uncoded crops: the reference


@dataclass(frozen=True)
class _Faces:
    crops: np.ndarray
    embeddings: np.ndarray  # the judge's, of the crops
    names: list[str] | None = None  # with LFW pairs: the photo of each crop
    pairs: list[Pair] | None = None


def _stats(work: str, step: int, method: str, faces: _Faces, recon: np.ndarray, judge: FaceDescriptor) -> PriorStats:
    a = torch.from_numpy(recon).permute(0, 3, 1, 2).float() / 255
    b = torch.from_numpy(faces.crops).permute(0, 3, 1, 2).float() / 255
    emb = judge.embed_crops(recon)
    dist = np.linalg.norm(emb - faces.embeddings, axis=1)
    acc = verification(faces.pairs, faces.names, emb) if faces.pairs else None
    return PriorStats(work, step, method, float(psnr(a, b).mean()), float(ms_ssim(a, b).mean()), float(dist.mean()),
                      float((dist < SAME_PERSON).mean()), acc)


def prior_configs(ckpt: Path) -> tuple[GeneratorConfig, EncoderConfig]:
    """The architecture a checkpoint was trained with (``prior_config.json`` beside it), else `facetier train`'s."""
    saved = ckpt.parent / "prior_config.json"
    if not saved.exists():
        return GeneratorConfig(), EncoderConfig()
    d = json.loads(saved.read_text())
    return generator_config_from_json(d["generator"]), encoder_config_from_json(d["encoder"])


def evaluate_priors(works: list[str], src: str, *, limit: int = 100, invert_steps: int = 0, batch: int = 25,
                    report: str | None = None, gallery: str | None = None, lfw: str | None = None,
                    max_pairs_per_fold: int | None = None) -> PriorEvaluation:
    """Figures for each work folder's prior on ``src`` (or, with ``lfw``, on the photos of the pairs of folds 5-8,
    adding verification accuracy); ``gallery``: a PNG of 8 faces, the crop then each prior's reconstructions."""
    ckpts = [Path(w) / PRIOR_CHECKPOINT if Path(w).is_dir() else Path(w) for w in works]
    for c in ckpts:
        if not c.exists():
            raise ConfigError(f"no prior checkpoint at {c}")
    configs = [prior_configs(c) for c in ckpts]
    sizes = {g.size for g, _ in configs}
    if len(sizes) > 1:
        raise ConfigError(f"the priors generate different sizes {sorted(sizes)}; compare priors of one size at a time")
    detector = FaceDetector(replace(EMBEDDED_ALIGNMENT, size=sizes.pop()))  # the framing the priors were trained on
    judge = FaceDescriptor(DETECTED_CHIP_ID)
    if lfw:
        pairs = select_pairs(Path(lfw), EVAL_FOLDS, max_pairs_per_fold)
        names, crops = lfw_crops(Path(lfw), pairs, detector)
        faces = _Faces(crops, judge.embed_crops(crops), names, pairs)
    else:
        crops = first_faces(src, limit, lambda rgb: align_faces(rgb, detector))[0]
        faces = _Faces(crops, judge.embed_crops(crops))
    out, columns = [], [crops]
    for work, ckpt, (gen_cfg, enc_cfg) in zip(works, ckpts, configs):
        model, step = load_prior(ckpt, gen_cfg, enc_cfg)
        recon, inverted = [], []
        for i in tqdm(range(0, len(crops), batch), desc=f"reconstruct {Path(work).name}", unit="batch"):
            x = to_tensor(crops[i : i + batch], torch.device("cpu"))
            with torch.no_grad():
                recon.append(_as_uint8(model(x)[0]))
            if invert_steps:
                w = invert(model, x, invert_steps)
                with torch.no_grad():
                    inverted.append(_as_uint8(model.generator(w)))
        columns.append(np.concatenate(recon))
        out.append(_stats(work, step, "encoder", faces, columns[-1], judge))
        if invert_steps:
            columns.append(np.concatenate(inverted))
            out.append(_stats(work, step, f"inverted-{invert_steps}", faces, columns[-1], judge))
    if gallery:
        save_gallery(gallery, columns, 8)
    result = PriorEvaluation(lfw or src, len(crops), out)
    if faces.pairs:
        result = replace(result, pairs=len(faces.pairs), crop_lfw_accuracy=verification(faces.pairs, faces.names, faces.embeddings))
    if report:
        Path(report).write_text(json.dumps(asdict(result), indent=1))
    return result


def render(evaluation: PriorEvaluation) -> str:
    lines = [f"{evaluation.faces} unseen faces from {evaluation.source}"]
    if evaluation.pairs:
        lines.append(f"LFW: {evaluation.pairs} pairs of folds 5-8; the uncoded crops verify at {evaluation.crop_lfw_accuracy:.2%}")
    lines += [f"{'prior':<28}{'step':>7}  {'method':<13}{'PSNR dB':>9}{'MS-SSIM':>9}{'dlib dist':>10}{'same':>7}{'LFW':>9}"]
    for s in evaluation.results:
        acc = "" if s.lfw_accuracy is None else f"{s.lfw_accuracy:>9.2%}"
        lines.append(f"{s.work[-28:]:<28}{s.step:>7}  {s.method:<13}{s.psnr_db:>9.2f}{s.ms_ssim:>9.4f}{s.dlib_distance:>10.3f}{s.same_person:>7.0%}{acc}")
    return "\n".join(lines)
