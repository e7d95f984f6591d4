"""Bring your own prior, end to end, on checkpoints the tests write in the public formats.

rosinality's StyleGAN2 files (``g_ema``, ``latent_avg``, ``args``) and pSp / e4e files
(``state_dict`` with ``encoder.`` / ``decoder.`` prefixes, ``latent_avg``, ``opts``) with random
weights and reduced channel widths, at the 256 px (14 W+ rows) and 1024 px (18 rows) layouts:
import -> fit the layers (and the semantic base) on self-made faces -> encode -> decode every
prefix, and the codes round-trip bit for bit.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from facetier.cli import main
from facetier.codec import container
from facetier.codec.checkpoints import load_bundle, save_psp, save_stylegan2
from facetier.codec.encoder import EncoderConfig, StyleEncoder
from facetier.codec.layers import RESIDUAL
from facetier.codec.model import FaceCodec
from facetier.codec.stylegan import Generator, GeneratorConfig
from facetier.pipelines.training.import_prior import import_prior
from PIL import Image

from facetier.errors import CheckpointFormatError, ConfigError, ModelError

NVIDIA_NC = "NVIDIA Source Code License-NC (research and evaluation only)"
WIDTHS = {4: 16, 8: 16, 16: 16, 32: 8, 64: 8, 128: 8, 256: 8, 512: 4, 1024: 4}


def tiny_generator(size: int, seed: int = 0) -> Generator:
    torch.manual_seed(seed)
    return Generator(GeneratorConfig(size=size, style_dim=32, n_mlp=2, channels={k: v for k, v in WIDTHS.items() if k <= size})).eval()


def tiny_psp_encoder(gen: Generator, mode: str = "psp") -> StyleEncoder:
    cfg = EncoderConfig(input_size=64, n_styles=gen.n_latent, style_dim=32, stem_channels=8, stage_channels=(8, 12, 16, 24),
                        stage_units=(1, 1, 1, 1), block_channels=16, mode=mode)  # type: ignore[arg-type]
    return StyleEncoder(cfg).eval()


def write_rosinality(path: Path, gen: Generator, with_avg: bool = True) -> Path:
    with torch.no_grad():
        avg = gen.mapping(torch.randn(256, gen.config.style_dim)).mean(0) if with_avg else None
    return save_stylegan2(path, gen, avg)


def write_psp(path: Path, gen: Generator, enc: StyleEncoder) -> Path:
    return save_psp(path, enc, gen, torch.randn(gen.n_latent, gen.config.style_dim) * 0.1)


@pytest.fixture(scope="module")
def face_list(embedded_codec, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A training list of 20 generated face photos (the user's own faces, in real use)."""
    from facetier.pipelines.jobs.sample_archive import build_sample_archive

    folder = tmp_path_factory.mktemp("faces")
    build_sample_archive(folder, embedded_codec, n_faces=20, seed=5)
    out = folder / "train_images.txt"
    out.write_text("\n".join(str(p) for p in sorted(folder.glob("generated-*.jpg"))) + "\n")
    return out


def _train(*args: str) -> None:
    assert main(["train", *args]) == 0


def _round_trip(codec: FaceCodec, crops: np.ndarray) -> None:
    """Every prefix decodes; the stream survives the container and re-encoding its decoded symbols gives the same bytes."""
    codes = codec.encode_crops(crops)
    for code in codes:
        assert container.from_bytes(container.to_bytes(code)) == code
        symbols = codec.decode_symbols(code, codec.plan.names[-1])
        context = np.zeros(0, np.int64)
        for coder, sym in zip(codec.coders, symbols):
            assert coder.encode(sym, context) == code.layer(coder.model.name).payload
            context = np.concatenate([context, sym])
    for upto in (*codec.plan.names, RESIDUAL):
        decoded = codec.decode_many(codes, upto)
        assert decoded[0].image.shape == (codec.size, codec.size, 3) and decoded[0].generated


