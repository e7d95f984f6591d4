"""``facetier eval-persons``: how well persons come out of the base family alone, next to dlib.

LFW's evaluation photos (every face of ``eval_images.txt``: identities of folds 5-8, which no
facetier model trains on) are encoded into a table (the basic layer only: persons need nothing
else), clustered by ``facetier cluster``, and scored against LFW's identities by pairwise
precision/recall/F and BCubed precision/recall/F. In the same run dlib's own pipeline (its HOG
detector, 5-point landmarks and ResNet on the original photo) gives every photo a descriptor and
``chinese_whispers_clustering`` groups them: the reference. Both are swept over distance
thresholds (each around its own default); a photo either side finds no face in is its own cluster there.
"""
from __future__ import annotations

import json
import logging
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from facetier.codec.face_descriptor import DETECTED_CHIP_ID, FaceDescriptor
from facetier.io.images import decode_image
from facetier.io.reader import read_family
from facetier.io.table import INDEX_FAMILY, Table
from facetier.pipelines.jobs.encode import EncodeOptions, run_encode
from facetier.pipelines.jobs.persons import ClusterOptions, cluster, persons_rows
from tqdm import tqdm

log = logging.getLogger(__name__)

DLIB_THRESHOLDS = (0.40, 0.42, 0.44, 0.45, 0.46, 0.48, 0.50)
FACETIER_THRESHOLDS = (0.48, 0.50, 0.52, 0.54, 0.56)


@dataclass(frozen=True)
class ClusterScore:
    threshold: float
    clusters: int
    pair_precision: float
    pair_recall: float
    pair_f: float
    bcubed_precision: float
    bcubed_recall: float
    bcubed_f: float


@dataclass(frozen=True)
class PersonsReport:
    photos: int
    identities: int
    facetier_default: ClusterScore  # ``facetier cluster`` as shipped (ClusterOptions' defaults)
    facetier: tuple[ClusterScore, ...]  # swept
    dlib: tuple[ClusterScore, ...]  # dlib's chinese_whispers_clustering on dlib's descriptors of the original photos, swept
    photos_without_face: dict[str, int]


