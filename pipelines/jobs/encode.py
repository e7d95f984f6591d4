"""The encode job: plan shards, run an engine, commit a new table version, summarise.

Incremental and resumable by construction:
  * an input the table already holds under this model, by name and listing fingerprint (size and
    mtime, ETag, generation or a member's CRC: its source key), is skipped unread (``--verify-content``
    reads and hashes it instead, for bytes replaced under the same size and mtime): the driver
    anti-joins the listing's source keys against the table's ``source_key`` columns once, and
    workers receive only their shard's inputs. A file whose bytes changed has a new fingerprint and
    is read, hashed and encoded again (the old photo's rows stay: they are another photo); one that
    could not be read is tried again (its old reject row is dropped when it is retried); a name
    rejected for what it is (an archive member escaping its archive) is not read again;
  * content decides what is stored: bytes this model already stores, found under a new name (or
    under a name whose listing changed while its bytes did not), become an alias at commit;
  * what the table holds is read from the families' columns (never a list in JSON); a shard's id
    is a hash of (model, table version, options, its inputs and their source keys), so a restarted
    run finds the shards an interrupted run finished (their done markers) and does only the rest;
    markers are removed once the run has committed or found nothing to commit;
  * the same bytes under several names in one run are stored once, under the first name in
    sorted order, the other names as rows of ``aliases``;
  * a photo another model encoded is replaced, per photo, by this run's rows; so is one this model
    stored with fewer layers than the run asks for (``--layers basic,middle``, then every layer): an
    input counts as held only when every layer asked for is stored; the source is read again;
  * nothing is visible until the commit (facetier.io.commit); a racing commit fails with a clear error.
"""
from __future__ import annotations

import hashlib
import logging
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from facetier.codec.checkpoints import load_bundle
from facetier.codec.human_layers import check_settings, default_plan
from facetier.codec.layers import HUMAN_LAYERS, all_layer_names
from facetier.codec.model import embedded_weights_path
from facetier.codec.stage_times import StageTimes, render_stages
from facetier.io.sources import MAX_SOURCE_BYTES, SourceRef, content_id, key_bytes, list_sources, read_source, source_key
from facetier.io.commit import commit, finish_pending
from facetier.io.rewrite import rewrite_staged
from facetier.io.table import ShardEntry, Table
from facetier.pipelines.jobs.records import JobContext, ShardSpec, shared_machine_threads
from facetier.pipelines.jobs.shard_worker import ShardWorker
from facetier.pipelines.jobs.table_state import held_keys, held_photos, held_sources, partial_photos, replaced_rows
from tqdm import tqdm

from facetier.errors import ConcurrentCommitError, ConfigError, InputError, TableCorruptError, TableError

log = logging.getLogger(__name__)

Engine = Literal["local", "beam", "ray"]


