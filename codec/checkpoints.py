"""Weights on disk: facetier's own safetensors bundle and real StyleGAN2 / pSp / e4e checkpoints.

Nothing here unpickles code: ``.pt`` files are read with ``torch.load(weights_only=True)``
(argparse ``Namespace`` objects, which rosinality's training script stores under ``args``, are
allowed as plain data), and facetier's own weights are safetensors with the configuration in
the file's metadata.
"""
from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from facetier.codec.align import AlignmentConfig
from facetier.codec.encoder import EncoderConfig, StyleEncoder
from facetier.codec.layers import LayerPlan
from facetier.codec.semantic import SemanticConfig
from facetier.codec.stylegan import Generator, GeneratorConfig
from safetensors.torch import load_file, save_file

from facetier.errors import CheckpointFormatError, ModelError

torch.serialization.add_safe_globals([argparse.Namespace])


@dataclass(frozen=True)
class PartSource:
    """Where one part of a bundle came from, as the user declared it (shown by ``facetier info``)."""

    part: str  # generator, encoder, latent_avg, layers, semantic
    origin: str  # a file name, or "facetier train <stage>"
    sha256: str  # of the source file; "" for parts facetier trained
    license: str  # as declared by the user; "" when not declared

    def to_json(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class ModelConfig:
    codec_id: str
    generator: GeneratorConfig
    encoder: EncoderConfig
    alignment: AlignmentConfig
    plan: LayerPlan
    # legacy: the JPEG XL residual's quality in bundles written before the rungs; read and written so
    # those bundles keep their hash, but the residual layer's quality is now human_layers.FULL_QUALITY
    residual_quality: int = 80
    semantic: SemanticConfig | None = None
    sources: tuple[PartSource, ...] = ()

    def to_json(self) -> str:
        gen = asdict(self.generator)
        gen["channels"] = {str(k): v for k, v in gen["channels"].items()}
        return json.dumps(
            {
                "codec_id": self.codec_id,
                "generator": gen,
                "encoder": asdict(self.encoder),
                "alignment": asdict(self.alignment),
                "plan": self.plan.to_json(),
                "residual_quality": self.residual_quality,
                "semantic": self.semantic.to_json() if self.semantic else None,
                "sources": [s.to_json() for s in self.sources],
            }
        )

    @staticmethod
    def from_json(text: str) -> ModelConfig:
        d = json.loads(text)
        return ModelConfig(
            codec_id=d["codec_id"],
            generator=generator_config_from_json(d["generator"]),
            encoder=encoder_config_from_json(d["encoder"]),
            alignment=AlignmentConfig(**d["alignment"]),
            plan=LayerPlan.from_json(d["plan"]),
            residual_quality=int(d.get("residual_quality", 80)),
            semantic=SemanticConfig.from_json(d["semantic"]) if d.get("semantic") else None,
            sources=tuple(PartSource(**s) for s in d.get("sources", [])),
        )


def generator_config_from_json(d: dict[str, Any]) -> GeneratorConfig:
    """The inverse of ``dataclasses.asdict`` after a JSON round trip (which turns keys into strings)."""
    return GeneratorConfig(**(d | {"channels": {int(k): int(v) for k, v in d["channels"].items()}}))


def encoder_config_from_json(d: dict[str, Any]) -> EncoderConfig:
    return EncoderConfig(**(d | {"stage_channels": tuple(d["stage_channels"]), "stage_units": tuple(d["stage_units"])}))


@dataclass(frozen=True)
class ModelBundle:
    """Everything a :class:`FaceCodec` is built from."""

    config: ModelConfig
    tensors: dict[str, torch.Tensor]
    weights_hash: str  # 32 hex digits

    def prefixed(self, prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) :]: v for k, v in self.tensors.items() if k.startswith(prefix)}

    @property
    def has_encoder(self) -> bool:
        return any(k.startswith("encoder.") for k in self.tensors)

    @property
    def has_entropy_models(self) -> bool:
        """False for a prior imported from public checkpoints before ``facetier train entropy`` fits its layers."""
        return "entropy_tables" in self.tensors

    def describe(self) -> dict[str, Any]:
        """What ``facetier info`` prints: shapes, layers, what the bundle can do yet, where each part came from."""
        cfg = self.config
        return {
            "codec_id": cfg.codec_id, "weights_hash": self.weights_hash, "size": cfg.generator.size, "n_latent": cfg.generator.n_latent,
            "style_dim": cfg.generator.style_dim, "alignment": {"size": cfg.alignment.size, "crop_scale": cfg.alignment.crop_scale},
            "layers": cfg.plan.to_json(), "tensor_elements": sum(t.numel() for t in self.tensors.values()),
            "has_encoder": self.has_encoder, "layers_fitted": self.has_entropy_models, "can_code": self.has_encoder and self.has_entropy_models,
            "semantic": cfg.semantic.to_json() if cfg.semantic else None,
            # bundles facetier trained itself from scratch record no sources: MODEL_CARD.md covers them
            "sources": [s.to_json() for s in cfg.sources] or [{"part": "all", "origin": "facetier train", "sha256": "", "license": "see MODEL_CARD.md"}],
        }


