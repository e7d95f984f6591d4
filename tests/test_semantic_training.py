"""Training the semantic base layer: the face descriptor input and the edit-consistency term."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from facetier.codec.face_descriptor import DESCRIPTOR_ID, FaceDescriptor
from facetier.codec.semantic import SemanticConfig
from facetier.pipelines.training.semantic_fit import (
    PixelInputs,
    SemanticLabels,
    SemanticTrainConfig,
    train_semantic,
)

from facetier.errors import ConfigError


def test_unknown_descriptor_is_a_config_error():
    with pytest.raises(ConfigError, match="face descriptor"):
        SemanticConfig(descriptor="arcface-r100")


def test_descriptor_is_reproducible_and_needs_the_crop(tiny_codec, generated_faces):
    assert tiny_codec.semantic.cfg.descriptor == DESCRIPTOR_ID
    crops = generated_faces[:2]
    a, b = FaceDescriptor().embed_crops(crops), FaceDescriptor().embed_crops(crops)
    assert a.shape == (2, 128) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert np.linalg.norm(a[0] - a[1]) > 0.1  # two different generated faces are told apart
    w = np.zeros((1, *tiny_codec.semantic.wplus_shape), np.float32)
    with pytest.raises(ConfigError, match="descriptor|crop"):
        tiny_codec.semantic.encode(w)


def _synthetic(n: int, seed: int) -> tuple[np.ndarray, SemanticLabels]:
    """W+ that moves along one fixed direction with age, plus unrelated variation."""
    rng = np.random.default_rng(seed)
    age = rng.uniform(10, 70, n).astype(np.float32)
    direction = rng.normal(0, 1, 24).astype(np.float32)
    direction /= np.linalg.norm(direction)
    w = rng.normal(0, 1, (n, 24)).astype(np.float32) * 0.5 + (age[:, None] - 40) / 10 * direction
    labels = SemanticLabels(age=age, gender=rng.integers(0, 2, n), race=rng.integers(0, 5, n),
                            measured=np.zeros((n, 5), np.float32), identity=np.zeros((n, 128), np.float32))
    return w.reshape(n, 2, 12), labels


@pytest.mark.parametrize("gain", [1.0, 3.0])
def test_edit_term_makes_an_attribute_move_follow_its_direction(gain):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a few hundred tiny steps: threads only add overhead
    w, labels = _synthetic(1024, seed=0)
    scfg = SemanticConfig(code_dim=16, pca_dim=12, hidden=64)
    cfg = SemanticTrainConfig(steps=1500, batch_size=128, lr=3e-3, eval_every=100, lambda_w=3000.0, lambda_edit=10000.0, edit_gain=gain, edit_start=0.4, seed=0)
    try:
        _, _, figures = train_semantic(w, labels, scfg, cfg, PixelInputs(None, None))
    finally:
        torch.set_num_threads(threads)
    age_coord = scfg.attribute("age").coords[0]
    assert figures[f"edit_gain_coord_{age_coord}"] == pytest.approx(gain, rel=0.25)
    assert figures["age_mae"] < 6.0


def test_training_settings_parse_and_refuse_unknown_names():
    from facetier.pipelines.training.stages import with_overrides

    cfg = with_overrides(SemanticTrainConfig(), ["lambda_id=100", "edit_gain = 1.5"])
    assert cfg.lambda_id == 100.0 and cfg.edit_gain == 1.5
    for bad in (["lambda_idx=1"], ["lambda_id"], ["lambda_id=lots"], ["steps=10"]):
        with pytest.raises(ConfigError):
            with_overrides(SemanticTrainConfig(), bad)


def test_wrongly_shaped_descriptors_are_config_errors(tiny_codec):
    crops = np.zeros((2, 32, 32, 3), np.uint8)
    with pytest.raises(ConfigError, match="descriptors"):
        tiny_codec.encode_crops(crops, descriptors=np.zeros((2, 64), np.float32))
