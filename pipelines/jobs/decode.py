"""On-demand decode and edit jobs: a selection of faces -> image files on any fsspec URI.

The driver resolves the selection (``selection.py``), cuts it into batches and hands them to an
engine: the local loop, Beam (``beam_engine.run_beam_decode``) or Ray (``ray_engine.run_ray_decode``),
all running ``decode_records.BatchDecoder``. It then writes, next to the outputs:

* ``manifest.jsonl``: one line per output of this selection (written now or already present), with
  the layers it came from and whether its pixels are generated;
* ``failures.jsonl``: one line per unit that could not be produced, with its error class;
* with ``gallery``: ``gallery.html`` and ``gallery.png`` (``gallery.py``).

selected = written + present + failed, always; the summary says so.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from facetier.codec.layers import ORIGINAL
from facetier.io.table import Table
from facetier.pipelines.jobs.decode_records import (
    BatchDecoder,
    DecodeContext,
    OutputRecord,
    batch_id,
)
from facetier.pipelines.jobs.outputs import JOB_DIR, OutputFolder
from facetier.pipelines.jobs.analytics import QueryLimits
from facetier.pipelines.jobs.selection import Selection, select
from tqdm import tqdm

from facetier.errors import ConfigError

log = logging.getLogger(__name__)

MANIFEST = "manifest.jsonl"
FAILURES = "failures.jsonl"


@dataclass(frozen=True)
class DecodeOptions:
    where: str | None = None
    ids_file: str | None = None
    limit: int | None = None
    fmt: str = "png"
    quality: int = 90
    paste_back: bool = False
    gallery: bool = False
    dry_run: bool = False
    engine: str = "local"
    workers: int = 1
    batch_size: int = 32
    weights: str | None = None
    device: str = "auto"
    ray_address: str | None = None
    beam_args: tuple[str, ...] = ()
    progress: bool = False
    edits: tuple[tuple[str, str], ...] = ()
    as_of: int | None = None  # a facetier table version (time travel); None: the latest
    query_limits: QueryLimits = field(default_factory=QueryLimits)  # of the --where selection

    def __post_init__(self) -> None:
        for name in ("workers", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class DecodedFile:
    face_id: str  # or photo id, for originals
    path: str
    layers_used: tuple[str, ...]
    generated: bool


@dataclass(frozen=True)
class DecodeResult:
    """What a job produced: selected = written + present + failed."""

    files: tuple[DecodedFile, ...]  # written now or already present, in id order
    failures: tuple  # FaceFailure-like: id, error_class, message
    selected: int = 0
    written: int = 0
    present: int = 0
    seconds: float = 0.0
    startup_seconds: float = 0.0  # until the first batch finished
    first_batch: int = 0  # units in the first batch (the steady rate counts the others)
    manifest: str = ""
    failures_file: str = ""
    gallery: tuple[str, ...] = ()
    dry_run: bool = False
    records: tuple[OutputRecord, ...] = field(default=(), repr=False)

    @property
    def balanced(self) -> bool:
        return self.selected == self.written + self.present + len(self.failures)

    @property
    def faces_per_second(self) -> float:
        """Outputs a second after the first batch (start-up: model load, engine start); the whole run's rate for one batch."""
        produced = self.written + self.present
        steady = self.seconds - self.startup_seconds
        if produced > self.first_batch and steady > 0:
            return (produced - self.first_batch) / steady
        return produced / self.seconds if self.seconds > 0 else 0.0

    def render(self) -> str:
        if self.dry_run:
            return f"{self.selected} selected (dry run: nothing decoded)"
        head = (f"{self.selected} selected: {self.written} written, {self.present} already there, {len(self.failures)} failed "
                f"({'balanced' if self.balanced else 'NOT BALANCED'}) in {self.seconds:.1f} s "
                f"(start-up {self.startup_seconds:.1f} s, then {self.faces_per_second:.1f} outputs/s)")
        lines = [head]
        if self.manifest:
            lines.append(f"manifest: {self.manifest}")
        if self.failures:
            lines.append(f"failures: {self.failures_file}")
        lines += [f"gallery: {g}" for g in self.gallery]
        return "\n".join(lines)


