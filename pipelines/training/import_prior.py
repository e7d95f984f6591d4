"""``facetier import-prior``: a facetier bundle from public StyleGAN2 and pSp / e4e checkpoints.

The generator and encoder go into the bundle as they are (any resolution and W+ length the files
define, float32), with the mean W+ the encoder was trained around, FFHQ's alignment (what pSp and
e4e were trained on) and the layer plan for that W+ length. What it does not have yet are the
entropy models of its layers: ``facetier train entropy --from-bundle`` fits them on the user's
faces (and ``train semantic --from-bundle`` the semantic base layer), small networks that train on
a CPU. Without an encoder the bundle holds a generator that ``facetier train prior
--freeze-generator --init-from-bundle`` trains an encoder against.

Nothing is unpickled: the checkpoints are read by :mod:`facetier.codec.checkpoints`.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
from facetier.codec.align import AlignmentConfig
from facetier.codec.checkpoints import (
    ModelConfig,
    PartSource,
    load_psp,
    load_stylegan2,
    save_bundle,
    tensors_hash,
)
from facetier.codec.encoder import EncoderConfig
from facetier.codec.layers import LayerPlan
from facetier.codec.stylegan import Generator, GeneratorConfig

from facetier.errors import ConfigError

log = logging.getLogger(__name__)

FFHQ_CROP_SCALE = 1.0  # FFHQ's framing, which pSp and e4e were trained on
MEAN_LATENT_SAMPLES = 10_000  # rosinality's mean_latent, for generators saved without latent_avg


@dataclass(frozen=True)
class ImportedPrior:
    path: Path
    weights_hash: str
    codec_id: str
    size: int
    n_latent: int
    has_encoder: bool
    plan: LayerPlan

    def render(self) -> str:
        rows = ", ".join(f"{s.name} rows {s.rows[0]}-{s.rows[-1]}" for s in self.plan.layers)
        lines = [f"wrote {self.path} ({self.codec_id}, weights {self.weights_hash[:12]}): {self.size} px, {self.n_latent} W+ rows; {rows}"]
        if self.has_encoder:
            lines += ["next: fit its layers on your faces, then encode with it:",
                      f"  facetier train entropy --from-bundle {self.path} --lists YOUR_LIST.txt --work runs/import --out CODEC.safetensors",
                      "  facetier train semantic --from-bundle CODEC.safetensors --lists YOUR_LIST.txt --work runs/import --out SEMANTIC.safetensors"]
        else:
            lines += ["no encoder: this bundle cannot encode faces yet. Train one against its generator, then fit the layers:",
                      f"  facetier train prior --freeze-generator --init-from-bundle {self.path} --lists YOUR_LIST.txt --work runs/encoder",
                      "  facetier train entropy --work runs/encoder --lists YOUR_LIST.txt --out CODEC.safetensors"]
        return "\n".join(lines)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def mean_latent(generator: Generator, samples: int = MEAN_LATENT_SAMPLES, seed: int = 0) -> torch.Tensor:
    """(n_latent, style_dim) mean W of the mapping network, as rosinality's ``mean_latent``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = torch.cat([generator.mapping(torch.randn(min(1000, samples - i), generator.config.style_dim, generator=g))
                       for i in range(0, samples, 1000)]).mean(0)
    return w[None].repeat(generator.n_latent, 1)


def compact_encoder_config(gen_cfg: GeneratorConfig) -> EncoderConfig:
    """facetier's own narrow encoder design, sized for ``gen_cfg``: what ``--new-encoder compact`` trains."""
    return EncoderConfig(input_size=min(256, gen_cfg.size), n_styles=gen_cfg.n_latent, style_dim=gen_cfg.style_dim)


def psp_encoder_config(gen_cfg: GeneratorConfig) -> EncoderConfig:
    """pSp's IR-SE50 GradualStyleEncoder for ``gen_cfg`` (256 px input, one style per W+ row)."""
    return replace(EncoderConfig.psp(gen_cfg.size), n_styles=gen_cfg.n_latent, style_dim=gen_cfg.style_dim)


def _generator_tensors(generator: Generator) -> dict[str, torch.Tensor]:
    return {k: v.detach().float() for k, v in generator.state_dict().items() if not k.startswith("noises.")}


