"""Loaders for real checkpoint formats, on files written with the public key names and random weights."""
from __future__ import annotations

import argparse

import pytest
import torch
from facetier.codec.checkpoints import load_psp, load_stylegan2
from facetier.codec.encoder import EncoderConfig, StyleEncoder
from facetier.codec.stylegan import Generator, GeneratorConfig

from facetier.errors import CheckpointFormatError


def test_stylegan2_ffhq_1024_state_dict(tmp_path):
    torch.manual_seed(0)
    g = Generator(GeneratorConfig.ffhq(1024)).eval()
    sd = g.state_dict()
    assert "convs.0.conv.blur.kernel" in sd and "to_rgbs.0.upsample.kernel" in sd and "style.8.weight" in sd
    path = tmp_path / "stylegan2-ffhq-config-f.pt"
    torch.save({"g_ema": sd, "latent_avg": torch.randn(512), "args": argparse.Namespace(size=1024, channel_multiplier=2)}, path)
    loaded, avg = load_stylegan2(path)
    assert loaded.n_latent == 18 and loaded.config.size == 1024 and avg.shape == (18, 512)
    w = torch.randn(1, 18, 512) * 0.1
    with torch.no_grad():
        assert torch.equal(loaded(w), g(w))


def test_psp_and_e4e_layout(tmp_path):
    torch.manual_seed(0)
    gen = Generator(GeneratorConfig(size=64, style_dim=32, n_mlp=2, channels={4: 32, 8: 32, 16: 16, 32: 16, 64: 8}))
    enc_cfg = EncoderConfig(input_size=64, n_styles=gen.n_latent, style_dim=32, stem_channels=16, stage_channels=(16, 24, 32, 48), stage_units=(1, 2, 3, 1), block_channels=32)
    for encoder_type, mode in (("GradualStyleEncoder", "psp"), ("Encoder4Editing", "e4e")):
        enc = StyleEncoder(EncoderConfig(**{**enc_cfg.__dict__, "mode": mode})).eval()
        sd = {f"encoder.{k}": v for k, v in enc.state_dict().items()} | {f"decoder.{k}": v for k, v in gen.state_dict().items()}
        path = tmp_path / f"{mode}.pt"
        torch.save({"state_dict": sd, "latent_avg": torch.randn(gen.n_latent, 32), "opts": {"encoder_type": encoder_type, "stylegan_size": 64}}, path)
        enc2, gen2, avg, opts = load_psp(path)
        assert enc2.config.stage_units == (1, 2, 3, 1) and enc2.config.mode == mode
        x = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            assert torch.allclose(enc2(x), enc(x))
        assert avg.shape == (gen.n_latent, 32) and opts["encoder_type"] == encoder_type


@pytest.mark.slow
def test_psp_full_size_ir_se50(tmp_path):
    enc = StyleEncoder(EncoderConfig.psp(1024))
    gen = Generator(GeneratorConfig.ffhq(1024))
    sd = {f"encoder.{k}": v for k, v in enc.state_dict().items()} | {f"decoder.{k}": v for k, v in gen.state_dict().items()}
    path = tmp_path / "psp_ffhq_encode.pt"
    torch.save({"state_dict": sd, "latent_avg": torch.randn(18, 512), "opts": {"encoder_type": "GradualStyleEncoder"}}, path)
    enc2, gen2, _, _ = load_psp(path)
    assert enc2.config == EncoderConfig.psp(1024)


def test_bad_checkpoints_are_typed_errors(tmp_path):
    p = tmp_path / "x.pt"
    torch.save({"something": torch.zeros(1)}, p)
    with pytest.raises(CheckpointFormatError):
        load_stylegan2(p)
    with pytest.raises(CheckpointFormatError):
        load_psp(p)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointFormatError):
        load_stylegan2(tmp_path / "junk.pt")
