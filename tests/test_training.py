"""The prior's training stages on tiny models: seeded, resumable to the same weights, and the GAN recipe."""
from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from facetier.pipelines.training.bundles import tiny_configs
from facetier.pipelines.training.gan import GanTrainConfig, prior_from_gan, train_gan
from facetier.pipelines.training.prior import PriorTrainConfig, train_prior

from facetier.errors import ConfigError

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def faces() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)


def _state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _same_state(a: object, b: object) -> bool:
    """Deep equality of checkpoint contents: tensors, optimiser states, numbers."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same_state(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b


def test_prior_resumes_to_the_weights_of_an_uninterrupted_run(faces, tmp_path):
    gen, enc, _ = tiny_configs(32)
    cfg = PriorTrainConfig(steps=6, batch_size=4, adv_weight=0.02, adv_start=2, r1_every=2, checkpoint_every=2, ema_start=0)
    whole = _state(train_prior(faces, tmp_path / "whole", gen, enc, cfg, CPU))
    train_prior(faces, tmp_path / "split", gen, enc, replace(cfg, steps=3), CPU)
    split = _state(train_prior(faces, tmp_path / "split", gen, enc, cfg, CPU))
    assert int(split["step"]) == int(whole["step"]) == 6
    assert _same_state(whole, split)
    assert not _same_tensors(whole["model"], whole["ema"])  # the EMA averages, so its restoring is tested too


def test_gan_resumes_to_the_weights_of_an_uninterrupted_run(faces, tmp_path):
    gen, _, _ = tiny_configs(32)
    cfg = GanTrainConfig(steps=6, batch_size=4, r1_every=2, pl_every=2, checkpoint_every=2, ema_start=0)
    whole = _state(train_gan(faces, tmp_path / "whole", gen, cfg, CPU))
    train_gan(faces, tmp_path / "split", gen, replace(cfg, steps=3), CPU)
    split = _state(train_gan(faces, tmp_path / "split", gen, cfg, CPU))
    assert _same_state(whole, split)
    assert float(whole["pl_mean"]) > 0 and float(whole["w_avg"].abs().sum()) > 0
    assert not _same_tensors(whole["generator"], whole["ema"])


def test_encoder_trains_against_the_frozen_gan_generator(faces, tmp_path):
    gen, enc, _ = tiny_configs(32)
    train_gan(faces, tmp_path, gen, GanTrainConfig(steps=4, batch_size=4), CPU)
    start = _state(prior_from_gan(tmp_path, gen, enc))["model"]
    gan_ema = _state(tmp_path / "gan_ckpt.pt")["ema"]
    assert all(torch.equal(start[f"generator.{k}"], v) for k, v in gan_ema.items())
    end = _state(train_prior(faces, tmp_path, gen, enc, PriorTrainConfig(steps=5, batch_size=4, train_generator=False), CPU))["model"]
    generator_keys = [k for k in start if k.startswith("generator.")]
    encoder_keys = [k for k in start if k.startswith("encoder.") and start[k].is_floating_point()]
    assert all(torch.equal(start[k], end[k]) for k in generator_keys)
    assert any(not torch.equal(start[k], end[k]) for k in encoder_keys)


def test_freeze_generator_needs_a_gan_and_the_prior_stage(tmp_path):
    from facetier.pipelines.training import stages as train_stages

    gen, enc, _ = tiny_configs(32)
    with pytest.raises(ConfigError, match="train gan"):
        prior_from_gan(tmp_path, gen, enc)
    args = argparse.Namespace(stage="entropy", freeze_generator=True, overrides=[], batch_size=None)
    with pytest.raises(ConfigError, match="prior stage only"):
        train_stages.run_train(args)
    with pytest.raises(ConfigError, match="prior and gan stages only"):
        train_stages.run_train(argparse.Namespace(stage="semantic", freeze_generator=False, overrides=[], batch_size=32))


def test_eval_prior_reports_encoder_and_inversion(sample_archive, tmp_path):
    import json

    from facetier.pipelines.evaluation.prior_reconstruction import evaluate_priors

    gen, enc, _ = tiny_configs(32)
    faces = np.random.default_rng(1).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    train_prior(faces, tmp_path / "a", gen, enc, PriorTrainConfig(steps=2, batch_size=4), CPU)
    evaluation = evaluate_priors([str(tmp_path / "a")], str(sample_archive), limit=50, invert_steps=30, report=str(tmp_path / "r.json"),
                            gallery=str(tmp_path / "g.png"))
    encoder, inverted = evaluation.results
    assert evaluation.pairs is None and encoder.lfw_accuracy is None
    assert (encoder.method, inverted.method, encoder.step) == ("encoder", "inverted-30", 2)
    assert inverted.psnr_db > encoder.psnr_db + 0.5  # optimising W+ against the crop must beat the untrained encoder
    assert 0 <= encoder.same_person <= 1 and encoder.dlib_distance > 0
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["faces"] >= 3 and len(saved["results"]) == 2
    from PIL import Image

    assert Image.open(tmp_path / "g.png").size == (3 * 32, min(8, saved["faces"]) * 32)  # crop | encoder | inverted
    with pytest.raises(ConfigError, match="no prior checkpoint"):
        evaluate_priors([str(tmp_path / "missing")], str(sample_archive))


def test_freezing_the_generator_of_a_joint_run_continues_with_a_fresh_optimiser(faces, tmp_path):
    gen, enc, _ = tiny_configs(32)
    train_prior(faces, tmp_path, gen, enc, PriorTrainConfig(steps=2, batch_size=4), CPU)
    before = _state(tmp_path / "prior_ckpt.pt")["model"]
    after = _state(train_prior(faces, tmp_path, gen, enc, PriorTrainConfig(steps=4, batch_size=4, train_generator=False), CPU))
    assert int(after["step"]) == 4
    assert all(torch.equal(before[k], after["model"][k]) for k in before if k.startswith("generator."))


def test_cli_gan_then_frozen_encoder(tmp_path, monkeypatch):
    """`train gan` then `train prior --freeze-generator` through the CLI glue: the encoder starts
    from the GAN's EMA generator and trains without the adversarial term."""
    from facetier.cli import build_parser
    from facetier.pipelines.training import stages as train_stages

    monkeypatch.setattr(train_stages, "_faces", lambda a, alignment: np.random.default_rng(0).integers(0, 256, (8, 128, 128, 3), dtype=np.uint8))
    common = ["--work", str(tmp_path), "--steps", "1", "--batch-size", "2", "--device", "cpu"]
    assert train_stages.run_train(build_parser().parse_args(["train", "gan", *common])) == 0
    assert train_stages.run_train(build_parser().parse_args(["train", "prior", "--freeze-generator", *common])) == 0
    prior, gan = _state(tmp_path / "prior_ckpt.pt"), _state(tmp_path / "gan_ckpt.pt")
    assert "disc" not in prior and int(prior["step"]) == 1
    assert all(torch.equal(prior["model"][f"generator.{k}"], v) for k, v in gan["ema"].items())


