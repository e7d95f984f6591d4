"""``facetier train``: stages that build a model bundle from face images.

* ``prior``   - generator + encoder (``train_prior``), resumable, checkpointed; a work folder's
                prior is the embedded design unless it was started from a bundle
                (``--init-from-bundle``, recorded as its ``PriorSetup``);
* ``entropy`` - per-layer transforms and entropy models fitted on the prior's W+ codes, then
                exported with the prior as one safetensors bundle (the shipped format); or fitted
                on a bundle's own prior (``--from-bundle``, e.g. one made by ``import-prior``).
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from facetier.codec.align import AlignmentConfig
from facetier.codec.checkpoints import (
    ModelBundle,
    ModelConfig,
    PartSource,
    encoder_config_from_json,
    generator_config_from_json,
    load_generator_weights,
    save_bundle,
)
from facetier.codec.encoder import EncoderConfig
from facetier.codec.layers import LayerPlan, LayerSpec
from facetier.codec.prior import StylePrior
from facetier.codec.semantic import SemanticConfig
from facetier.codec.stylegan import GeneratorConfig
from facetier.pipelines.training.entropy_fit import (
    EntropyTrainConfig,
    export_layers,
    train_entropy,
)
from facetier.pipelines.training.prior import (
    PRIOR_CHECKPOINT,
    PriorModel,
    save_checkpoint,
    to_tensor,
)
from facetier.pipelines.training.semantic_fit import (
    PixelInputs,
    SemanticLabels,
    SemanticTrainConfig,
    export_semantic,
    train_semantic,
)
from tqdm import tqdm

from facetier.errors import ModelError

log = logging.getLogger(__name__)

EMBEDDED_ALIGNMENT = AlignmentConfig(size=128, crop_scale=0.8)  # the framing the embedded prior is trained on
EMBEDDED_CODEC_ID = "facetier-prior-128-v1"
SEMANTIC_SUFFIX = "-semantic"
PRIOR_SETUP = "prior_setup.json"


@dataclass(frozen=True)
class PriorSetup:
    """What a work folder's prior is: its shapes, the framing of its faces, its codec id and where its parts came from."""

    generator: GeneratorConfig
    encoder: EncoderConfig
    alignment: AlignmentConfig
    codec_id: str
    sources: tuple[PartSource, ...] = ()
    bundle_hash: str = ""  # the bundle it started from (``--init-from-bundle``), if any

    @staticmethod
    def embedded() -> PriorSetup:
        return PriorSetup(GeneratorConfig(), EncoderConfig(), EMBEDDED_ALIGNMENT, EMBEDDED_CODEC_ID)

    @staticmethod
    def of_bundle(bundle: ModelBundle) -> PriorSetup:
        c = bundle.config
        return PriorSetup(c.generator, c.encoder, c.alignment, c.codec_id, c.sources, bundle.weights_hash)

    def save(self, work: Path) -> None:
        work.mkdir(parents=True, exist_ok=True)
        gen = asdict(self.generator) | {"channels": {str(k): v for k, v in self.generator.channels.items()}}
        d = {"generator": gen, "encoder": asdict(self.encoder), "alignment": asdict(self.alignment), "codec_id": self.codec_id,
             "sources": [s.to_json() for s in self.sources], "bundle_hash": self.bundle_hash}
        (work / PRIOR_SETUP).write_text(json.dumps(d, indent=1))

    @staticmethod
    def load(work: Path) -> PriorSetup:
        """The work folder's setup; the embedded design when it has none (folders made before setups existed)."""
        path = work / PRIOR_SETUP
        if not path.exists():
            return PriorSetup.embedded()
        d = json.loads(path.read_text())
        return PriorSetup(generator_config_from_json(d["generator"]), encoder_config_from_json(d["encoder"]), AlignmentConfig(**d["alignment"]),
                          d["codec_id"], tuple(PartSource(**s) for s in d["sources"]), d.get("bundle_hash", ""))


def prior_from_bundle(work: Path, bundle: ModelBundle) -> Path:
    """Start ``train prior`` from a bundle's generator (and encoder, when it has one): checkpoint at step 0 and the setup."""
    # the weights will change here: a new codec id, so streams never name the source model for them
    setup = replace(PriorSetup.of_bundle(bundle), codec_id=f"{bundle.config.codec_id.removesuffix(SEMANTIC_SUFFIX)}-tuned")
    model = PriorModel(setup.generator, setup.encoder)
    load_generator_weights(model.generator, bundle.prefixed("generator."), ModelError)
    if bundle.has_encoder:
        try:
            model.encoder.load_state_dict(bundle.prefixed("encoder."))
        except RuntimeError as exc:
            raise ModelError(f"encoder weights do not fit the configuration: {str(exc)[:300]}") from exc
    with torch.no_grad():
        model.latent_avg.copy_(bundle.tensors["latent_avg"].float())
    setup.save(work)
    ckpt = work / PRIOR_CHECKPOINT
    save_checkpoint({"model": model.state_dict(), "ema": model.state_dict(), "step": torch.tensor(0)}, ckpt)
    log.info("prior training starts from %s (%s)%s", setup.codec_id, bundle.weights_hash[:12], "" if bundle.has_encoder else " with a fresh encoder")
    return ckpt