def tensors_hash(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(name.encode() + str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:32]


def save_bundle(path: Path, config: ModelConfig, tensors: dict[str, torch.Tensor]) -> str:
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    digest = tensors_hash(tensors)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"facetier_config": config.to_json(), "weights_hash": digest})
    tmp.replace(path)
    return digest


def load_bundle(path: Path) -> ModelBundle:
    from safetensors import safe_open

    if not Path(path).exists():
        raise ModelError(f"no weights at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises SafetensorError / OSError
        raise ModelError(f"cannot read {path}: {exc}") from exc
    if "facetier_config" not in meta:
        raise CheckpointFormatError(f"{path} is not a facetier bundle (no facetier_config metadata)")
    digest = tensors_hash(tensors)
    if meta.get("weights_hash") and meta["weights_hash"] != digest:
        raise ModelError(f"{path}: tensors do not match the recorded weights hash (file damaged)")
    return ModelBundle(ModelConfig.from_json(meta["facetier_config"]), tensors, digest)


# --- real checkpoints --------------------------------------------------------------------------
def _torch_load(path: Path) -> dict[str, Any]:
    if not Path(path).is_file():
        raise ModelError(f"no checkpoint at {path}")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointFormatError(f"{path}: not a weights-only PyTorch checkpoint ({exc})") from exc
    if not isinstance(obj, dict):
        raise CheckpointFormatError(f"{path}: expected a dict, found {type(obj).__name__}")
    return obj


def _infer_generator_config(sd: dict[str, torch.Tensor]) -> GeneratorConfig:
    try:
        style_dim = sd["style.1.weight"].shape[1]
        n_mlp = len({k.split(".")[1] for k in sd if k.startswith("style.") and k.endswith(".weight")})
        n_convs = len({k.split(".")[1] for k in sd if k.startswith("convs.") and k.endswith("conv.weight")})
        size = 2 ** (n_convs // 2 + 2)
        channels = {4: sd["input.input"].shape[1]}
        for i in range(n_convs // 2):
            channels[2 ** (i + 3)] = sd[f"convs.{2 * i}.conv.weight"].shape[1]
    except KeyError as exc:
        raise CheckpointFormatError(f"generator state dict lacks {exc}") from exc
    except (AttributeError, IndexError, TypeError) as exc:
        raise CheckpointFormatError(f"generator state dict is not a StyleGAN2 layout ({exc})") from exc
    return GeneratorConfig(size=size, style_dim=style_dim, n_mlp=n_mlp, channels=channels)


def load_generator_weights(gen: Generator, sd: dict[str, torch.Tensor], error: type[ModelError] = CheckpointFormatError) -> Generator:
    """Load a generator state dict; noise buffers may be absent (facetier regenerates them from a fixed seed)."""
    try:
        missing, unexpected = gen.load_state_dict(sd, strict=False)
    except RuntimeError as exc:  # a tensor of the wrong shape
        raise error(f"generator weights do not fit the StyleGAN2 layout: {str(exc)[:400]}") from exc
    missing = [m for m in missing if not m.startswith("noises.")]
    if missing or unexpected:
        raise error(f"generator weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return gen


def build_generator(sd: dict[str, torch.Tensor]) -> Generator:
    return load_generator_weights(Generator(_infer_generator_config(sd)), sd)


def _latent_avg(obj: dict[str, Any], n_latent: int) -> torch.Tensor | None:
    avg = obj.get("latent_avg")
    if avg is None:
        return None
    try:
        avg = torch.as_tensor(avg).float()
        return avg.expand(n_latent, avg.shape[-1]).clone() if avg.dim() == 1 or avg.shape[0] == 1 else avg.reshape(n_latent, -1)
    except (RuntimeError, TypeError, ValueError, IndexError) as exc:
        raise CheckpointFormatError(f"latent_avg of shape {tuple(getattr(avg, 'shape', ()))} does not fit {n_latent} W+ rows") from exc


def load_stylegan2(path: Path) -> tuple[Generator, torch.Tensor | None]:
    """A rosinality-format StyleGAN2 checkpoint: ``g_ema`` state dict and optional ``latent_avg``."""
    obj = _torch_load(path)
    if not isinstance(obj.get("g_ema"), dict):
        raise CheckpointFormatError(f"{path}: no 'g_ema' state dict (found keys {sorted(map(str, obj))[:8]})")
    gen = build_generator(obj["g_ema"])
    return gen.eval(), _latent_avg(obj, gen.n_latent)


def _infer_encoder_config(enc: dict[str, torch.Tensor], mode: str, style_dim: int) -> EncoderConfig:
    """pSp's IR-SE50 widths by default, read from the tensors so variants load too."""
    try:
        n_styles = len({k.split(".")[1] for k in enc if k.startswith("styles.")})
        stem = enc["input_layer.0.weight"].shape[0]
        units = sorted({int(k.split(".")[1]) for k in enc if k.startswith("body.")})
        depths = [enc[f"body.{u}.res_layer.1.weight"].shape[0] for u in units]
        # Stages have distinct widths (64/128/256/512 in IR-SE50); each starts with a stride-2 unit.
        stage_channels: list[int] = []
        stage_units: list[int] = []
        for d in depths:
            if stage_channels and d == stage_channels[-1]:
                stage_units[-1] += 1
            else:
                stage_channels.append(d)
                stage_units.append(1)
        if len(stage_channels) < 3:
            raise KeyError(f"{len(stage_channels)} backbone stages of distinct widths, the feature pyramid needs 3 or more")
        block = enc["styles.0.convs.0.weight"].shape[0]
        def n_convs(i: int) -> int:
            return len([k for k in enc if k.startswith(f"styles.{i}.convs.") and k.endswith("weight")])

        coarse_end = next(i for i in range(n_styles) if n_convs(i) != n_convs(0))
        middle_end = next(i for i in range(coarse_end, n_styles) if n_convs(i) != n_convs(coarse_end))
        deepest = 2 ** n_convs(0)
    except (KeyError, StopIteration, ValueError, AttributeError, IndexError, TypeError) as exc:
        raise CheckpointFormatError(f"encoder state dict does not have the pSp layout ({exc!r})") from exc
    return EncoderConfig(input_size=deepest * 2 ** len(stage_channels), n_styles=n_styles, style_dim=style_dim, stem_channels=stem,
                         stage_channels=tuple(stage_channels), stage_units=tuple(stage_units), block_channels=block,
                         coarse_end=coarse_end, middle_end=middle_end, mode=mode)  # type: ignore[arg-type]


def load_psp(path: Path) -> tuple[StyleEncoder, Generator, torch.Tensor | None, dict[str, Any]]:
    """A pSp or e4e checkpoint: ``state_dict`` with ``encoder.`` / ``decoder.`` prefixes, ``latent_avg``, ``opts``."""
    obj = _torch_load(path)
    if not isinstance(obj.get("state_dict"), dict):
        raise CheckpointFormatError(f"{path}: no 'state_dict' (found keys {sorted(map(str, obj))[:8]})")
    sd = obj["state_dict"]
    opts = obj.get("opts") or {}
    opts = vars(opts) if isinstance(opts, argparse.Namespace) else dict(opts)
    dec = {k[len("decoder.") :]: v for k, v in sd.items() if k.startswith("decoder.")}
    enc = {k[len("encoder.") :]: v for k, v in sd.items() if k.startswith("encoder.")}
    if not dec or not enc:
        raise CheckpointFormatError(f"{path}: state_dict needs encoder.* and decoder.* weights")
    gen = build_generator(dec)
    mode = "e4e" if str(opts.get("encoder_type", "")) == "Encoder4Editing" else "psp"
    cfg = _infer_encoder_config(enc, mode, gen.config.style_dim)
    encoder = StyleEncoder(cfg)
    try:
        missing, unexpected = encoder.load_state_dict(enc, strict=False)
    except RuntimeError as exc:
        raise CheckpointFormatError(f"{path}: encoder weights do not fit the pSp layout: {str(exc)[:400]}") from exc
    missing = [m for m in missing if "num_batches_tracked" not in m]
    if missing or unexpected:
        raise CheckpointFormatError(f"encoder weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if cfg.n_styles != gen.n_latent:
        raise CheckpointFormatError(f"encoder has {cfg.n_styles} styles, generator needs {gen.n_latent}")
    return encoder.eval(), gen.eval(), _latent_avg(obj, gen.n_latent), opts


# --- writers of the public formats (benchmarks and tests make checkpoints without the real weights)
def save_stylegan2(path: Path, generator: Generator, latent_avg: torch.Tensor | None = None) -> Path:
    """A rosinality-format file: ``g_ema`` state dict, ``latent_avg`` (style_dim,) and ``args``."""
    obj: dict[str, Any] = {"g_ema": generator.state_dict(), "args": argparse.Namespace(size=generator.config.size, channel_multiplier=2)}
    if latent_avg is not None:
        obj["latent_avg"] = latent_avg
    torch.save(obj, path)
    return Path(path)


def save_psp(path: Path, encoder: StyleEncoder, generator: Generator, latent_avg: torch.Tensor) -> Path:
    """A pSp / e4e file: ``state_dict`` with ``encoder.`` / ``decoder.`` prefixes, ``latent_avg``, ``opts``."""
    sd = {f"encoder.{k}": v for k, v in encoder.state_dict().items()} | {f"decoder.{k}": v for k, v in generator.state_dict().items()}
    opts = {"encoder_type": "Encoder4Editing" if encoder.config.mode == "e4e" else "GradualStyleEncoder", "start_from_latent_avg": True,
            "output_size": generator.config.size}
    torch.save({"state_dict": sd, "latent_avg": latent_avg, "opts": opts}, path)
    return Path(path)