def score(labels: list, truth: list, threshold: float) -> ClusterScore:
    """Pairwise and BCubed precision, recall and F of cluster ``labels`` against ``truth``."""
    def pairs(items: list) -> int:
        return sum(c * (c - 1) // 2 for c in Counter(items).values())

    together = pairs(list(zip(labels, truth)))
    p, r = together / max(pairs(labels), 1), together / max(pairs(truth), 1)
    joint, by_label, by_truth = Counter(zip(labels, truth)), Counter(labels), Counter(truth)
    bp = float(np.mean([joint[(a, b)] / by_label[a] for a, b in zip(labels, truth)]))
    br = float(np.mean([joint[(a, b)] / by_truth[b] for a, b in zip(labels, truth)]))
    f = 2 * p * r / (p + r) if p + r else 0.0
    return ClusterScore(threshold, len(by_label), p, r, f, bp, br, 2 * bp * br / (bp + br) if bp + br else 0.0)


def _dlib_labels(lfw_dir: Path, names: list[str], thresholds: tuple[float, ...], progress: bool) -> tuple[dict[float, list], int]:
    import dlib

    ref = FaceDescriptor(DETECTED_CHIP_ID)
    found: dict[int, np.ndarray] = {}
    for i, name in enumerate(tqdm(names, desc="dlib on the originals", unit="photo", disable=not progress, mininterval=10)):
        if (v := ref.photo_embedding(decode_image((lfw_dir / "images" / name).read_bytes()).rgb)) is not None:
            found[i] = v
    keys = sorted(found)
    vectors = [dlib.vector(found[i].astype(float).tolist()) for i in keys]
    out = {}
    for t in thresholds:
        got = dlib.chinese_whispers_clustering(vectors, t)
        labels: list = [("none", i) for i in range(len(names))]
        for i, label in zip(keys, got):
            labels[i] = ("dlib", label)
        out[t] = labels
    return out, len(names) - len(keys)


def _facetier_labels(table: str, names: list[str], lfw_dir: Path, opts: ClusterOptions) -> tuple[list, int]:
    cluster(table, opts)
    t = Table(table)
    persons = {r["face_id"]: r["person_id"] for r in persons_rows(t, t.version()).to_pylist()}
    faces = read_family(t, INDEX_FAMILY, columns=["face_id", "source_uri", "face_index"]).to_pylist()
    by_name: dict[str, object] = {}
    images = str((lfw_dir / "images").resolve())
    for f in faces:
        # the photo's largest face is its face index 0 (faces are ordered by size), the one LFW labels
        if f["face_index"] == 0 and f["face_id"] in persons:
            by_name[str(Path(f["source_uri"].removeprefix("file://")).resolve().relative_to(images))] = persons[f["face_id"]]
    labels = [("ft", by_name[n]) if n in by_name else ("none", i) for i, n in enumerate(names)]
    return labels, sum(1 for n in names if n not in by_name)


def evaluate_persons(lfw_dir: Path, *, table: str | None = None, weights: str | None = None, limit: int | None = None,
                     thresholds: tuple[float, ...] = FACETIER_THRESHOLDS, dlib_thresholds: tuple[float, ...] = DLIB_THRESHOLDS,
                     report: str | None = None, progress: bool = True) -> PersonsReport:
    names = (lfw_dir / "eval_images.txt").read_text().split()[:limit]
    truth = [n.split("/")[0] for n in names]
    with tempfile.TemporaryDirectory(prefix="facetier-eval-persons-") as tmp:
        table = table or str(Path(tmp) / "table")
        listing = Path(tmp) / "eval_images.txt"
        listing.write_text("".join(f"{(lfw_dir / 'images' / n).resolve()}\n" for n in names))
        run_encode(str(listing), table, EncodeOptions(engine="local", layers=("basic",), weights=weights, progress=progress))
        default = ClusterOptions(progress=progress)
        labels, ft_missing = _facetier_labels(table, names, lfw_dir, default)
        shipped = score(labels, truth, default.threshold)
        swept = tuple(score(_facetier_labels(table, names, lfw_dir, ClusterOptions(threshold=t, full=True, progress=False))[0], truth, t)
                      for t in thresholds)
    dlib_labels, dlib_missing = _dlib_labels(lfw_dir, names, dlib_thresholds, progress)
    out = PersonsReport(len(names), len(set(truth)), shipped, swept, tuple(score(dlib_labels[t], truth, t) for t in dlib_thresholds),
                        {"facetier": ft_missing, "dlib": dlib_missing})
    if report:
        Path(report).write_text(json.dumps(asdict(out), indent=1))
    return out


def render(r: PersonsReport) -> str:
    def line(who: str, s: ClusterScore) -> str:
        return (f"{who:<34s} {s.threshold:5.2f} {s.clusters:8d}   {s.pair_precision:.3f} {s.pair_recall:.3f} {s.pair_f:.3f}"
                f"   {s.bcubed_precision:.3f} {s.bcubed_recall:.3f} {s.bcubed_f:.3f}")

    best = {k: max(v, key=lambda s: s.pair_f) for k, v in (("facetier", r.facetier), ("dlib", r.dlib))}
    best_b = {k: max(v, key=lambda s: s.bcubed_f) for k, v in (("facetier", r.facetier), ("dlib", r.dlib))}
    lines = [f"persons on LFW's evaluation photos: {r.photos} photos of {r.identities} people; no face found: {r.photos_without_face}",
             f"{'':34s} {'thr':>5s} {'clusters':>8s}   pairwise P/R/F        BCubed P/R/F",
             line("facetier cluster (as shipped)", r.facetier_default)]
    lines += [line("facetier, base family", s) for s in r.facetier]
    lines += [line("dlib chinese_whispers, originals", s) for s in r.dlib]
    lines.append(f"best pairwise F: facetier {best['facetier'].pair_f:.3f} (thr {best['facetier'].threshold}), "
                 f"dlib {best['dlib'].pair_f:.3f} (thr {best['dlib'].threshold}); shipped {r.facetier_default.pair_f:.3f}")
    lines.append(f"best BCubed F:   facetier {best_b['facetier'].bcubed_f:.3f} (thr {best_b['facetier'].threshold}), "
                 f"dlib {best_b['dlib'].bcubed_f:.3f} (thr {best_b['dlib'].threshold}); shipped {r.facetier_default.bcubed_f:.3f}")
    return "\n".join(lines)
