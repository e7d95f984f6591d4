"""Codec round trips, determinism, typed stream errors and the lossless original layer (tiny random model)."""
from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
from dataclasses import replace

from facetier.codec import container
from facetier.codec.human_layers import RungSetting
from facetier.codec.rungs import PREDICTED, RungCandidate
from facetier.codec.layers import LayerCode, LayeredCode
from PIL import Image

from facetier.errors import (
    BadMagicError,
    ChecksumError,
    MissingLayerError,
    ModelMismatchError,
    TruncatedStreamError,
)


@pytest.fixture(scope="module")
def crops() -> np.ndarray:
    return np.random.default_rng(3).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)


def test_every_prefix_round_trips(tiny_codec, crops):
    codes = tiny_codec.encode_crops(crops)
    full = tiny_codec.decode_many(codes, "enhanced")
    for i, name in enumerate(tiny_codec.plan.names):
        for code, ref in zip(codes, full):
            prefix_bytes = container.to_bytes(code.prefix(name))
            parsed = container.from_bytes(prefix_bytes)
            assert parsed.names == tiny_codec.plan.names[: i + 1]
            decoded = tiny_codec.decode(parsed, upto=name)
            assert decoded.layers_used == tiny_codec.plan.names[: i + 1]
            assert decoded.image.shape == (32, 32, 3) and decoded.image.dtype == np.uint8
            if name == "enhanced":
                # symbols are bit-exact; pixels may differ by one level between batch sizes (float reductions)
                for a, b in zip(tiny_codec.decode_symbols(parsed, name), tiny_codec.decode_symbols(code, name)):
                    assert np.array_equal(a, b)
                assert np.abs(decoded.image.astype(int) - ref.image.astype(int)).max() <= 1
    with_residual = tiny_codec.decode(codes[0], upto="residual")
    gen_err = np.abs(full[0].image.astype(int) - crops[0]).mean()
    res_err = np.abs(with_residual.image.astype(int) - crops[0]).mean()
    assert res_err < gen_err, "the residual layer must bring the decode closer to the source"


def test_symbols_survive_the_bitstream(tiny_codec, crops):
    wplus = tiny_codec.encode_wplus(crops[:1])[0]
    symbols = tiny_codec._symbols(wplus, crops[0])
    code = tiny_codec.encode_crops(crops[:1], layers=list(tiny_codec.plan.names))[0]
    decoded = tiny_codec.decode_symbols(container.from_bytes(container.to_bytes(code)), "enhanced")
    for a, b in zip(symbols, decoded):
        assert np.array_equal(a, b)


def test_same_input_gives_identical_bytes(tiny_codec, crops):
    a = [container.to_bytes(c) for c in tiny_codec.encode_crops(crops)]
    b = [container.to_bytes(c) for c in tiny_codec.encode_crops(crops)]
    assert a == b


def test_decode_is_identical_with_one_and_two_threads(tiny_bundle, crops, tmp_path, tiny_codec):
    stream = tmp_path / "face.ftl"
    stream.write_bytes(container.to_bytes(tiny_codec.encode_crops(crops[:1])[0]))
    prog = (
        "import sys, torch, numpy as np; torch.set_num_threads(int(sys.argv[1]));"
        "from facetier.codec.model import FaceCodec; from facetier.codec import container;"
        f"c = FaceCodec.load({str(tiny_bundle)!r}, device='cpu');"
        f"img = c.decode(container.from_bytes(open({str(stream)!r}, 'rb').read()), 'enhanced').image;"
        "sys.stdout.buffer.write(img.tobytes())"
    )
    outs = [subprocess.run([sys.executable, "-c", prog, str(n)], check=True, capture_output=True).stdout for n in (1, 2)]
    assert outs[0] == outs[1] and len(outs[0]) == 32 * 32 * 3


