"""``facetier train STAGE``: glue between the CLI and the training stages."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from facetier.codec.align import AlignmentConfig
from facetier.codec.encoder import EncoderConfig
from facetier.codec.model import pick_device
from facetier.codec.stylegan import GeneratorConfig
from facetier.errors import ConfigError
from facetier.pipelines.train import export_bundle, load_prior
from facetier.pipelines.train_data import build_face_cache, read_image_list
from facetier.pipelines.train_prior import PriorTrainConfig, train_prior

log = logging.getLogger(__name__)

EMBEDDED_ALIGNMENT = AlignmentConfig(size=128, crop_scale=0.8)
EMBEDDED_CODEC_ID = "facetier-prior-128-v1"
ENTROPY_FIT_FACES = 6000


def _faces(a: argparse.Namespace) -> np.ndarray:
    lists = [Path(p) for p in a.lists]
    for p in lists:
        if not p.exists():
            raise ConfigError(f"training list {p} not found (the default lists live in ../shared/data)")
    paths = [img for p in lists for img in read_image_list(p)]
    for p in lists:
        if "eval" in p.name:
            raise ConfigError(f"refusing to train on an evaluation list: {p}")
    return build_face_cache(paths, Path(a.work) / "faces_128_s080.npy", EMBEDDED_ALIGNMENT)


def run_train(a: argparse.Namespace) -> int:
    faces = _faces(a)
    log.info("%d aligned training faces", len(faces))
    if a.stage == "align":
        return 0
    gen_cfg, enc_cfg = GeneratorConfig(), EncoderConfig()
    work = Path(a.work)
    if a.stage == "prior":
        cfg = PriorTrainConfig(steps=a.steps, adv_weight=a.adv_weight, seed=a.seed)
        train_prior(faces, work, gen_cfg, enc_cfg, cfg, pick_device(a.device), max_minutes=a.minutes)
        return 0
    ckpt = work / "prior_ckpt.pt"
    if not ckpt.exists():
        raise ConfigError(f"no prior checkpoint at {ckpt}; run `facetier train prior` first")
    model = load_prior(ckpt, gen_cfg, enc_cfg)
    rng = np.random.default_rng(a.seed)
    subset = np.sort(rng.choice(len(faces), min(ENTROPY_FIT_FACES, len(faces)), replace=False))
    digest = export_bundle(model, faces[subset], Path(a.out), codec_id=EMBEDDED_CODEC_ID, alignment=EMBEDDED_ALIGNMENT)
    log.info("wrote %s (weights %s)", a.out, digest)
    return 0