def import_prior(
    out: Path,
    *,
    stylegan: Path | None = None,
    encoder: Path | None = None,
    codec_id: str | None = None,
    generator_license: str = "",
    encoder_license: str = "",
    new_encoder: Literal["psp", "compact"] | EncoderConfig = "psp",
) -> ImportedPrior:
    """Write a bundle from a rosinality StyleGAN2 file and/or a pSp / e4e file (whose decoder is a generator).

    ``new_encoder``: without ``encoder``, the encoder to train later: pSp's IR-SE50 for this
    generator, facetier's narrow design, or a configuration of your own.
    """
    if stylegan is None and encoder is None:
        raise ConfigError("import-prior needs --stylegan, --encoder or both")
    for p in (stylegan, encoder):
        if p is not None and not Path(p).is_file():
            raise ConfigError(f"no checkpoint at {p}")
    sources: list[PartSource] = []
    generator, avg, mode = None, None, None
    if stylegan is not None:
        generator, avg = load_stylegan2(Path(stylegan))
        sources.append(PartSource("generator", Path(stylegan).name, file_sha256(Path(stylegan)), generator_license))
    enc_tensors: dict[str, torch.Tensor] = {}
    if encoder is not None:
        enc_model, decoder, enc_avg, opts = load_psp(Path(encoder))
        if generator is not None and (generator.config != decoder.config
                                      or tensors_hash(_generator_tensors(generator)) != tensors_hash(_generator_tensors(decoder))):
            raise ConfigError(f"{encoder} was trained against another generator than {stylegan} (its decoder weights differ); "
                              "give only --encoder to use the generator it was trained with")
        if generator is None:
            generator = decoder
            sources.append(PartSource("generator", f"{Path(encoder).name} (decoder)", file_sha256(Path(encoder)), generator_license or encoder_license))
        sources.append(PartSource("encoder", Path(encoder).name, file_sha256(Path(encoder)), encoder_license))
        enc_cfg = enc_model.config
        enc_tensors = {f"encoder.{k}": v.detach().float() for k, v in enc_model.state_dict().items()}
        mode = enc_cfg.mode
        if opts.get("start_from_latent_avg", True) is False:
            # this encoder outputs W+ itself; facetier adds latent_avg to the encoder's output
            avg = torch.zeros(generator.n_latent, generator.config.style_dim)
        elif enc_avg is not None:
            avg = enc_avg
    else:
        assert generator is not None  # no --encoder: --stylegan gave it
        if isinstance(new_encoder, EncoderConfig):
            enc_cfg = new_encoder
        else:
            enc_cfg = compact_encoder_config(generator.config) if new_encoder == "compact" else psp_encoder_config(generator.config)
        if (enc_cfg.n_styles, enc_cfg.style_dim) != (generator.n_latent, generator.config.style_dim):
            raise ConfigError(f"the new encoder must output {generator.n_latent} styles of {generator.config.style_dim}")
    gen_cfg = generator.config
    if avg is None:
        log.info("no latent_avg in the checkpoints: averaging the mapping network over %d samples", MEAN_LATENT_SAMPLES)
        avg = mean_latent(generator)
        sources.append(PartSource("latent_avg", f"mean of {MEAN_LATENT_SAMPLES} mapped samples", "", ""))
    codec_id = codec_id or f"stylegan2-{gen_cfg.size}" + (f"-{mode}" if mode else "")
    plan = LayerPlan.default(gen_cfg.n_latent)
    tensors = {f"generator.{k}": v for k, v in _generator_tensors(generator).items()} | enc_tensors | {"latent_avg": avg.float().contiguous()}
    config = ModelConfig(codec_id=codec_id, generator=gen_cfg, encoder=enc_cfg,
                         alignment=AlignmentConfig(size=gen_cfg.size, crop_scale=FFHQ_CROP_SCALE), plan=plan, sources=tuple(sources))
    digest = save_bundle(Path(out), config, tensors)
    return ImportedPrior(Path(out), digest, codec_id, gen_cfg.size, gen_cfg.n_latent, bool(enc_tensors), plan)