def run_decode(table_root: str, ids: Sequence[str] | None, upto: str, out: str, opts: DecodeOptions | None = None, **options: object) -> DecodeResult:
    """Produce the selected faces at ``upto`` (or, with ``opts.edits``, edited) under ``out``.

    ``ids`` are face ids or photo ids; ``opts.where`` a SQL condition over the faces index and the
    base family. A face whose stored layers fail their checks is a typed failure; the rest are
    written. Keyword ``options`` override fields of ``opts``.
    """
    opts = replace(opts or DecodeOptions(), **options)
    if opts.fmt not in ("png", "jpg"):
        raise ConfigError(f"--format must be png or jpg, not {opts.fmt!r}")
    if upto == ORIGINAL and (opts.paste_back or opts.edits):
        raise ConfigError("--upto original writes the source files: nothing to paste back or edit")
    started = time.monotonic()
    snapshot = Table(table_root).snapshot(opts.as_of)  # one table state for the selection and every batch
    selection = select(table_root, ids=ids or (), ids_file=opts.ids_file, where=opts.where, by_photo=upto == ORIGINAL, limit=opts.limit, limits=opts.query_limits,
                       snapshot=snapshot)
    log.info("%d selected (%d of them not in the table); the selection read %d bytes", selection.size, len(selection.failures), selection.bytes_read)
    if opts.dry_run:
        return DecodeResult((), selection.failures, selection.size, dry_run=True)
    ctx = DecodeContext(table_root, out, upto, opts.fmt, opts.quality, opts.paste_back, opts.weights, opts.device, opts.edits, snapshot)
    worker = BatchDecoder(ctx)
    weights_hash = "" if upto == ORIGINAL else worker.codec.weights_hash
    if upto != ORIGINAL:
        worker.families()  # a bad --upto fails before any work
    units = list(selection.units)
    batches = [units[i:i + opts.batch_size] for i in range(0, len(units), opts.batch_size)]
    keyed = [(batch_id(ctx, weights_hash, b), b) for b in batches]
    records, first_done = _run_engine(worker, keyed, opts)
    records += [OutputRecord.failed(f) for f in selection.failures]
    return _finish(table_root, worker.out, records, selection, opts, started, first_done)


def _run_engine(worker: BatchDecoder, keyed: list[tuple[str, list[str]]], opts: DecodeOptions) -> tuple[list[OutputRecord], float | None]:
    """Every batch's records, and when the first batch finished (monotonic)."""
    if not keyed:
        return [], None
    if opts.engine == "local":
        records, first = [], None
        bar = tqdm(total=sum(len(b) for _, b in keyed), desc="decode", unit="face", disable=not opts.progress)
        for _, batch in keyed:
            records += worker.run(batch)
            first = first or time.monotonic()
            bar.update(len(batch))
        bar.close()
        return records, first
    out = worker.out
    out.remove(f"{JOB_DIR}/results")  # a killed run's leftovers: its files are on disk, its records are recomputed
    stop, seen = threading.Event(), []
    watcher = threading.Thread(target=_watch, args=(out, len(keyed), stop, opts.progress, seen), daemon=True)
    watcher.start()
    try:
        if opts.engine == "beam":
            from facetier.pipelines.jobs.beam_engine import run_beam_decode

            run_beam_decode(worker.ctx, keyed, opts.workers, opts.beam_args)
        elif opts.engine == "ray":
            from facetier.pipelines.jobs.ray_engine import run_ray_decode

            run_ray_decode(worker.ctx, keyed, opts.workers, opts.ray_address)
        else:
            raise ConfigError(f"unknown engine {opts.engine!r}: local, beam or ray")
    finally:
        stop.set()
        watcher.join()
    records = []
    for bid, batch in keyed:
        name = f"{JOB_DIR}/results/{bid}.jsonl"
        if not out.exists(name):  # an engine that returned without running a batch must not lose its faces
            records += worker.run(batch)
            continue
        records += [OutputRecord.from_json(line) for line in out.read(name).decode().splitlines() if line]
    out.remove(JOB_DIR)
    return records, seen[0] if seen else None


def _watch(out: OutputFolder, batches: int, stop: threading.Event, progress: bool, seen: list[float]) -> None:
    """Progress of Beam and Ray runs: the batches' result files appearing under the job folder."""
    bar = tqdm(total=batches, desc="decode", unit="batch", disable=not progress)
    while True:
        done = len(out.list(f"{JOB_DIR}/results"))
        if done and not seen:
            seen.append(time.monotonic())
        bar.update(done - bar.n)
        if stop.wait(1.0):
            break
    bar.close()


def _finish(table_root: str, out: OutputFolder, records: list[OutputRecord], selection: Selection, opts: DecodeOptions, started: float,
            first_done: float | None) -> DecodeResult:
    records.sort(key=lambda r: (r.status == "failed", r.id))
    produced = [r for r in records if r.status != "failed"]
    failed = [r for r in records if r.status == "failed"]
    out.write(MANIFEST, "".join(r.to_json() + "\n" for r in produced).encode())
    out.write(FAILURES, "".join(r.to_json() + "\n" for r in failed).encode())
    gallery: tuple[str, ...] = ()
    if opts.gallery and produced:
        from facetier.pipelines.jobs.gallery import write_gallery

        gallery = write_gallery(out, produced, table_root)
    files = tuple(DecodedFile(r.id, out.uri_of(r.file), r.layers, r.generated) for r in produced)
    written = sum(r.status == "written" for r in produced)
    elapsed = time.monotonic() - started
    startup = (first_done - started) if first_done else elapsed
    return DecodeResult(files, tuple(failed), selection.size, written, len(produced) - written, elapsed, startup,
                        min(opts.batch_size, len(selection.units)), out.uri_of(MANIFEST), out.uri_of(FAILURES), gallery, records=tuple(records))

