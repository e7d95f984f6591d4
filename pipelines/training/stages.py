"""``facetier train STAGE``: from parsed arguments to a training stage (face cache, stage, bundle export)."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
from facetier.codec.encoder import EncoderConfig
from facetier.codec.model import pick_device
from facetier.codec.stylegan import GeneratorConfig
from facetier.pipelines.training.bundles import EMBEDDED_ALIGNMENT, export_bundle, load_prior
from facetier.pipelines.training.data import build_face_cache, read_image_list
from facetier.pipelines.training.gan import GanTrainConfig, prior_from_gan, train_gan
from facetier.pipelines.training.prior import (
    PRIOR_CHECKPOINT,
    PriorTrainConfig,
    train_prior,
)
from facetier.pipelines.training.semantic_fit import SemanticTrainConfig
from tqdm import tqdm

from facetier.errors import ConfigError

log = logging.getLogger(__name__)

EMBEDDED_CODEC_ID = "facetier-prior-128-v1"
SEMANTIC_CODEC_ID = "facetier-prior-128-v3"
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
    if a.freeze_generator and a.stage != "prior":
        raise ConfigError(f"--freeze-generator applies to the prior stage only, not to {a.stage!r}")
    if a.batch_size and a.stage not in ("prior", "gan"):
        raise ConfigError(f"--batch-size applies to the prior and gan stages only, not to {a.stage!r}")
    if a.overrides and a.stage != "semantic":
        raise ConfigError(f"--set applies to the semantic stage only, not to {a.stage!r}")
    faces = _faces(a)
    log.info("%d aligned training faces", len(faces))
    if a.stage == "align":
        return 0
    gen_cfg, enc_cfg = GeneratorConfig(), EncoderConfig()
    work = Path(a.work)
    if a.stage == "semantic":
        return _train_semantic(a, faces, work)
    if a.stage == "gan":
        gan_cfg = GanTrainConfig(steps=a.steps or GanTrainConfig.steps, batch_size=a.batch_size or GanTrainConfig.batch_size, seed=a.seed)
        train_gan(faces, work, gen_cfg, gan_cfg, pick_device(a.device), max_minutes=a.minutes)
        return 0
    if a.stage == "prior":
        if a.freeze_generator and not (work / PRIOR_CHECKPOINT).exists():
            prior_from_gan(work, gen_cfg, enc_cfg)
        cfg = PriorTrainConfig(steps=a.steps or 30000, batch_size=a.batch_size or PriorTrainConfig.batch_size,
                               adv_weight=0.0 if a.freeze_generator else a.adv_weight, seed=a.seed, train_generator=not a.freeze_generator)
        train_prior(faces, work, gen_cfg, enc_cfg, cfg, pick_device(a.device), max_minutes=a.minutes)
        return 0
    ckpt = work / PRIOR_CHECKPOINT
    if not ckpt.exists():
        raise ConfigError(f"no prior checkpoint at {ckpt}; run `facetier train prior` first")
    model, _ = load_prior(ckpt, gen_cfg, enc_cfg)
    rng = np.random.default_rng(a.seed)
    subset = np.sort(rng.choice(len(faces), min(ENTROPY_FIT_FACES, len(faces)), replace=False))
    digest = export_bundle(model, faces[subset], Path(a.out), codec_id=EMBEDDED_CODEC_ID, alignment=EMBEDDED_ALIGNMENT)
    log.info("wrote %s (weights %s)", a.out, digest)
    return 0


def with_overrides(cfg: SemanticTrainConfig, items: list[str]) -> SemanticTrainConfig:
    """``cfg`` with ``NAME=VALUE`` settings replaced, each parsed as its field's type."""
    from dataclasses import fields, replace

    # steps and seed have their own flags; two ways to set them would let one silently win
    types = {f.name: type(getattr(cfg, f.name)) for f in fields(cfg) if f.name not in ("steps", "seed")}
    changes = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in types:
            raise ConfigError(f"bad training setting {item!r}; write NAME=VALUE with NAME one of {sorted(types)}")
        try:
            changes[name] = types[name](value.strip())
        except ValueError:
            raise ConfigError(f"training setting {name}: {value!r} is not a {types[name].__name__}") from None
    return replace(cfg, **changes)


def _utk_labels(lists: list[str]) -> Path | None:
    for p in lists:
        candidate = Path(p).parent / "labels.csv"
        if "utkface" in str(p) and candidate.exists():
            return candidate
    return None


def _train_semantic(a: argparse.Namespace, faces: np.ndarray, work: Path) -> int:
    """Semantic base layer on top of an existing bundle's prior (``--from-bundle``)."""
    from facetier.codec.checkpoints import load_bundle
    from facetier.codec.face_descriptor import DESCRIPTOR_ID
    from facetier.codec.model import FaceCodec, embedded_weights_path
    from facetier.codec.semantic import SemanticConfig
    from facetier.pipelines.training.face_labels import measure_crops
    from facetier.pipelines.training.bundles import export_semantic_bundle
    from facetier.pipelines.training.semantic_fit import build_labels, expression_ranges

    source = Path(a.from_bundle) if a.from_bundle else embedded_weights_path()
    bundle = load_bundle(source)
    wplus_file = work / f"wplus_{bundle.weights_hash[:12]}.npy"
    if wplus_file.exists() and len(np.load(wplus_file, mmap_mode="r")) == len(faces):
        wplus = np.load(wplus_file)
    else:
        codec = FaceCodec(bundle, device=a.device)
        wplus = np.concatenate([codec.encode_wplus(np.asarray(faces[i : i + 128])) for i in tqdm(range(0, len(faces), 128), desc="W+ of training faces", unit="batch")])
        np.save(wplus_file, wplus)
    raw, embs = measure_crops(faces, work / "face_labels.npz")
    files = json.loads((work / "faces_128_s080.json").read_text())["files"]
    ranges = expression_ranges(raw)
    labels = build_labels(files, raw, embs, _utk_labels(a.lists), ranges)
    log.info("expression ranges (5th, 95th percentile): %s", ranges)
    cfg = with_overrides(SemanticTrainConfig(steps=a.steps or SemanticTrainConfig.steps, seed=a.seed), a.overrides)
    log.info("semantic training settings: %s", cfg)
    digest, figures = export_semantic_bundle(bundle, wplus, labels, Path(a.out), codec_id=SEMANTIC_CODEC_ID, semantic_cfg=SemanticConfig(image_size=64, descriptor=DESCRIPTOR_ID),
                                               train_cfg=cfg, crops=faces, descriptors=embs)
    log.info("held-out training faces: %s", figures)
    (work / "semantic_report.json").write_text(json.dumps({"figures": figures, "expression_ranges": ranges, "weights_hash": digest, "from": str(source)}, indent=2))
    log.info("wrote %s (weights %s)", a.out, digest)
    return 0