def test_the_embedded_lineage_keeps_its_names(tmp_path):
    """A work folder with no imported prior is the embedded design: same face cache, codec id and default output as ever."""
    from facetier.cli import build_parser
    from facetier.pipelines.training.bundles import EMBEDDED_ALIGNMENT, PriorSetup
    from facetier.pipelines.training.stages import EMBEDDED_OUT, _out, face_cache_path

    setup = PriorSetup.load(tmp_path)
    assert setup == PriorSetup.embedded() and setup.codec_id == "facetier-prior-128-v1"
    assert face_cache_path(tmp_path, EMBEDDED_ALIGNMENT).name == "faces_128_s080.npy"
    args = build_parser().parse_args(["train", "entropy", "--work", str(tmp_path)])
    assert str(_out(args, setup)) == EMBEDDED_OUT == "codec/assets/facetier-prior-128.safetensors"
    with pytest.raises(ConfigError, match="give --out"):
        _out(build_parser().parse_args(["train", "entropy", "--from-bundle", "x.safetensors"]))
    with pytest.raises(ConfigError, match="--codec-id"):
        train_stages_run(["train", "prior", "--codec-id", "x", "--work", str(tmp_path)])


def train_stages_run(argv: list[str]) -> int:
    from facetier.cli import build_parser
    from facetier.pipelines.training.stages import run_train

    return run_train(build_parser().parse_args(argv))
