"""The layers for people: raw bitstreams without their containers, rungs, byte budgets, and the
preview / detail / residual chain, old residuals included."""
from __future__ import annotations

import io
import math
from dataclasses import replace

import numpy as np
import pytest
from facetier.codec import human_layers, image_layers, raw_bitstreams, rungs
from facetier.codec.human_layers import DETAIL, PREVIEW, HumanLayerPlan, RungSetting
from facetier.codec.layers import RESIDUAL, LayerCode, LayeredCode
from facetier.codec.rungs import OWN, PREDICTED, RungCandidate
from PIL import Image

from facetier.errors import ConfigError, MissingLayerError, RawStreamError


def _face(size: int = 64, seed: int = 0) -> np.ndarray:
    """A smooth image with some edges: what a codec at low rates meets, unlike white noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    img = np.stack([128 + 90 * np.sin(6 * x + c) * np.cos(4 * y - c) for c in range(3)], -1)
    img[size // 4: size // 2, size // 3: 2 * size // 3] -= 60
    return np.clip(img + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8)


FORMATS = sorted(raw_bitstreams.available())


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("size", [32, 48, 64])
def test_raw_bitstream_rebuilds_the_encoders_file(fmt, size):
    f = raw_bitstreams.FORMATS[fmt]
    img = _face(size, size)
    for q in (0, 30, 70):
        raw = f.encode(img, q)
        rebuilt = f.container(raw, size)
        assert len(raw) < len(rebuilt), "the stripped stream keeps something a decoder could restore"
        decoded = f.decode(raw, size)
        assert decoded.shape == (size, size, 3)
        if fmt != raw_bitstreams.JPEGXL:  # Pillow reads the rebuilt file as any other
            assert np.array_equal(decoded, np.asarray(Image.open(io.BytesIO(rebuilt)).convert("RGB")))


def test_the_shipped_templates_are_what_the_installed_encoders_write():
    """A face stored today decodes from the shipped templates, not from whatever library is installed
    later; the encoders in the lock file must still write exactly them (else every AVIF and JPEG XL
    rung would fall back to WebP)."""
    for size in (32, 64, 128):
        if raw_bitstreams.AVIF in FORMATS:
            assert raw_bitstreams.capture_avif_template(size) == raw_bitstreams.avif_template(size)
        assert raw_bitstreams.capture_jxl_prefix(size) == raw_bitstreams.jxl_prefix(size)
    with pytest.raises(RawStreamError):
        raw_bitstreams.avif_template(33)


def test_avif_strips_most_of_its_container():
    if raw_bitstreams.AVIF not in FORMATS:
        pytest.skip("this Pillow has no AVIF")
    img = _face(64)
    raw = raw_bitstreams.FORMATS["avif"].encode(img, 30)
    assert len(raw_bitstreams.avif_container(raw, 64)) - len(raw) > 200  # boxes and sequence header


def test_a_damaged_raw_bitstream_raises_a_typed_error():
    with pytest.raises(RawStreamError):
        raw_bitstreams.FORMATS["webp"].decode(b"\x01\x02", 48)
    with pytest.raises(RawStreamError):
        raw_bitstreams.by_code(3)


@pytest.mark.parametrize("mode", [OWN, PREDICTED])
def test_a_rung_decodes_to_the_image_its_encoder_saw(mode):
    crop, reference = _face(64, 1), _face(64, 2)
    for fmt in FORMATS:
        for size in (32, 48, 64):
            c = RungCandidate(fmt, size, mode)
            coded = rungs.code_rung(crop, reference, c, 40)
            assert rungs.read_header(coded.payload) == (c, 40)
            assert np.array_equal(rungs.decode_rung(coded.payload, reference, 64), coded.image)


def test_rung_candidates_parse_and_refuse_nonsense():
    assert RungCandidate.parse("webp@48") == RungCandidate("webp", 48, OWN)
    assert RungCandidate.parse("avif@64:predicted") == RungCandidate("avif", 64, PREDICTED)
    for bad in ("webp", "gif@48", "webp@47", "webp@48:sideways"):
        with pytest.raises(ConfigError):
            RungCandidate.parse(bad)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("budget", [60, 120, 250, 600])
def test_fit_budget_lands_near_the_budget_in_a_few_tries(fmt, budget, monkeypatch):
    crop = _face(64, 3)
    c = RungCandidate(fmt, 48)
    sizes = {q: rungs.code_rung(crop, None, c, q).nbytes for q in range(rungs.MAX_QUALITY + 1)}
    calls = []
    real = rungs.code_rung
    monkeypatch.setattr(rungs, "code_rung", lambda *a: calls.append(a[-1]) or real(*a))
    got = rungs.fit_budget(crop, None, c, budget)
    assert len(calls) <= 6, "a few encodes, not a search of every setting"
    if sizes[0] > budget * (1 + rungs.OVERSHOOT):
        assert got.quality == 0
        return
    assert got.nbytes <= budget * (1 + rungs.OVERSHOOT)
    best = min(abs(math.log(n / budget)) for n in sizes.values() if n <= budget * (1 + rungs.OVERSHOOT))
    assert abs(math.log(got.nbytes / budget)) <= best + 0.15


def test_best_within_picks_per_face_and_keeps_the_budget():
    crop = _face(64, 4)
    cands = tuple(RungCandidate(f, s) for f in FORMATS for s in (32, 48))
    r = rungs.best_within(crop, None, cands, 200)
    assert r.nbytes <= 220 and r.candidate in cands
    alone = [rungs.fit_budget(crop, None, c, 200) for c in cands]
    assert rungs._score(r, crop, 200) == pytest.approx(max(rungs._score(a, crop, 200) for a in alone if a.nbytes <= 220))


def _plan(size: int) -> HumanLayerPlan:
    return human_layers.default_plan(size, 80)


def test_every_prefix_of_the_layers_for_people_decodes_as_encoded():
    crop, generated = _face(64, 5), _face(64, 6)
    plan = _plan(64)
    layers = human_layers.encode_human(crop, generated, [PREVIEW, DETAIL, RESIDUAL], plan)
    code = LayeredCode("c", "00" * 16, tuple(layers))
    errors = []
    for upto in (PREVIEW, DETAIL, RESIDUAL):
        img, used = human_layers.decode_human(code, generated, upto, 64)
        assert used[-1] == upto
        errors.append(np.mean((img.astype(float) - crop) ** 2))
    assert errors[0] > errors[1] > errors[2], "each layer must bring the face closer to the crop"
    assert code.layer(PREVIEW).nbytes <= 1.1 * plan.preview.budget and code.layer(DETAIL).nbytes <= 1.1 * plan.detail.budget


def test_a_face_written_without_a_rung_decodes_from_what_it_has():
    crop, generated = _face(64, 7), _face(64, 8)
    plan = HumanLayerPlan(RungSetting((RungCandidate("webp", 32),), 80), RungSetting((RungCandidate("webp", 48, PREDICTED),), 200),
                          RungCandidate("webp", 64, PREDICTED), 50)
    without_preview = human_layers.encode_human(crop, generated, [DETAIL, RESIDUAL], plan)
    code = LayeredCode("c", "00" * 16, tuple(without_preview))
    img, used = human_layers.decode_human(code, generated, RESIDUAL, 64)
    assert used == (DETAIL, RESIDUAL)
    detail = rungs.decode_rung(code.layer(DETAIL).payload, generated, 64)  # on the generated face, as encoded
    assert np.array_equal(img, rungs.decode_rung(code.layer(RESIDUAL).payload, detail, 64))
    with pytest.raises(MissingLayerError):
        human_layers.decode_human(code, generated, PREVIEW, 64)
    assert plan.needs_generated([DETAIL, RESIDUAL]) and not plan.needs_generated([PREVIEW, DETAIL])


def test_a_residual_written_before_the_rungs_decodes_as_before():
    crop, generated = _face(64, 9), _face(64, 10)
    legacy = image_layers.encode_residual(crop, generated, 80)
    code = LayeredCode("c", "00" * 16, (LayerCode(RESIDUAL, legacy),))
    img, used = human_layers.decode_human(code, generated, RESIDUAL, 64)
    assert used == (RESIDUAL,) and np.array_equal(img, image_layers.apply_residual(generated, legacy))
    assert human_layers.needs_generated(code, RESIDUAL)
    assert human_layers.payload_problem(RESIDUAL, legacy) is None
    assert human_layers.payload_problem(PREVIEW, b"\xff\xff\x00") is not None


def test_budgets_and_qualities_are_checked():
    plan = _plan(128)
    assert plan.with_budgets({PREVIEW: 120}).preview.budget == 120
    with pytest.raises(ConfigError):
        plan.with_budgets({"residual": 500})
    with pytest.raises(ConfigError):
        plan.with_budgets({PREVIEW: 3})
    with pytest.raises(ConfigError):
        plan.with_full_quality(100)  # AVIF at 100 is lossless, another stream than its template
    small = _plan(32)
    assert all(c.size <= 32 for c in small.preview.candidates + small.detail.candidates)


def test_a_format_that_cannot_be_stored_raw_falls_back_to_webp(monkeypatch, caplog):
    """An encoder that no longer writes what the shipped templates say must not cost the face."""
    avif = raw_bitstreams.FORMATS["avif"]

    def drifted(img: np.ndarray, quality: int) -> bytes:
        raise RawStreamError("AVIF container does not rebuild from the stripped bytes")

    monkeypatch.setitem(raw_bitstreams.FORMATS, "avif", replace(avif, encode=drifted))
    crop = _face(64, 11)
    plan = _plan(64)
    with caplog.at_level("WARNING"):
        layers = human_layers.encode_human(crop, None, [PREVIEW, DETAIL, RESIDUAL], plan)
    assert [rungs.read_header(layer.payload)[0].fmt for layer in layers] == ["webp"] * 3
    assert "coded as WEBP" in caplog.text
    img, used = human_layers.decode_human(LayeredCode("c", "00" * 16, tuple(layers)), None, RESIDUAL, 64)
    assert used == (PREVIEW, DETAIL, RESIDUAL) and np.mean((img.astype(float) - crop) ** 2) < 100


def test_the_default_rung_size_follows_its_budget():
    sizes = {b: human_layers.rung_candidates(b, 128) for b in (80, 150, 199, 200, 350, 449, 450, 2000)}
    assert {b: [c.label for c in cs] for b, cs in sizes.items()} == {
        80: ["avif@48"], 150: ["avif@48"], 199: ["avif@48"], 200: ["avif@64"], 350: ["avif@64"], 449: ["avif@64"], 450: ["avif@96"], 2000: ["avif@96"]}
    assert human_layers.rung_candidates(450, 64) == (RungCandidate("avif", 64),), "a rung never upsamples the crop"
    plan = human_layers.default_plan(128, budgets={PREVIEW: 370})
    assert plan.preview == RungSetting((RungCandidate("avif", 64),), 370) and plan.detail.budget == human_layers.DEFAULT_BUDGETS[DETAIL]
    assert plan.full_quality == human_layers.FULL_QUALITY and human_layers.default_plan(128, None).full_quality == human_layers.FULL_QUALITY
    human_layers.check_settings({DETAIL: 500}, 40)
    for budgets, quality in (({"residual": 500}, None), ({PREVIEW: 3}, None), ({}, 100), ({PREVIEW: 150.5}, None)):
        with pytest.raises(ConfigError):
            human_layers.check_settings(budgets, quality)


def test_the_budget_search_starts_near_the_budget(monkeypatch):
    """The first try comes from AVIF's size model (on real faces most need two encodes: README); the
    result does not depend on what was coded before (no state between faces)."""
    encodes = []
    real = rungs._encode
    monkeypatch.setattr(rungs, "_encode", lambda *a: encodes.append(a[3]) or real(*a))
    faces = [_face(128, s) for s in range(6)]
    c = RungCandidate("avif", 64)
    first = [rungs.fit_budget(f, None, c, 300).payload for f in faces]
    assert encodes[0] == rungs.first_quality(c, 300)
    assert [rungs.fit_budget(f, None, c, 300).payload for f in reversed(faces)] == first[::-1]
    assert rungs.first_quality(c, 150) < rungs.first_quality(c, 300) < rungs.first_quality(RungCandidate("avif", 48), 300)
    assert 0 <= rungs.first_quality(RungCandidate("avif", 1024), 80) <= rungs.first_quality(RungCandidate("avif", 16), 60000) <= rungs.MAX_QUALITY


def test_the_codec_codes_and_decodes_every_layer_for_people(tiny_codec):
    crops = np.stack([_face(32, s) for s in range(3)])
    codes = tiny_codec.encode_crops(crops, human=tiny_codec.human_plan(rung_bytes={PREVIEW: 60, DETAIL: 120}))
    assert all(c.names[-3:] == (PREVIEW, DETAIL, RESIDUAL) for c in codes)
    assert all(c.layer(PREVIEW).nbytes <= 66 and c.layer(DETAIL).nbytes <= 132 for c in codes)
    for upto in (PREVIEW, DETAIL, RESIDUAL):
        decoded = tiny_codec.decode_many(codes, upto)
        assert all(d.layers_used[-1] == upto and d.image.shape == (32, 32, 3) for d in decoded)
    # a face coded alone has the bytes it has in a batch
    assert tiny_codec.encode_crops(crops[1:2])[0] == tiny_codec.encode_crops(crops)[1]


def test_a_stream_written_before_the_rungs_decodes_as_before_through_the_codec(tiny_codec):
    """Generative layers and a JPEG XL residual of the difference from the generated face: what
    every table held before the rungs. The codec runs the generator for it and adds the residual."""
    crops = np.stack([_face(32, s) for s in (11, 12)])
    gen_codes = tiny_codec.encode_crops(crops, layers=list(tiny_codec.plan.names))
    generated = [d.image for d in tiny_codec.decode_many(gen_codes, "enhanced")]
    old = [LayeredCode(c.codec_id, c.weights_hash, c.layers + (LayerCode(RESIDUAL, image_layers.encode_residual(crop, g, 80)),))
           for c, crop, g in zip(gen_codes, crops, generated)]
    for code, g, d in zip(old, generated, tiny_codec.decode_many(old, RESIDUAL)):
        assert np.array_equal(d.image, image_layers.apply_residual(g, code.layer(RESIDUAL).payload))
        assert d.layers_used == (*tiny_codec.plan.names, RESIDUAL)
    with pytest.raises(MissingLayerError):
        tiny_codec.decode_many(old[:1], PREVIEW)
