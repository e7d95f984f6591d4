"""``facetier train STAGE``: from parsed arguments to a training stage (face cache, stage, bundle export)."""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
from facetier.codec.align import AlignmentConfig
from facetier.codec.checkpoints import ModelBundle, PartSource, load_bundle
from facetier.codec.model import embedded_weights_path
from facetier.codec.prior import TRAIN_AN_ENCODER, pick_device
from facetier.pipelines.training.bundles import (
    SEMANTIC_SUFFIX,
    PriorSetup,
    bundle_wplus,
    export_bundle,
    export_fitted_bundle,
    load_prior,
    prior_from_bundle,
)
from facetier.pipelines.training.data import build_face_cache, read_image_list
from facetier.pipelines.training.entropy_fit import EntropyTrainConfig
from facetier.pipelines.training.gan import GanTrainConfig, prior_from_gan, train_gan
from facetier.pipelines.training.prior import (
    PRIOR_CHECKPOINT,
    PriorTrainConfig,
    train_prior,
)
from facetier.pipelines.training.semantic_fit import SemanticTrainConfig

from facetier.errors import ConfigError, ModelError

log = logging.getLogger(__name__)

SEMANTIC_CODEC_ID = "facetier-prior-128-v3.1"
EMBEDDED_OUT = "codec/assets/facetier-prior-128.safetensors"
ENTROPY_FIT_FACES = 6000


def face_cache_path(work: Path, alignment: AlignmentConfig) -> Path:
    """One cache per framing, so a work folder can hold faces for several priors (the embedded one: faces_128_s080)."""
    return work / f"faces_{alignment.size}_s{round(alignment.crop_scale * 100):03d}.npy"


def _faces(a: argparse.Namespace, alignment: AlignmentConfig) -> np.ndarray:
    lists = [Path(p) for p in a.lists]
    for p in lists:
        if not p.exists():
            raise ConfigError(f"training list {p} not found (the default lists live in ../shared/data)")
    paths = [img for p in lists for img in read_image_list(p)]
    for p in lists:
        if "eval" in p.name:
            raise ConfigError(f"refusing to train on an evaluation list: {p}")
    return build_face_cache(paths, face_cache_path(Path(a.work), alignment), alignment)


def _coding_alignment(bundle: ModelBundle) -> AlignmentConfig:
    """The bundle's framing at no more pixels than its encoder reads: a 1024 px cache would not fit in memory,
    and the encoder resizes to its input anyway."""
    c = bundle.config
    return replace(c.alignment, size=min(c.alignment.size, c.encoder.input_size))


def _check_flags(a: argparse.Namespace) -> None:
    if a.freeze_generator and a.stage != "prior":
        raise ConfigError(f"--freeze-generator applies to the prior stage only, not to {a.stage!r}")
    if a.batch_size and a.stage not in ("prior", "gan"):
        raise ConfigError(f"--batch-size applies to the prior and gan stages only, not to {a.stage!r}")
    if a.overrides and a.stage != "semantic":
        raise ConfigError(f"--set applies to the semantic stage only, not to {a.stage!r}")
    if a.init_from_bundle and a.stage != "prior":
        raise ConfigError(f"--init-from-bundle applies to the prior stage only, not to {a.stage!r} (the entropy and semantic stages take --from-bundle)")
    if a.from_bundle and a.stage not in ("entropy", "semantic"):
        raise ConfigError(f"--from-bundle applies to the entropy and semantic stages only, not to {a.stage!r}")
    if a.entropy_steps and a.stage != "semantic":
        raise ConfigError(f"--entropy-steps applies to the semantic stage's refit of the upper layers; the {a.stage!r} stage takes --steps")
    if a.codec_id and a.stage not in ("entropy", "semantic"):
        raise ConfigError(f"--codec-id names the bundle the entropy and semantic stages write, not {a.stage!r}")
    if a.id_weight and a.stage != "prior":
        raise ConfigError(f"--id-weight applies to the prior stage only, not to {a.stage!r}")


def _out(a: argparse.Namespace, setup: PriorSetup | None = None) -> Path:
    """Where the bundle goes. Only facetier's own embedded lineage may default to the shipped model's path."""
    if a.out:
        return Path(a.out)
    if a.from_bundle or (setup is not None and setup != PriorSetup.embedded()):
        raise ConfigError("give --out: without it the bundle would replace the embedded model (codec/assets)")
    return Path(EMBEDDED_OUT)