def test_truncated_stream_raises(tiny_codec, crops):
    data = container.to_bytes(tiny_codec.encode_crops(crops[:1])[0])
    for cut in (3, 10, len(data) // 2, len(data) - 1):
        with pytest.raises((TruncatedStreamError, BadMagicError, ChecksumError)):
            container.from_bytes(data[:cut])


def test_flipped_byte_raises(tiny_codec, crops):
    data = bytearray(container.to_bytes(tiny_codec.encode_crops(crops[:1])[0]))
    for pos in (5, 20, len(data) - 3):
        bad = bytearray(data)
        bad[pos] ^= 0x40
        with pytest.raises((ChecksumError, TruncatedStreamError, BadMagicError)):
            container.from_bytes(bytes(bad))


def test_not_a_stream_raises(tiny_codec):
    with pytest.raises(BadMagicError):
        container.from_bytes(b"\xff\xd8\xff\xe0 a jpeg, not a stream")


def test_wrong_weights_raise(tiny_codec, crops, tmp_path):
    from facetier.codec.model import FaceCodec
    from facetier.pipelines.training.bundles import make_random_bundle

    other_path = tmp_path / "other.safetensors"
    make_random_bundle(other_path, size=32, seed=7, entropy_steps=5)
    other = FaceCodec.load(other_path, device="cpu")
    code = tiny_codec.encode_crops(crops[:1])[0]
    with pytest.raises(ModelMismatchError):
        other.decode(container.from_bytes(container.to_bytes(code)))


def test_missing_layer_raises(tiny_codec, crops):
    code = tiny_codec.encode_crops(crops[:1])[0].prefix("basic")
    with pytest.raises(MissingLayerError):
        tiny_codec.decode(code, upto="middle")
    with pytest.raises(MissingLayerError):
        tiny_codec.decode(code, upto="residual")


def test_original_layer_gives_back_the_jpeg_bit_for_bit(tiny_codec):
    rng = np.random.default_rng(0)
    for progressive in (False, True):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=83, progressive=progressive)
        src = buf.getvalue()
        from facetier.codec import image_layers

        payload = image_layers.encode_original(src, is_jpeg=True)
        code = LayeredCode(tiny_codec.codec_id, tiny_codec.weights_hash, (LayerCode("original", payload),))
        assert tiny_codec.original_bytes(container.from_bytes(container.to_bytes(code))) == src
    png = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(png, format="PNG")
    from facetier.codec import image_layers

    assert image_layers.decode_original(image_layers.encode_original(png.getvalue(), is_jpeg=False)) == png.getvalue()


def test_integer_entropy_params_are_exact(tiny_codec):
    """The conditioning network is int64 arithmetic: same context, same table row, on any machine."""
    coder = tiny_codec.coders[1]
    ctx = np.arange(coder.model.context_dim, dtype=np.int64) - 2
    m1, s1 = coder.model.params(ctx)
    m2, s2 = coder.model.params(ctx.copy())
    assert m1.dtype == np.int64 and s1.dtype == np.int64
    assert np.array_equal(m1, m2) and np.array_equal(s1, s2)
    tables = tiny_codec.bundle.tensors["entropy_tables"].numpy()
    assert tables.dtype == np.int32 and tables.min() >= 1


def test_channels_last_prior_matches_the_plain_modules(tiny_codec, crops):
    """The runtime prior runs NHWC on CPUs with batch norms folded, for speed; it must compute what the
    trained modules compute."""
    import copy

    import torch

    from facetier.codec.encoder import StyleEncoder

    prior = tiny_codec.prior
    assert prior.memory_format == torch.channels_last
    x = torch.from_numpy(crops).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    wplus = prior.encode_wplus(crops)
    encoder = StyleEncoder(tiny_codec.bundle.config.encoder)  # as trained: batch norms unfolded, NCHW
    encoder.load_state_dict({k: v.float() for k, v in tiny_codec.bundle.prefixed("encoder.").items()})
    encoder.eval()
    generator = copy.deepcopy(prior.generator)
    generator.memory_format = torch.contiguous_format
    with torch.no_grad():
        plain_w = (encoder(x) + prior.latent_avg[None]).numpy()
        plain_img = generator(torch.from_numpy(wplus)).clamp(-1, 1).add(1).mul(127.5).round().permute(0, 2, 3, 1).numpy()
    assert np.abs(wplus - plain_w).max() < 1e-4
    assert np.abs(prior.synthesise(wplus).astype(int) - plain_img.astype(int)).max() <= 1


def test_layers_for_people_coded_in_parallel_equal_one_by_one():
    from facetier.codec import human_layers

    rng = np.random.default_rng(5)
    src = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    gen = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    plan, wanted = human_layers.default_plan(32), human_layers.HUMAN_LAYERS
    assert human_layers.encode_many(src, gen, wanted, plan) == [human_layers.encode_human(s, g, wanted, plan) for s, g in zip(src, gen)]


def test_every_network_call_has_the_micro_batch_shape_and_a_face_codes_alike_in_any_batch(tiny_codec, monkeypatch):
    rows = tiny_codec.micro_batch
    assert rows == 16, "the CPU's fixed network shape"
    crops = np.random.default_rng(5).integers(0, 256, (rows + 3, 32, 32, 3), dtype=np.uint8)
    # a preview predicted from the generated face: the encoder then runs the generator too
    human = replace(tiny_codec.human_plan(), preview=RungSetting((RungCandidate("webp", 32, PREDICTED),), 80))
    alone = [tiny_codec.encode_crops(c[None], human=human)[0] for c in crops[:4]]
    seen: list[int] = []
    for name in ("encode_wplus", "synthesise"):
        real = getattr(tiny_codec, name)
        monkeypatch.setattr(tiny_codec, name, lambda x, real=real: seen.append(len(x)) or real(x))
    batched = tiny_codec.encode_crops(crops, human=human)
    assert seen == [rows] * 4, "two encoder and two synthesis calls, the second of each padded to the micro-batch"
    assert len(batched) == len(crops)
    for a, b in zip(alone, batched):  # every layer, the residual included, whatever the batch around a face
        assert a.names == b.names
        assert [layer.payload for layer in a.layers] == [layer.payload for layer in b.layers]