def load_prior(ckpt: Path, gen_cfg: GeneratorConfig, enc_cfg: EncoderConfig, use_ema: bool = True) -> tuple[PriorModel, int]:
    """The prior of a `train prior` checkpoint (EMA weights by default) and the step it was saved at."""
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    model = PriorModel(gen_cfg, enc_cfg)
    model.load_state_dict(state["ema" if use_ema else "model"])
    return model.eval(), int(state["step"])


@torch.no_grad()
def encode_all(model: PriorModel, faces: np.ndarray, batch: int = 64) -> np.ndarray:
    out = []
    for i in range(0, len(faces), batch):
        out.append(model.encode(to_tensor(faces[i : i + batch], torch.device("cpu"))).numpy())
    return np.concatenate(out)


def export_bundle(
    model: PriorModel,
    faces: np.ndarray,
    out_path: Path,
    *,
    codec_id: str,
    alignment: AlignmentConfig,
    plan: LayerPlan | None = None,
    entropy_cfg: EntropyTrainConfig | None = None,
    residual_quality: int = 80,
    sources: tuple[PartSource, ...] = (),
) -> str:
    """Fit the entropy stage on ``faces`` and write the bundle; returns its weights hash."""
    gen_cfg, enc_cfg = model.generator.config, model.encoder.config
    plan = plan or LayerPlan.default(gen_cfg.n_latent)
    # Weights ship as float16 (half the repo size); fit the entropy stage to exactly what ships.
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.is_floating_point():
                t.copy_(t.half().float())
    wplus = encode_all(model, faces)
    layers = train_entropy(wplus, plan, entropy_cfg or EntropyTrainConfig())
    def half(v: torch.Tensor) -> torch.Tensor:
        return v.half() if v.is_floating_point() else v

    tensors = {f"generator.{k}": half(v) for k, v in model.generator.state_dict().items() if not k.startswith("noises.")}
    tensors |= {f"encoder.{k}": half(v) for k, v in model.encoder.state_dict().items()}
    tensors["latent_avg"] = model.latent_avg.detach()
    tensors |= export_layers(layers, plan)
    config = ModelConfig(codec_id=codec_id, generator=gen_cfg, encoder=enc_cfg, alignment=alignment, plan=plan, residual_quality=residual_quality,
                         sources=sources)
    return save_bundle(out_path, config, tensors)


def export_fitted_bundle(bundle: ModelBundle, wplus: np.ndarray, out_path: Path, *, codec_id: str | None = None,
                         entropy_cfg: EntropyTrainConfig | None = None) -> str:
    """``bundle``'s prior as it is, with its linear layers fitted on ``wplus`` (the codes its encoder gives the user's faces)."""
    cfg = bundle.config
    plan = LayerPlan.default(cfg.generator.n_latent) if cfg.plan.is_semantic else cfg.plan
    layers = train_entropy(wplus, plan, entropy_cfg or EntropyTrainConfig())
    sources = fitted_sources(cfg.sources, PartSource("layers", "facetier train entropy", "", ""))
    config = replace(cfg, codec_id=codec_id or cfg.codec_id.removesuffix(SEMANTIC_SUFFIX), plan=plan, semantic=None, sources=sources)
    return save_bundle(out_path, config, prior_tensors(bundle) | export_layers(layers, plan))


def prior_tensors(bundle: ModelBundle) -> dict[str, torch.Tensor]:
    """The bundle's generator, encoder and mean W+: what a refit of its layers keeps."""
    return {k: v for k, v in bundle.tensors.items() if k.startswith(("generator.", "encoder.")) or k == "latent_avg"}


def fitted_sources(sources: tuple[PartSource, ...], *fitted: PartSource) -> tuple[PartSource, ...]:
    """Provenance after a refit: earlier fitted parts replaced by ``fitted``. Bundles facetier trained from
    scratch record no sources (the model card covers them), and keep recording none."""
    if not sources:
        return ()
    return tuple(s for s in sources if s.part not in ("layers", "semantic")) + fitted


@torch.no_grad()
def bundle_wplus(bundle: ModelBundle, faces: np.ndarray, *, device: str = "cpu", progress: bool = True) -> np.ndarray:
    """W+ the bundle's encoder gives ``faces``, in batches sized to the encoder's input."""
    prior = StylePrior(bundle, device=device)
    batch = 128 if prior.encoder_input_size <= 128 else 16
    starts = range(0, len(faces), batch)
    return np.concatenate([prior.encode_wplus(np.asarray(faces[i : i + batch]))
                           for i in tqdm(starts, desc="W+ of training faces", unit="batch", disable=not progress)])


