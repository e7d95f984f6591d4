"""Run by tests/test_reproducible.py in a subprocess whose torch may be held to another CPU kernel
set (``ATEN_CPU_CAPABILITY``, ``ONEDNN_MAX_CPU_ISA``): encode the crops of CROPS.npy and, given the
streams of another process, decode them. Writes what came out to OUT (a pickle).

    python tests/kernel_set_probe.py CROPS.npy OUT [STREAMS]
"""
from __future__ import annotations

import pickle
import sys

import numpy as np
import torch
from facetier.codec.layers import RESIDUAL, LayerCode, LayeredCode
from facetier.codec.model import FaceCodec


def streams_of(codes: list[LayeredCode]) -> list[list[tuple[str, bytes]]]:
    return [[(layer.name, layer.payload) for layer in c.layers] for c in codes]


def codes_of(codec: FaceCodec, streams: list[list[tuple[str, bytes]]]) -> list[LayeredCode]:
    return [LayeredCode(codec.codec_id, codec.weights_hash, tuple(LayerCode(n, p) for n, p in s)) for s in streams]


def decoded(codec: FaceCodec, codes: list[LayeredCode]) -> dict:
    """What a reader gets from the streams: the generative symbols and the full (residual) decode."""
    return {"symbols": [np.concatenate(codec.decode_symbols(c, codec.plan.names[-1])) for c in codes],
            "residual": np.stack([d.image for d in codec.decode_many(codes, RESIDUAL)])}


def main(crops_path: str, out_path: str, streams_path: str | None = None) -> None:
    codec = FaceCodec.load(device="cpu")
    out = {"capability": torch.backends.cpu.get_cpu_capability(), "streams": streams_of(codec.encode_crops(np.load(crops_path)))}
    if streams_path:
        with open(streams_path, "rb") as f:
            out["decoded"] = decoded(codec, codes_of(codec, pickle.load(f)["streams"]))
    with open(out_path, "wb") as f:
        pickle.dump(out, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