def test_import_fit_encode_decode_256(tmp_path: Path, face_list: Path, sample_archive: Path, capsys):
    gen = tiny_generator(256)
    g_file = write_rosinality(tmp_path / "stylegan2-ffhq-256.pt", gen)
    psp_file = write_psp(tmp_path / "psp_ffhq_encode.pt", gen, tiny_psp_encoder(gen))
    imported = tmp_path / "imported.safetensors"
    assert main(["import-prior", "--stylegan", str(g_file), "--encoder", str(psp_file), "--out", str(imported),
                 "--generator-license", NVIDIA_NC, "--encoder-license", "MIT"]) == 0
    assert "facetier train entropy --from-bundle" in capsys.readouterr().out
    bundle = load_bundle(imported)
    assert bundle.config.generator.size == 256 and bundle.config.generator.n_latent == 14
    assert [s.rows for s in bundle.config.plan.layers] == [(0, 1, 2), (3, 4, 5, 6), tuple(range(7, 14))]
    assert bundle.config.alignment.crop_scale == 1.0 and bundle.config.alignment.size == 256
    assert torch.equal(bundle.prefixed("generator.")["convs.0.conv.weight"], gen.state_dict()["convs.0.conv.weight"])
    with pytest.raises(ModelError, match="train entropy --from-bundle"):
        FaceCodec(bundle, device="cpu")

    work, fitted, semantic = tmp_path / "work", tmp_path / "codec.safetensors", tmp_path / "semantic.safetensors"
    capsys.readouterr()
    assert main(["train", "entropy", "--from-bundle", str(imported), "--lists", str(face_list), "--work", str(work)]) == 2
    assert "give --out" in capsys.readouterr().err  # never a silent overwrite of the shipped model
    _train("entropy", "--from-bundle", str(imported), "--lists", str(face_list), "--work", str(work), "--out", str(fitted), "--steps", "20")
    _train("semantic", "--from-bundle", str(fitted), "--lists", str(face_list), "--work", str(work), "--out", str(semantic),
           "--steps", "5", "--entropy-steps", "20")
    capsys.readouterr()
    assert main(["info", "--weights", str(semantic)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["can_code"] and info["codec_id"] == "stylegan2-256-psp-semantic" and info["semantic"] is not None
    parts = {s["part"]: s for s in info["sources"]}
    assert parts["generator"]["license"] == NVIDIA_NC and parts["encoder"]["license"] == "MIT"
    assert parts["generator"]["sha256"] and parts["layers"]["origin"] == "facetier train semantic"

    relinear = tmp_path / "relinear.safetensors"  # back from the semantic base to linear layers: not called "-semantic"
    _train("entropy", "--from-bundle", str(semantic), "--lists", str(face_list), "--work", str(work), "--out", str(relinear), "--steps", "5")
    assert load_bundle(relinear).config.codec_id == "stylegan2-256-psp" and not load_bundle(relinear).config.plan.is_semantic

    codec = FaceCodec.load(semantic, device="cpu")
    faces = codec.align(np.asarray(Image.open(sorted(sample_archive.glob("generated-*.jpg"))[0]).convert("RGB")))
    _round_trip(codec, np.stack([faces[0].crop]))
    _round_trip(FaceCodec.load(fitted, device="cpu"), np.stack([faces[0].crop]))

    # every facetier command accepts it: the encode job and decode by id
    table = tmp_path / "table"
    assert main(["encode", str(sample_archive), str(table), "--weights", str(semantic), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["query", str(table), "select face_id from faces order by face_id limit 1"]) == 0
    face_id = capsys.readouterr().out.split()[-1]
    assert main(["decode", str(table), "--ids", face_id, "--upto", "middle", "--out", str(tmp_path / "out"), "--weights", str(semantic)]) == 0
    assert (tmp_path / "out" / f"{face_id}_middle.png").exists()


def test_import_1024_layout_from_an_e4e_file_alone(tmp_path: Path, face_list: Path, generated_faces: np.ndarray):
    gen = tiny_generator(1024, seed=1)
    e4e = write_psp(tmp_path / "e4e_ffhq_encode.pt", gen, tiny_psp_encoder(gen, "e4e"))
    # the generator is the file's decoder, under the generator's licence when one is declared
    result = import_prior(tmp_path / "imported.safetensors", encoder=e4e, generator_license=NVIDIA_NC, encoder_license="MIT")
    licences = {s.part: s.license for s in load_bundle(result.path).config.sources}
    assert licences == {"generator": NVIDIA_NC, "encoder": "MIT"}
    assert (result.size, result.n_latent, result.codec_id) == (1024, 18, "stylegan2-1024-e4e")
    assert [s.rows[0] for s in result.plan.layers] == [0, 3, 7] and result.plan.layers[-1].rows[-1] == 17
    fitted = tmp_path / "codec.safetensors"
    _train("entropy", "--from-bundle", str(result.path), "--lists", str(face_list), "--work", str(tmp_path / "w"), "--out", str(fitted), "--steps", "20")
    codec = FaceCodec.load(fitted, device="cpu")
    assert load_bundle(fitted).config.encoder.mode == "e4e"
    crop = np.asarray(Image.fromarray(generated_faces[0]).resize((1024, 1024)))
    _round_trip(codec, crop[None])


def test_generator_alone_trains_an_encoder_then_codes(tmp_path: Path, face_list: Path, capsys):
    gen = tiny_generator(256, seed=2)
    g_file = write_rosinality(tmp_path / "g.pt", gen, with_avg=False)
    enc_cfg = tiny_psp_encoder(gen).config
    result = import_prior(tmp_path / "gen-only.safetensors", stylegan=g_file, new_encoder=enc_cfg)
    assert not result.has_encoder and "--init-from-bundle" in result.render()
    bundle = load_bundle(result.path)
    assert any(s.part == "latent_avg" for s in bundle.config.sources)  # computed from the mapping network
    with pytest.raises(ModelError, match="without an encoder"):
        FaceCodec(bundle, device="cpu")
    work = tmp_path / "work"
    def prior_args(bundle: Path, steps: int) -> list[str]:
        return ["prior", "--freeze-generator", "--init-from-bundle", str(bundle), "--lists", str(face_list), "--work", str(work),
                "--steps", str(steps), "--batch-size", "2", "--device", "cpu"]

    _train(*prior_args(result.path, 2))
    _train(*prior_args(result.path, 3))  # the same command again resumes
    assert int(torch.load(work / "prior_ckpt.pt", weights_only=True)["step"]) == 3
    out = tmp_path / "codec.safetensors"
    _train("entropy", "--work", str(work), "--lists", str(face_list), "--out", str(out), "--steps", "20")
    fitted = load_bundle(out)
    assert fitted.config.generator.size == 256 and fitted.config.alignment.crop_scale == 1.0
    assert torch.equal(fitted.prefixed("generator.")["convs.0.conv.weight"].float(), gen.state_dict()["convs.0.conv.weight"].half().float())
    origins = {s.part: s.origin for s in fitted.config.sources}
    assert origins["encoder"] == "facetier train prior --freeze-generator" and "fine-tuned" not in origins["generator"]
    assert fitted.config.codec_id == "stylegan2-256-tuned"  # its weights are not the imported ones: not the imported id
    FaceCodec(fitted, device="cpu")
    other = import_prior(tmp_path / "other.safetensors", stylegan=write_rosinality(tmp_path / "g2.pt", tiny_generator(256, seed=3)), new_encoder=enc_cfg)
    capsys.readouterr()
    assert main(["train", *prior_args(other.path, 4)]) == 2
    assert "already trains another prior" in capsys.readouterr().err


class _RunsCode:
    """An object whose unpickling would create a file: a loader that executes pickled code is caught by it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_checkpoints_that_are_not_what_they_claim(tmp_path: Path, capsys):
    gen = tiny_generator(256)
    good = write_rosinality(tmp_path / "good.pt", gen)
    out = str(tmp_path / "b.safetensors")
    # wrong shapes
    sd = dict(gen.state_dict())
    sd["convs.0.conv.weight"] = torch.zeros(1, 3, 3)
    torch.save({"g_ema": sd}, tmp_path / "shapes.pt")
    # a checkpoint with code in it: torch.load(weights_only=False) would create the marker file
    marker = tmp_path / "pwned"
    torch.save({"g_ema": _RunsCode(marker)}, tmp_path / "code.pt")
    torch.save({"g_ema": {"g_ema": 1}}, tmp_path / "nested.pt")
    # a missing key: a pSp file without its decoder
    enc = tiny_psp_encoder(gen)
    torch.save({"state_dict": {f"encoder.{k}": v for k, v in enc.state_dict().items()}, "opts": {}}, tmp_path / "no-decoder.pt")
    for name in ("shapes.pt", "code.pt", "nested.pt"):
        with pytest.raises(CheckpointFormatError):
            import_prior(Path(out), stylegan=tmp_path / name)
    with pytest.raises(CheckpointFormatError, match="decoder"):
        import_prior(Path(out), encoder=tmp_path / "no-decoder.pt")
    assert not marker.exists(), "unpickling ran code"
    # an encoder trained against another generator than the one given
    psp = write_psp(tmp_path / "psp.pt", tiny_generator(256, seed=9), enc)
    with pytest.raises(ConfigError, match="another generator"):
        import_prior(Path(out), stylegan=good, encoder=psp)
    # through the CLI: one typed line on stderr, exit 2, nothing written
    assert main(["import-prior", "--stylegan", str(tmp_path / "code.pt"), "--out", out]) == 2
    assert "CheckpointFormatError" in capsys.readouterr().err
    assert main(["import-prior", "--out", out]) == 2 and not Path(out).exists() and not marker.exists()


def test_bench_prior_times_every_stage_of_an_imported_bundle(tmp_path: Path):
    """The speed benchmark's report on reduced widths (the real run uses the public ones)."""
    from facetier.pipelines.evaluation.prior_speed import measure_size, render

    gen = tiny_generator(256)
    row = measure_size(256, faces=2, batch=1, work=tmp_path, generator=gen.config, encoder=tiny_psp_encoder(gen).config)
    assert (row.size, row.faces, row.device) == (256, 2, "cpu")
    assert row.generator_params == sum(p.numel() for p in gen.parameters())
    for ms in (row.encoder_ms, row.layer_coding_ms, row.encode_all_layers_ms, row.decode_enhanced_ms, row.decode_residual_ms):
        assert ms > 0
    assert row.encode_all_layers_ms > row.encoder_ms  # the full encode includes the encoder
    assert row.peak_rss_mb > 0 and row.bundle_mb > 0
    assert "256" in render([row])
