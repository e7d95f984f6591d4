"""What every evaluation shares: LFW's verification protocol, face sampling and galleries.

Protocol: the pairs of folds 5-8 of ``pairs_folds1-8.txt`` (identities no facetier model trained
on); for each fold the distance threshold is chosen on the other three folds; the reported accuracy
is the mean over the four folds. A pair with a photo whose face could not be embedded counts as
wrong, whatever its label.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from facetier.codec.align import AlignedFace, FaceDetector, align_faces
from facetier.io.images import decode_image
from facetier.io.sources import SourceRef, list_sources, read_source
from PIL import Image
from tqdm import tqdm

from facetier.errors import InputError

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


SAME_PERSON = 0.6  # dlib's own threshold for its 128-d embedding


def lfw_crops(lfw_dir: Path, pairs: list[Pair], detector: FaceDetector) -> tuple[list[str], np.ndarray]:
    """Aligned crops of the photos of ``pairs`` (a photo without a usable face is left out: its pairs count as misses)."""
    names, crops = [], []
    for name in tqdm(sorted({p.a for p in pairs} | {p.b for p in pairs}), desc="align", unit="img", mininterval=5):
        try:
            crops.append(align_faces(decode_image((lfw_dir / "images" / name).read_bytes()).rgb, detector)[0].crop)
        except InputError:
            continue
        names.append(name)
    if not crops:
        raise InputError(f"no usable face in the photos of the LFW pairs under {lfw_dir}")
    return names, np.stack(crops)


def verification(pairs: list[Pair], names: list[str], embeddings: np.ndarray) -> float:
    return fold_accuracy(pairs, pair_distances(pairs, dict(zip(names, embeddings))))


def first_faces(src: str, limit: int, align: Callable[[np.ndarray], list[AlignedFace]]) -> tuple[np.ndarray, list[int], int]:
    """The first aligned face of up to ``limit`` sources spread evenly over ``src``, their files' sizes,
    and how many sources had no usable face."""
    refs = list_sources(src)
    if len(refs) > limit:
        refs = [refs[i] for i in np.linspace(0, len(refs) - 1, limit).astype(int)]
    crops, sizes, skipped = [], [], 0
    for ref in tqdm(refs, desc="align", unit="img", mininterval=5):
        try:
            data = read_source(SourceRef.parse(ref.key))
            faces = align(decode_image(data).rgb)
        except InputError:
            skipped += 1
            continue
        crops.append(faces[0].crop)
        sizes.append(len(data))
    if not crops:
        raise InputError(f"no usable face in {src} ({skipped} sources tried)")
    return np.stack(crops), sizes, skipped


def save_gallery(path: str, columns: Sequence[np.ndarray], rows: int) -> None:
    """A PNG of up to ``rows`` faces spread over the set, one (n, S, S, 3) array per column."""
    idx = np.linspace(0, len(columns[0]) - 1, min(rows, len(columns[0]))).astype(int)
    Image.fromarray(np.concatenate([np.concatenate([c[i] for c in columns], 1) for i in idx], 0)).save(path)