def _fit_subset(faces: np.ndarray, seed: int) -> np.ndarray:
    """Sorted indices of the faces the entropy stage fits on (all of them up to ENTROPY_FIT_FACES)."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(len(faces), min(ENTROPY_FIT_FACES, len(faces)), replace=False))


def _entropy_cfg(steps: int | None) -> EntropyTrainConfig:
    return EntropyTrainConfig(steps=steps or EntropyTrainConfig.steps)


def run_train(a: argparse.Namespace) -> int:
    _check_flags(a)
    work = Path(a.work)
    if a.stage == "semantic":
        return _train_semantic(a, work)
    if a.stage == "entropy" and a.from_bundle:
        return _fit_bundle_layers(a, work)
    if a.stage == "prior" and a.init_from_bundle:
        _start_from_bundle(work, Path(a.init_from_bundle))
    setup = PriorSetup.load(work)
    faces = _faces(a, setup.alignment)
    log.info("%d aligned training faces", len(faces))
    if a.stage == "align":
        return 0
    if a.stage == "gan":
        gan_cfg = GanTrainConfig(steps=a.steps or GanTrainConfig.steps, batch_size=a.batch_size or GanTrainConfig.batch_size, seed=a.seed)
        train_gan(faces, work, setup.generator, gan_cfg, pick_device(a.device), max_minutes=a.minutes)
        return 0
    if a.stage == "prior":
        if a.freeze_generator and not (work / PRIOR_CHECKPOINT).exists():
            prior_from_gan(work, setup.generator, setup.encoder)
        cfg = PriorTrainConfig(steps=a.steps or 30000, batch_size=a.batch_size or PriorTrainConfig.batch_size,
                               adv_weight=0.0 if a.freeze_generator else a.adv_weight, seed=a.seed, train_generator=not a.freeze_generator,
                               id_weight=a.id_weight, crop_scale=setup.alignment.crop_scale)
        train_prior(faces, work, setup.generator, setup.encoder, cfg, pick_device(a.device), max_minutes=a.minutes)
        return 0
    ckpt = work / PRIOR_CHECKPOINT
    if not ckpt.exists():
        raise ConfigError(f"no prior checkpoint at {ckpt}; run `facetier train prior` first")
    out = _out(a, setup)
    model, _ = load_prior(ckpt, setup.generator, setup.encoder)
    subset = _fit_subset(faces, a.seed)
    digest = export_bundle(model, faces[subset], out, codec_id=a.codec_id or setup.codec_id, alignment=setup.alignment,
                           entropy_cfg=_entropy_cfg(a.steps), sources=_trained_sources(work, setup))
    log.info("wrote %s (weights %s)", out, digest)
    return 0


def _start_from_bundle(work: Path, path: Path) -> None:
    """A new work folder starts from the bundle; one that already did resumes (a rerun of the same command)."""
    bundle = load_bundle(path)
    if not (work / PRIOR_CHECKPOINT).exists():
        prior_from_bundle(work, bundle)
    elif PriorSetup.load(work).bundle_hash != bundle.weights_hash:
        raise ConfigError(f"{work} already trains another prior; give --init-from-bundle a new --work folder")


def _trained_sources(work: Path, setup: PriorSetup) -> tuple[PartSource, ...]:
    """Provenance of a prior trained in ``work``: empty for facetier's own, else the imported parts and what training changed."""
    if not setup.sources:
        return ()
    trained = json.loads((work / "prior_config.json").read_text())["train"] if (work / "prior_config.json").exists() else {}
    changed = {"encoder", "latent_avg"} | ({"generator"} if trained.get("train_generator") else set()) if trained else set()
    out = [replace(s, origin=f"{s.origin}, fine-tuned by facetier train prior") if s.part in changed else s
           for s in setup.sources if s.part not in ("layers", "semantic")]
    if trained and not any(s.part == "encoder" for s in setup.sources):
        out.append(PartSource("encoder", "facetier train prior" + ("" if trained.get("train_generator") else " --freeze-generator"), "", ""))
    return tuple(out) + (PartSource("layers", "facetier train entropy", "", ""),)


def _cached_wplus(bundle: ModelBundle, faces: np.ndarray, key: str, work: Path, device: str) -> np.ndarray:
    """W+ the bundle's encoder gives ``faces``; cached in ``work`` under the weights hash and ``key`` (which faces)."""
    cache = work / f"wplus_{bundle.weights_hash[:12]}.npy"
    stamp = cache.with_suffix(".json")
    if cache.exists() and stamp.exists() and json.loads(stamp.read_text()).get("key") == key:
        return np.load(cache)
    wplus = bundle_wplus(bundle, faces, device=device)
    work.mkdir(parents=True, exist_ok=True)
    np.save(cache, wplus)
    stamp.write_text(json.dumps({"key": key}))
    return wplus