@dataclass(frozen=True)
class EncodeOptions:
    engine: Engine = "local"
    workers: int = 1
    shard_size: int = 64
    batch_size: int = 16
    layers: tuple[str, ...] | None = None  # None: every layer of the codec
    weights: str | None = None  # None: the embedded model
    device: str = "auto"
    ray_address: str | None = None
    gpus_per_worker: float | None = None  # Ray: None decides from the cluster's GPUs
    beam_args: tuple[str, ...] = ()
    progress: bool = True
    max_source_mb: float = MAX_SOURCE_BYTES / 2**20  # larger inputs are rejected unread (SourceReadError)
    residual_quality: int | None = None  # quality of the residual (full-resolution) layer; None: the default
    rung_bytes: tuple[tuple[str, int], ...] = ()  # byte budgets of the preview and detail rungs; () the defaults
    verify_content: bool = False  # read and hash inputs the listing calls unchanged: new bytes under the same size and mtime are seen
    update_index: bool = False  # bring the identity index (facetier index) up to date right after the commit

    def __post_init__(self) -> None:
        for name in ("workers", "shard_size", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not self.max_source_mb > 0:
            raise ConfigError(f"--max-source-mb must be a positive number, got {self.max_source_mb}")
        check_settings(dict(self.rung_bytes), self.residual_quality)


@dataclass(frozen=True)
class EncodeSummary:
    table: str
    version: int
    inputs: int
    encoded_inputs: int
    faces: int
    rejected: int
    skipped: int
    rejects_by_class: dict[str, int]
    bytes_by_family: dict[str, int]
    seconds: float
    shards_run: int
    shards_reused: int
    replaced_older_faces: int = 0  # faces other weights had encoded, replaced by this run
    notes: tuple[str, ...] = field(default=())
    stage_seconds: dict[str, float] = field(default_factory=dict)  # summed over this run's shards and faces
    steady_faces_per_second: float | None = None  # after the first shard finished: engine start-up excluded
    startup_seconds: float | None = None  # wall time not explained by the steady rate (model loads, engine start)
    worker_peak_rss_mb: float | None = None  # the largest peak of the processes that wrote this run's shards

    @property
    def faces_per_second(self) -> float:
        return self.faces / self.seconds if self.seconds > 0 else 0.0

    def render_profile(self) -> str:
        """Time per stage per face, and start-up apart from steady state."""
        steady = "n/a (fewer than two shards finished apart)" if self.steady_faces_per_second is None else f"{self.steady_faces_per_second:.2f} faces/s"
        startup = "" if self.startup_seconds is None else f"; start-up {self.startup_seconds:.1f}s"
        memory = "" if self.worker_peak_rss_mb is None else f"; peak worker memory {self.worker_peak_rss_mb:.0f} MB"
        return f"steady state {steady}{startup}{memory}\n" + render_stages(self.stage_seconds, self.faces)

    @property
    def balanced(self) -> bool:
        return self.inputs == self.encoded_inputs + self.rejected + self.skipped

    def render(self) -> str:
        lines = [
            f"table {self.table} committed at version {self.version}",
            f"inputs {self.inputs} = encoded {self.encoded_inputs} + rejected {self.rejected} + already in table {self.skipped}"
            + ("" if self.balanced else "  [MISMATCH]"),
            f"faces encoded {self.faces} in {self.seconds:.1f}s ({self.faces_per_second:.2f} faces/s); shards run {self.shards_run}, reused {self.shards_reused}",
        ]
        if self.rejects_by_class:
            lines.append("rejects by class: " + ", ".join(f"{k} {v}" for k, v in sorted(self.rejects_by_class.items())))
        lines.append("bytes by column family (whole table): " + ", ".join(f"{k} {v}" for k, v in sorted(self.bytes_by_family.items())))
        lines += list(self.notes)
        return "\n".join(lines)


def verified_held(refs: Sequence[SourceRef], listed: Sequence[tuple[str, int | None]], held: dict[int, set[str | None]], max_bytes: int,
                  progress: bool) -> list[bool]:
    """``--verify-content``: an input the listing calls unchanged (same name, size and mtime, or ETag)
    counts as held only when its bytes still hash to the photo the table recorded for it. Reading
    every held input costs a read and a SHA-256 each (no model runs); what differs is encoded again."""
    def still_same(i: int) -> bool:
        key = listed[i][1]
        if key is None or key not in held:
            return False
        if None in held[key]:  # rejected for what its name is (an unsafe member): nothing to hash
            return True
        try:
            return content_id(read_source(refs[i], max_bytes)) in held[key]
        except InputError:  # unreadable now: read again by a worker, which records why
            return False

    todo = [i for i, (_, k) in enumerate(listed) if k is not None and k in held]
    out = [False] * len(listed)
    with ThreadPoolExecutor(max_workers=8) as pool:  # reads wait on storage, hashing releases the GIL
        for i, same in zip(todo, tqdm(pool.map(still_same, todo), total=len(todo), desc="verify", unit="input", disable=not progress)):
            out[i] = same
    if changed := len(todo) - sum(out):
        log.warning("--verify-content: %d input(s) the listing called unchanged hold other bytes now; encoding them again", changed)
    return out


def plan_shards(sources: Sequence[str], weights_hash: str, shard_size: int, base_version: int = 0, options: str = "",
                keys: Sequence[int | None] | None = None) -> list[ShardSpec]:
    """Shards of ``shard_size`` inputs; ids hash everything that decides their rows: the model, the table
    version planned on (which fixes what is skipped), ``options`` (layers, limits), the inputs and
    their source keys (name and listing fingerprint)."""
    all_keys = tuple(keys) if keys is not None else (None,) * len(sources)
    shards = []
    for i in range(0, len(sources), shard_size):
        chunk, marks = tuple(sources[i : i + shard_size]), all_keys[i : i + shard_size]
        h = hashlib.sha256(key_bytes("\n".join((weights_hash, str(base_version), options, *chunk, *(str(m) for m in marks))))).hexdigest()[:20]
        shards.append(ShardSpec(f"s{i // shard_size:05d}-{h}", chunk, marks))
    return shards


def once_per_photo(table: Table, entries: list[ShardEntry], tag: str) -> list[ShardEntry]:
    """Entries in which each photo is stored by one shard only: the same bytes found under names in
    different shards keep their rows in the first shard (by id), and become aliases in the others."""
    owner: dict[str, str] = {}
    for e in sorted(entries, key=lambda e: e.shard_id):
        for p in e.photo_ids:
            owner.setdefault(p, e.shard_id)
    out = []
    for e in entries:
        dup = frozenset(p for p in e.photo_ids if owner[p] != e.shard_id)
        out.append(rewrite_staged(table, e, tag, dup) if dup else e)
    return out


def _watch(table: Table, shards: Sequence[ShardSpec], stop: threading.Event, enabled: bool) -> None:
    """Progress from the shards' done markers: one listing of the staging folder a poll, and each
    new marker read once for its face count. Asking for every pending shard's marker on each poll
    made 4 requests a second per shard: on an object store, a flood of GETs for a job of many
    shards; on local disk, hundreds of failed opens a second in the process that encodes."""
    if not enabled:
        return
    pending = {s.shard_id for s in shards}
    interval = 0.5 if table.is_local else 5.0
    faces = 0
    with tqdm(total=len(shards), desc="encode", unit="shard") as bar:
        while pending and not stop.is_set():
            try:
                done = table.done_shard_ids()
            except OSError as e:  # a failed listing costs the bar one poll, not the rest of the job's progress
                log.debug("progress: listing the staging folder failed (%s); trying again", e)
                done = set()
            for sid in sorted(pending & done):
                marker = table.done_marker(sid)
                if marker is not None:
                    pending.discard(sid)
                    faces += marker["stats"].get("faces", 0)
                    bar.update(1)
                    bar.set_postfix(faces=faces)
            stop.wait(interval)


def steady_rate(start: float, seen: Sequence[tuple[float, int]]) -> tuple[float | None, float | None]:
    """(faces/s after the first shard, start-up seconds) from when shards finished (time, faces so far).

    None with fewer than 2 shards, or when the shards all finished together at the end: an engine
    that writes every shard at the end (a job of one batch, or an engine that groups before writing) shows no steady
    state, and a rate over the last instants of the run would be meaningless.
    """
    if len(seen) < 2 or seen[-1][0] <= seen[0][0] or seen[-1][1] <= seen[0][1]:
        return None, None
    if seen[-1][0] - seen[0][0] < 0.1 * (seen[-1][0] - start):
        return None, None
    rate = (seen[-1][1] - seen[0][1]) / (seen[-1][0] - seen[0][0])
    return rate, max(0.0, seen[0][0] - start - seen[0][1] / rate)


def _finish_times(stats: Sequence[dict[str, Any]]) -> list[tuple[float, int]]:
    """(finish time, faces so far) over this run's shards, in the order they finished."""
    seen, faces = [], 0
    for st in sorted((st for st in stats if "finished_at" in st), key=lambda st: st["finished_at"]):
        faces += st.get("faces", 0)
        seen.append((st["finished_at"], faces))
    return seen


def _torch_threads(opts: EncodeOptions) -> int:
    """Each worker's share of this machine's cores when several encoder workers run on it (Beam's
    local runner, a Ray started here: Ray would give each actor one thread); 0 where workers have
    machines of their own."""
    on_this_machine = (opts.engine == "beam" and not any(a.startswith("--runner") for a in opts.beam_args)) or \
                      (opts.engine == "ray" and not opts.ray_address)
    return shared_machine_threads(opts.workers) if on_this_machine else 0


def run_encode(src: str, table_root: str, opts: EncodeOptions = EncodeOptions()) -> EncodeSummary:
    start = time.monotonic()
    started_at = time.time()  # the shards' markers say when they finished in wall-clock time
    weights = opts.weights or str(embedded_weights_path())
    bundle = load_bundle(Path(weights))
    cfg = bundle.config
    names = all_layer_names(cfg.plan)
    layers = tuple(opts.layers) if opts.layers else names
    if unknown := set(layers) - set(names):
        raise ConfigError(f"unknown layers {sorted(unknown)}; the model has {names}")
    table = Table(table_root)
    if finished := finish_pending(table):
        log.warning("finished version %d, which an earlier run claimed and did not complete", finished)
    snapshot = table.snapshot_or_empty()
    if snapshot.damaged:  # planning and committing need every family: nothing is written to a damaged table
        raise TableCorruptError(f"{next(iter(snapshot.damaged.values()))}; nothing was encoded")
    refs = list_sources(src)
    listed = [(r.key, source_key(r.key, r.fingerprint)) for r in refs]
    if opts.verify_content:
        held = verified_held(refs, listed, held_keys(table, snapshot, bundle.weights_hash, listed, layers), int(opts.max_source_mb * 2**20),
                             opts.progress)
    else:
        held = held_sources(table, snapshot, bundle.weights_hash, listed, layers)
    todo_inputs = [inp for inp, h in zip(listed, held) if not h]
    sources, skipped = [s for s, _ in todo_inputs], len(listed) - len(todo_inputs)
    max_source_bytes = int(opts.max_source_mb * 2**20)
    human = default_plan(cfg.generator.size, opts.residual_quality, dict(opts.rung_bytes))
    people = f";human_layers={human.describe()}" if set(layers) & set(HUMAN_LAYERS) else ""
    shards = plan_shards(sources, bundle.weights_hash, opts.shard_size, snapshot.version,
                         options=f"layers={','.join(layers)};max_source_bytes={max_source_bytes}{people}", keys=[k for _, k in todo_inputs])
    done = set()
    staged = table.done_shard_ids()  # one listing, not a request per planned shard
    for s in shards:
        marker = table.done_marker(s.shard_id) if s.shard_id in staged else None
        if marker is not None:
            table.write_done_marker(ShardEntry.from_json(marker))  # fresh again: `check --repair` keeps a resumed run's shards
            done.add(s.shard_id)
    todo = [s for s in shards if s.shard_id not in done]
    ctx = JobContext(table_root, weights, cfg.codec_id, bundle.weights_hash, cfg.alignment, layers, opts.device,
                     opts.batch_size, descriptor=cfg.semantic.descriptor if cfg.semantic else "", max_source_bytes=max_source_bytes,
                     residual_quality=human.full_quality, rung_bytes=human.budgets(), human_layers=human.describe(), torch_threads=_torch_threads(opts))
    log.info("%d inputs listed, %d already in the table; %d to read in %d shards (%d already done by an interrupted run)",
             len(listed), skipped, len(sources), len(shards), len(done))
    stop = threading.Event()
    watcher = threading.Thread(target=_watch, args=(table, todo, stop, opts.progress), daemon=True)
    watcher.start()
    try:
        if todo:
            if opts.engine == "local":
                worker = ShardWorker(ctx)
                try:
                    for _ in worker.run_many(todo):
                        pass  # the watcher reports progress from the done markers
                finally:
                    worker.close()
            elif opts.engine == "beam":
                from facetier.pipelines.jobs.beam_engine import run_beam

                run_beam(ctx, todo, opts.workers, opts.beam_args)
            elif opts.engine == "ray":
                from facetier.pipelines.jobs.ray_engine import run_ray

                run_ray(ctx, todo, opts.workers, opts.ray_address, opts.gpus_per_worker)
            else:
                raise ConfigError(f"unknown engine {opts.engine!r}")
    finally:
        stop.set()
        watcher.join()
    entries: list[ShardEntry] = []
    for s in shards:
        marker = table.done_marker(s.shard_id)
        if marker is None:
            if table.version() != snapshot.version:  # a racing run with the same plan committed these shards and removed their markers
                raise ConcurrentCommitError(f"{table_root} moved to version {table.version()} while this run worked on {snapshot.version}; "
                                            "rerun to add what is missing")
            raise TableError(f"shard {s.shard_id} finished without its done marker; nothing was committed")
        entries.append(ShardEntry.from_json(marker))
    tag = f"v{snapshot.version + 1}-{uuid.uuid4().hex[:8]}"  # unique to this run: a racing run never writes the same name
    written = {rel for e in entries for rel in e.files.values()}
    notes = []
    found = {p for e in entries for p in e.photo_ids}
    # photos this model stores with fewer layers than this run asks for are stored whole now: their rows are replaced
    partial = partial_photos(table, snapshot, bundle.weights_hash, layers, found)
    if partial:
        notes.append(f"{len(partial)} photo(s) stored before without every layer this run asks for were encoded again, whole")
    # bytes the model already stores first, so every name they were found under counts as already in the table
    if again := held_photos(table, snapshot, bundle.weights_hash, found) - partial:
        entries = [rewrite_staged(table, e, f"{tag}-known", again & frozenset(e.photo_ids), already_stored=True) if again & frozenset(e.photo_ids)
                   else e for e in entries]
        written |= {rel for e in entries for rel in e.files.values()}
        notes.append(f"{len(again)} photo(s) read under new or changed names held bytes this model already stores: recorded as aliases")
    entries = once_per_photo(table, entries, tag)
    replaced = replaced_rows(table, snapshot, bundle.weights_hash, {p for e in entries for p in e.photo_ids}, sources, tag, partial)
    if replaced.older_rows:
        notes.append(f"{replaced.older_rows} face(s) encoded with older weights were replaced by this run's encoding")
    fresh = [e for e in entries if e.files]
    if missing := [rel for e in fresh for rel in e.files.values() if not table.fs.exists(table._p(rel))]:
        raise TableError(f"{len(missing)} file(s) of this run's shards are gone (e.g. {table.uri(missing[0])}: removed by `check --repair`?); "
                         "nothing was committed, rerun")
    try:
        if fresh or not replaced.empty or snapshot.version == 0:
            version = commit(table, snapshot.version, fresh, removes=replaced.removes, extra_adds=replaced.adds)
        else:
            version = snapshot.version  # nothing new: the table stays at its version
    except ConcurrentCommitError:  # planned on a version that is no longer the table's: these shards are of no further use
        table.remove_done_markers([s.shard_id for s in shards])
        # only the rewrites carry this run's unique tag; a racing run with the same plan wrote (and may have
        # committed) the very same shard files, so those are left to `vacuum`, which keeps what a version references
        table.remove_files(sorted(a.path for more in replaced.adds.values() for a in more))
        raise
    table.remove_done_markers([s.shard_id for s in shards])
    # files this run wrote and then replaced by a rewrite (duplicate photos) were never in any version
    table.remove_files(sorted(written - {rel for e in fresh for rel in e.files.values()}))
    stats = [e.stats for e in entries]
    rejects: Counter[str] = Counter()
    stage_seconds = StageTimes()
    for st in stats:
        rejects.update(st.get("rejects_by_class", {}))
    by_shard: dict[str, dict[str, Any]] = {}
    for e in entries:
        by_shard.setdefault(e.shard_id, e.stats)
    this_run = [by_shard[s.shard_id] for s in todo]  # not shards an interrupted run left done
    for st in this_run:
        stage_seconds.add(st.get("stage_seconds", {}))
    steady, startup = steady_rate(started_at, _finish_times(this_run))
    if opts.update_index:
        from facetier.pipelines.jobs.identity_index import build_index  # faiss is loaded only when asked for

        notes.append(build_index(table_root, progress=opts.progress).render())
    return EncodeSummary(
        table=table_root,
        version=version,
        inputs=sum(st["inputs"] for st in stats) + skipped,
        encoded_inputs=sum(st["encoded_inputs"] for st in stats),
        faces=sum(st["faces"] for st in stats),
        rejected=sum(st["rejected"] for st in stats),
        skipped=skipped + sum(st.get("already_stored", 0) for st in stats),
        rejects_by_class=dict(rejects),
        bytes_by_family=table.family_bytes(),
        seconds=time.monotonic() - start,
        shards_run=len(todo),
        shards_reused=len(done),
        replaced_older_faces=replaced.older_rows,
        notes=tuple(notes),
        stage_seconds=stage_seconds.ordered(),
        steady_faces_per_second=steady,
        startup_seconds=startup,
        worker_peak_rss_mb=max((st["worker_peak_rss_mb"] for st in this_run if "worker_peak_rss_mb" in st), default=None),
    )
