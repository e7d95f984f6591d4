"""Decode and edit jobs, per batch: written once, run by the local loop, Beam's DoFn and Ray's actors.

A batch is a list of units (face ids; photo ids for ``original``). For each unit the worker
either finds its output already complete (``present``: a rerun skips it), writes it
(``written``), or records why not (``failed``, typed). Nothing is skipped silently: every unit of
a batch comes back as exactly one record.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from facetier.codec.align import paste_back
from facetier.codec.layers import HUMAN_LAYERS, ORIGINAL
from facetier.io.images import decode_image, sniff_format
from facetier.io.table import Snapshot, Table
from facetier.pipelines.jobs.outputs import JOB_DIR, OutputFolder
from facetier.pipelines.jobs.stored_codes import (
    FaceFailure,
    index_rows,
    read_codes,
    read_originals,
)
from PIL import Image

from facetier.errors import ConfigError, FacetierError, MissingLayerError

log = logging.getLogger(__name__)

ORIGINAL_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


@dataclass(frozen=True)
class DecodeContext:
    """Everything a worker needs, picklable for Beam and Ray."""

    table_root: str
    out: str
    upto: str
    fmt: str = "png"  # png | jpg
    quality: int = 90  # JPEG quality
    paste_back: bool = False
    weights_path: str | None = None
    device: str = "auto"
    edits: tuple[tuple[str, str], ...] = ()  # an edit job: attribute moves on the basic code
    snapshot: Snapshot | None = None  # the table state every batch reads (fixed by the driver); None: the latest

    def table_snapshot(self, table: Table) -> Snapshot:
        return self.snapshot or table.snapshot()

    @property
    def tag(self) -> str:
        """What the file names say about the output."""
        tag = "_".join(f"{k}{v}" for k, v in sorted(self.edits)).replace("=", "").replace("/", "") if self.edits else self.upto
        return f"{tag}_in_photo" if self.paste_back else tag

    def name(self, face_id: str) -> str:
        return f"{face_id}_{self.tag}.{self.fmt}"

    def job_key(self, weights_hash: str) -> str:
        return json.dumps([self.table_root, self.upto, self.fmt, self.quality, self.paste_back, list(self.edits), weights_hash])


@dataclass(frozen=True)
class OutputRecord:
    id: str  # face id, or photo id for originals
    photo_id: str
    file: str  # name under the output folder ("" when failed)
    status: str  # written | present | failed
    layers: tuple[str, ...]
    generated: bool
    nbytes: int = 0
    error_class: str = ""
    message: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @staticmethod
    def from_json(line: str) -> OutputRecord:
        d = json.loads(line)
        return OutputRecord(**{**d, "layers": tuple(d["layers"])})

    @staticmethod
    def failed(f: FaceFailure, photo_id: str = "") -> OutputRecord:
        return OutputRecord(f.id, photo_id, "", "failed", (), False, 0, f.error_class, f.message)


def batch_id(ctx: DecodeContext, weights_hash: str, units: Sequence[str]) -> str:
    return hashlib.sha256("\n".join([ctx.job_key(weights_hash), *units]).encode()).hexdigest()[:20]


def encode_image(img: np.ndarray, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpg":
        Image.fromarray(np.ascontiguousarray(img)).save(buf, "JPEG", quality=quality)
    else:
        Image.fromarray(np.ascontiguousarray(img)).save(buf, "PNG")
    return buf.getvalue()


class BatchDecoder:
    """One worker's model and output folder; ``run`` turns a batch of units into records."""

    def __init__(self, ctx: DecodeContext) -> None:
        self.ctx = ctx
        self.out = OutputFolder(ctx.out)
        self._codec: Any = None

    @property
    def codec(self) -> Any:
        if self._codec is None:  # an originals-only job never loads a model
            from facetier.codec.model import FaceCodec

            self._codec = FaceCodec.load(self.ctx.weights_path, device=self.ctx.device)
        return self._codec

    def families(self) -> list[str]:
        """The layers read for each face, lowest first."""
        plan = self.codec.plan.names
        if self.ctx.edits and self.ctx.upto not in plan:
            raise ConfigError(f"an edit decodes the generative layers: --upto one of {list(plan)}")
        if self.ctx.upto in HUMAN_LAYERS:
            return [*plan, *HUMAN_LAYERS[: HUMAN_LAYERS.index(self.ctx.upto) + 1]]
        if self.ctx.upto not in plan:
            raise ConfigError(f"--upto must be one of {[*plan, *HUMAN_LAYERS, ORIGINAL]}")
        return list(plan[: plan.index(self.ctx.upto) + 1])

    def run(self, units: Sequence[str], record_as: str | None = None) -> list[OutputRecord]:
        """Produce every unit of the batch; with ``record_as``, also leave the records under the job folder
        (how Beam and Ray workers hand them to the driver)."""
        records = self._originals(units) if self.ctx.upto == ORIGINAL else self._faces(units)
        if record_as:
            self.out.write(f"{JOB_DIR}/results/{record_as}.jsonl", "\n".join(r.to_json() for r in records).encode())
        return records

    def _originals(self, photo_ids: Sequence[str]) -> list[OutputRecord]:
        records, todo = [], []
        for pid in photo_ids:
            present = next((f"{pid}.{ext}" for ext in (*ORIGINAL_EXTENSIONS.values(), "bin") if self.out.exists(f"{pid}.{ext}")), None)
            if present:
                records.append(OutputRecord(pid, pid, present, "present", (ORIGINAL,), False))
            else:
                todo.append(pid)
        if todo:
            table = Table(self.ctx.table_root)
            originals, failed = read_originals(table, todo, self.ctx.table_snapshot(table))
            for pid, data in sorted(originals.items()):
                name = f"{pid}.{ORIGINAL_EXTENSIONS.get(sniff_format(data) or '', 'bin')}"
                self.out.write(name, data)  # the source bytes exactly (checked against the photo id)
                records.append(OutputRecord(pid, pid, name, "written", (ORIGINAL,), False, len(data)))
            records += [OutputRecord.failed(f, f.id) for f in failed]
        return sorted(records, key=lambda r: r.id)

    def _faces(self, face_ids: Sequence[str]) -> list[OutputRecord]:
        ctx = self.ctx
        families = self.families()
        records = [OutputRecord(fid, "", ctx.name(fid), "present", tuple(families) + ((ORIGINAL,) if ctx.paste_back else ()), True)
                   for fid in face_ids if self.out.exists(ctx.name(fid))]
        todo = sorted(set(face_ids) - {r.id for r in records})
        if not todo:
            return records
        table = Table(ctx.table_root)
        snapshot = ctx.table_snapshot(table)
        rows, failures = index_rows(table, todo, snapshot)
        codes, failed = read_codes(table, rows, families, snapshot, optional=[f for f in families[:-1] if f in HUMAN_LAYERS])
        failures += failed
        by_id = {r["face_id"]: r for r in rows}
        images = self._edited(codes) if ctx.edits else self._decoded(codes, failures)
        photos: dict[str, np.ndarray] = {}
        if ctx.paste_back and images:
            photos, missing = self._photos(sorted({by_id[fid]["photo_id"] for fid in images}), table, snapshot)
            for fid in [f for f in images if by_id[f]["photo_id"] in missing]:
                failures.append(FaceFailure.of(fid, MissingLayerError(f"face {fid}: {missing[by_id[fid]['photo_id']]}; nothing to paste it into")))
                del images[fid]
        for fid, (img, layers) in sorted(images.items()):
            row = by_id[fid]
            if ctx.paste_back:
                img = paste_back(photos[row["photo_id"]], img, np.asarray(row["transform"], np.float64).reshape(2, 3))
                layers = (*layers, ORIGINAL)
            data = encode_image(img, ctx.fmt, ctx.quality)
            self.out.write(ctx.name(fid), data)
            records.append(OutputRecord(fid, row["photo_id"], ctx.name(fid), "written", layers, True, len(data)))
        records += [OutputRecord.failed(f, by_id.get(f.id, {}).get("photo_id", "")) for f in failures]
        return sorted(records, key=lambda r: r.id)

    def _decoded(self, codes: dict, failures: list[FaceFailure]) -> dict[str, tuple[np.ndarray, tuple[str, ...]]]:
        ids = sorted(codes)
        if not ids:
            return {}
        try:
            decoded = list(zip(ids, self.codec.decode_many([codes[i] for i in ids], self.ctx.upto)))
        except FacetierError:  # one bad stream must fail alone: retry face by face
            decoded = []
            for fid in ids:
                try:
                    decoded.append((fid, self.codec.decode_many([codes[fid]], self.ctx.upto)[0]))
                except FacetierError as exc:
                    failures.append(FaceFailure.of(fid, exc))
        return {fid: (d.image, tuple(d.layers_used)) for fid, d in decoded}

    def _edited(self, codes: dict) -> dict[str, tuple[np.ndarray, tuple[str, ...]]]:
        codec = self.codec
        if codec.semantic is None:
            raise ConfigError(f"{codec.codec_id} has no semantic base layer: nothing to edit")
        ids = sorted(codes)
        if not ids:
            return {}
        symbols = [codec.decode_symbols(codes[i], self.ctx.upto) for i in ids]
        moved = codec.semantic.edit(np.stack([s[0] for s in symbols]).astype(np.float64), dict(self.ctx.edits))
        base = [codec.coders[0].quantise(m, np.zeros(0, np.int64)) for m in moved]
        images = codec.synthesise(np.stack([codec.wplus_from_symbols([b, *s[1:]]) for b, s in zip(base, symbols)]))
        return {fid: (img, tuple(self.families())) for fid, img in zip(ids, images)}

    def _photos(self, photo_ids: list[str], table: Table, snapshot: Snapshot) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """The photos to paste into (from the original layer), and for the others why there is none."""
        originals, failed = read_originals(table, photo_ids, snapshot)
        photos, missing = {}, {f.id: f.message for f in failed}
        for pid, data in originals.items():
            try:
                photos[pid] = np.array(decode_image(data, draft_size=None).rgb)  # the pixels the stored transform was measured on
            except FacetierError as exc:
                missing[pid] = f"its original does not decode ({exc})"
        return photos, missing