def _faces_key(a: argparse.Namespace, alignment: AlignmentConfig, subset: np.ndarray | None = None) -> str:
    """Which faces: the face cache's own key (its files and framing), and the subset taken of them."""
    index = json.loads(face_cache_path(Path(a.work), alignment).with_suffix(".json").read_text())
    chosen = "all" if subset is None else hashlib.sha256(subset.astype(np.int64).tobytes()).hexdigest()[:16]
    return f"{index['key']}:{chosen}"


def _fit_bundle_layers(a: argparse.Namespace, work: Path) -> int:
    """``train entropy --from-bundle``: the bundle's prior as it is, its layers fitted on the faces of ``--lists``."""
    bundle = load_bundle(Path(a.from_bundle))
    if not bundle.has_encoder:
        raise ModelError(f"{a.from_bundle} is a generator without an encoder: {TRAIN_AN_ENCODER}")
    out = _out(a)
    alignment = _coding_alignment(bundle)
    faces = _faces(a, alignment)
    subset = _fit_subset(faces, a.seed)
    wplus = _cached_wplus(bundle, np.asarray(faces[subset]), _faces_key(a, alignment, subset), work / "entropy", a.device)
    digest = export_fitted_bundle(bundle, wplus, out, codec_id=a.codec_id, entropy_cfg=_entropy_cfg(a.steps))
    log.info("wrote %s (weights %s), layers fitted on %d faces", out, digest, len(subset))
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


def _semantic_codec_id(bundle: ModelBundle) -> str:
    cid = bundle.config.codec_id
    return SEMANTIC_CODEC_ID if cid.startswith("facetier-prior-128") else f"{cid.removesuffix(SEMANTIC_SUFFIX)}{SEMANTIC_SUFFIX}"


def _train_semantic(a: argparse.Namespace, work: Path) -> int:
    """Semantic base layer on top of an existing bundle's prior (``--from-bundle``; default the embedded model)."""
    from facetier.codec.face_descriptor import DESCRIPTOR_ID
    from facetier.codec.semantic import SemanticConfig
    from facetier.pipelines.training.bundles import export_semantic_bundle
    from facetier.pipelines.training.face_labels import crop_descriptors, measure_crops
    from facetier.pipelines.training.semantic_fit import build_labels, expression_ranges

    source = Path(a.from_bundle) if a.from_bundle else embedded_weights_path()
    bundle = load_bundle(source)
    out = _out(a)
    alignment = _coding_alignment(bundle)
    faces = _faces(a, alignment)
    log.info("%d aligned training faces", len(faces))
    wplus = _cached_wplus(bundle, faces, _faces_key(a, alignment), work, a.device)
    cache = face_cache_path(work, alignment)
    labels_file = work / "face_labels.npz" if cache.stem == "faces_128_s080" else work / f"face_labels_{cache.stem}.npz"
    raw = measure_crops(faces, labels_file)
    embs = crop_descriptors(faces, DESCRIPTOR_ID, alignment.crop_scale, work / f"descriptors_{DESCRIPTOR_ID}_{cache.stem}.npy",
                            str(pick_device(a.device)))
    files = json.loads(cache.with_suffix(".json").read_text())["files"]
    ranges = expression_ranges(raw)
    labels = build_labels(files, raw, embs, _utk_labels(a.lists), ranges)
    log.info("expression ranges (5th, 95th percentile): %s", ranges)
    cfg = with_overrides(SemanticTrainConfig(steps=a.steps or SemanticTrainConfig.steps, seed=a.seed), a.overrides)
    log.info("semantic training settings: %s", cfg)
    digest, figures = export_semantic_bundle(bundle, wplus, labels, out, codec_id=a.codec_id or _semantic_codec_id(bundle),
                                             semantic_cfg=SemanticConfig(image_size=64, descriptor=DESCRIPTOR_ID), train_cfg=cfg,
                                             entropy_cfg=_entropy_cfg(a.entropy_steps), crops=faces, descriptors=embs)
    log.info("held-out training faces: %s", figures)
    (work / "semantic_report.json").write_text(json.dumps({"figures": figures, "expression_ranges": ranges, "weights_hash": digest, "from": str(source)}, indent=2))
    log.info("wrote %s (weights %s)", out, digest)
    return 0