def export_semantic_bundle(
    bundle: ModelBundle,
    wplus: np.ndarray,
    labels: SemanticLabels,
    out_path: Path,
    *,
    codec_id: str,
    semantic_cfg: SemanticConfig,
    train_cfg: SemanticTrainConfig,
    entropy_cfg: EntropyTrainConfig | None = None,
    upper_dims: tuple[int, int] = (64, 64),
    crops: np.ndarray | None = None,
    descriptors: np.ndarray | None = None,
) -> tuple[str, dict[str, float]]:
    """A bundle with ``bundle``'s prior, a semantic base layer fitted on its W+ codes and refitted upper layers.

    ``wplus`` must be the codes ``bundle``'s encoder gives the training faces. Returns the new
    weights hash and the semantic stage's held-out figures.
    """
    cfg = bundle.config
    plan = LayerPlan.semantic(cfg.generator.n_latent, semantic_cfg.code_dim, *upper_dims)
    inputs = PixelInputs.build(semantic_cfg, crops, descriptors)
    net, prior, figures = train_semantic(wplus, labels, semantic_cfg, train_cfg, inputs)
    with torch.no_grad():  # the semantic network ships as float16: fit the upper layers to exactly that
        for t in net.parameters():
            t.copy_(t.half().float())
        for name, t in net.named_buffers():
            t.copy_(t.half().float())
    layers = train_entropy(wplus, plan, entropy_cfg or EntropyTrainConfig(), semantic=net, semantic_inputs=inputs)
    sem = export_semantic(net, prior)
    tensors = prior_tensors(bundle) | {k: (v.half() if k.startswith("semantic.") else v) for k, v in sem.items()} | export_layers(layers, plan)
    sources = fitted_sources(cfg.sources, PartSource("layers", "facetier train semantic", "", ""), PartSource("semantic", "facetier train semantic", "", ""))
    config = ModelConfig(codec_id=codec_id, generator=cfg.generator, encoder=cfg.encoder, alignment=cfg.alignment, plan=plan,
                         residual_quality=cfg.residual_quality, semantic=semantic_cfg, sources=sources)
    return save_bundle(out_path, config, tensors), figures


def tiny_configs(size: int = 32) -> tuple[GeneratorConfig, EncoderConfig, LayerPlan]:
    """A few-thousand-parameter model with the embedded model's structure, for tests."""
    channels = {4: 16, 8: 16, 16: 8, 32: 8, 64: 8, 128: 8}
    gen = GeneratorConfig(size=size, style_dim=16, n_mlp=2, channels={k: v for k, v in channels.items() if k <= size})
    enc = EncoderConfig(input_size=size, n_styles=gen.n_latent, style_dim=16, stem_channels=8, stage_channels=(8, 8, 8, 8), stage_units=(1, 1, 1, 1), block_channels=8)
    n = gen.n_latent
    plan = LayerPlan((LayerSpec("basic", (0, 1, 2), 6), LayerSpec("middle", tuple(range(3, min(7, n))), 8), LayerSpec("enhanced", tuple(range(min(7, n), n)), 8)))
    return gen, enc, plan


def make_random_bundle(out_path: Path, *, size: int = 32, seed: int = 0, entropy_steps: int = 30, semantic: bool = True) -> str:
    """A bundle with random prior weights and a briefly fitted entropy stage (tests and smoke runs)."""
    torch.manual_seed(seed)
    gen, enc, plan = tiny_configs(size)
    model = PriorModel(gen, enc).eval()
    with torch.no_grad():
        model.latent_avg.normal_(0, 0.5)
    rng = np.random.default_rng(seed)
    faces = rng.integers(0, 256, (64, size, size, 3), dtype=np.uint8)
    cfg = EntropyTrainConfig(steps=entropy_steps, batch_size=32, hidden=16, lambdas=(200.0, 200.0, 200.0), seed=seed)
    alignment = replace(AlignmentConfig(), size=size, crop_scale=0.8, min_eye_distance=4.0)
    digest = export_bundle(model, faces, out_path, codec_id=f"facetier-tiny-{size}", alignment=alignment, plan=plan, entropy_cfg=cfg)
    if not semantic:
        return digest
    # the semantic base layer, fitted briefly on random labels: exercises every code path, means nothing
    from facetier.codec.checkpoints import load_bundle
    from facetier.codec.face_descriptor import DESCRIPTOR_ID, FaceDescriptor

    linear = load_bundle(out_path)
    wplus = encode_all(model, faces)
    n = len(faces)
    labels = SemanticLabels(age=rng.uniform(1, 90, n).astype(np.float32), gender=rng.integers(0, 2, n), race=rng.integers(0, 5, n),
                            measured=rng.normal(0, 1, (n, 5)).astype(np.float32), identity=rng.normal(0, 0.1, (n, 128)).astype(np.float32))
    scfg = SemanticConfig(code_dim=16, pca_dim=8, hidden=16, image_size=16, image_features=8, descriptor=DESCRIPTOR_ID)
    digest, _ = export_semantic_bundle(linear, wplus, labels, out_path, codec_id=f"facetier-tiny-semantic-{size}", semantic_cfg=scfg,
                                       train_cfg=SemanticTrainConfig(steps=entropy_steps, batch_size=32, seed=seed), entropy_cfg=cfg,
                                       upper_dims=(8, 8), crops=faces, descriptors=FaceDescriptor(DESCRIPTOR_ID, alignment.crop_scale).embed_crops(faces))
    return digest
