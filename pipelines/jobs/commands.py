"""The production commands: encode, decode, query, search, edit, warehouse-ddl, sample, demo, info.

Each command's arguments are defined next to the handler that reads them; the job modules are
imported inside the handlers so that ``facetier --help`` loads neither torch nor an engine.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from facetier.errors import ConfigError

if TYPE_CHECKING:
    from facetier.pipelines.jobs.analytics import QueryLimits


def _rung_bytes(text: str | None) -> tuple[tuple[str, int], ...]:
    if not text:
        return ()
    try:
        return tuple((k.strip(), int(v)) for k, v in (part.split("=") for part in text.split(",")))
    except ValueError:
        raise ConfigError(f"--rung-bytes takes LAYER=BYTES pairs, e.g. preview=150,detail=350, not {text!r}") from None


def _encode(a: argparse.Namespace) -> int:
    from facetier.pipelines.jobs.encode import EncodeOptions, run_encode

    if not a.src or not a.table:
        raise ConfigError("encode needs SRC and TABLE (arguments, or $FACETIER_SOURCE and $FACETIER_TABLE)")
    opts = EncodeOptions(engine=a.engine, workers=a.workers, shard_size=a.shard_size, batch_size=a.batch_size,
                         layers=tuple(a.layers.split(",")) if a.layers else None, weights=a.weights, device=a.device,
                         ray_address=a.ray_address, gpus_per_worker=a.gpus_per_worker, beam_args=tuple(a.beam_arg or ()), progress=not a.quiet, max_source_mb=a.max_source_mb,
                         residual_quality=a.residual_quality, rung_bytes=_rung_bytes(a.rung_bytes), verify_content=a.verify_content, update_index=a.update_index)
    summary = run_encode(a.src, a.table, opts)
    print(summary.render())
    if a.profile:
        print(summary.render_profile())
    return 0 if summary.balanced else 3


def _decode_options(a: argparse.Namespace, **extra: object):
    from facetier.pipelines.jobs.decode import DecodeOptions

    return DecodeOptions(where=a.where, ids_file=a.ids_file, limit=a.limit, fmt=a.format, quality=a.quality, paste_back=a.paste_back,
                         gallery=a.gallery, dry_run=a.dry_run, engine=a.engine, workers=a.workers, batch_size=a.batch_size, weights=a.weights,
                         device=a.device, ray_address=a.ray_address, beam_args=tuple(a.beam_arg or ()), progress=not a.quiet,
                         as_of=getattr(a, "as_of", None), query_limits=_query_limits(a), **extra)


def _decode(a: argparse.Namespace) -> int:
    from facetier.pipelines.jobs.decode import run_decode

    if not a.table:
        raise ConfigError("which table? give TABLE or set FACETIER_TABLE")

    result = run_decode(a.table, a.ids, a.upto, a.out, _decode_options(a))
    print(result.render())
    return _report_failures(result.failures, result.written + result.present)


def _report_failures(failures: tuple, written: int) -> int:
    """Failed faces on stderr, one line each; exit 4 when any (the others were written)."""
    for f in failures:
        print(f"FAILED {f.id}\t{f.error_class}: {f.message}", file=sys.stderr)
    if failures:
        print(f"-- {written} written, {len(failures)} failed", file=sys.stderr)
    return 4 if failures else 0


def _query(a: argparse.Namespace) -> int:
    from facetier.pipelines.jobs.analytics import run_query

    res = run_query(a.table, a.sql, as_of=a.as_of, limits=_query_limits(a))
    print(res.table.to_pandas().to_string(index=False, max_rows=a.max_rows))
    print(f"-- read {res.bytes_read} bytes of {res.table_bytes} in the table ({100 * res.bytes_read / max(1, res.table_bytes):.2f}%)", file=sys.stderr)
    return 0


def _search(a: argparse.Namespace) -> int:
    from facetier.pipelines.jobs.identity_search import search

    res = search(a.table, a.like, a.k, within=a.within, where=a.where, as_of=a.as_of, use_index=not a.no_index, weights=a.weights,
                 device=a.device, limits=_query_limits(a))
    print(res.table.to_pandas().to_string(index=False))
    print(f"-- {res.method}; read {res.bytes_read} bytes of the base family", file=sys.stderr)
    if res.without_vector:
        print(f"-- {res.without_vector} faces have no {res.space} vector and were not compared", file=sys.stderr)
    return 0


def _index(a: argparse.Namespace) -> int:
    from facetier.pipelines.jobs.identity_index import build_index

    print(build_index(a.table, rebuild=a.rebuild, progress=not a.no_progress, nprobe=a.nprobe).render())
    return 0


def _cluster(a: argparse.Namespace) -> int:
    from facetier.pipelines.jobs.persons import ClusterOptions, cluster

    opts = ClusterOptions(threshold=a.threshold, neighbours=a.neighbours, resolution=a.resolution, join=a.join, full=a.full, engine=a.engine,
                          workers=a.workers, ray_address=a.ray_address, beam_args=tuple(a.beam_arg or ()), progress=not a.no_progress)
    print(cluster(a.table, opts).render())
    return 0


def _edit(a: argparse.Namespace) -> int:
    from facetier.codec.semantic import parse_edits
    from facetier.pipelines.jobs.edit import edit

    if not a.table:
        raise ConfigError("which table? give TABLE or set FACETIER_TABLE")
    res = edit(a.table, a.where, parse_edits(a.set), a.out, upto=a.upto, as_table=a.as_table, weights=a.weights, device=a.device, limit=a.limit,
               ids=a.ids or (), opts=_decode_options(a))
    if res.job is not None:
        print(res.job.render())
    else:
        print(f"edited {res.edited} faces -> table {a.out} version {res.table_version}")
    return _report_failures(res.failures, res.edited)


def _check(a: argparse.Namespace) -> int:
    from facetier.pipelines.jobs.check import check_table

    report = check_table(a.table, repair=a.repair, retention_hours=a.retention_hours, progress=not a.quiet)
    print(report.render())
    return 0 if report.healthy else 5


def _vacuum(a: argparse.Namespace) -> int:
    from facetier.io.table import Table
    from facetier.pipelines.jobs.maintenance import vacuum

    report = vacuum(Table(a.table), retention_hours=a.retention_hours, compact=a.compact, dry_run=a.dry_run, progress=not a.quiet)
    print(report.render())
    return 0


def _migrate(a: argparse.Namespace) -> int:
    from facetier.pipelines.jobs.migrate import migrate_v1

    print(migrate_v1(a.table, progress=not a.quiet).render())
    return 0


def _warehouse_ddl(a: argparse.Namespace) -> int:
    from facetier.pipelines.jobs.warehouse import bigquery_ddl

    print(bigquery_ddl(a.table, a.dataset, a.prefix, a.connection), end="")
    return 0


def _sample(a: argparse.Namespace) -> int:
    from facetier.codec.model import FaceCodec
    from facetier.pipelines.jobs.sample_archive import build_sample_archive

    counts = build_sample_archive(Path(a.out), FaceCodec.load(a.weights, device="cpu"), n_faces=a.faces, seed=a.seed)
    print(f"sample archive in {a.out}: {counts}")
    return 0


def _demo(a: argparse.Namespace) -> int:
    from facetier.pipelines.jobs.demo import run_demo

    return 0 if run_demo(Path(a.out), engine=a.engine, workers=a.workers, faces=a.faces).balanced else 3


def _info(a: argparse.Namespace) -> int:
    from facetier.codec.checkpoints import load_bundle
    from facetier.codec.model import embedded_weights_path

    print(json.dumps(load_bundle(Path(a.weights) if a.weights else embedded_weights_path()).describe(), indent=1))
    return 0


def _query_limit_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--query-seconds", type=float, help="stop the query (SQL, or search's scan) after this many seconds (QueryLimitError; default 300)")
    p.add_argument("--query-memory-mb", type=int, help="the query's working memory limit (QueryLimitError past it; search scans in slices within it; default 2048)")


def _query_limits(a: argparse.Namespace) -> QueryLimits:
    from facetier.pipelines.jobs.analytics import QueryLimits

    given = {"seconds": a.query_seconds, "memory_mb": a.query_memory_mb}
    return QueryLimits(**{k: v for k, v in given.items() if v is not None})


def _job_arguments(p: argparse.ArgumentParser) -> None:
    """What decode and edit share: the selection, the outputs and the engine."""
    p.add_argument("--where", help="SQL condition over the faces index and the base family, e.g. \"gender = 'female' AND age > 60\"")
    _query_limit_arguments(p)
    p.add_argument("--ids", nargs="+", help="face ids or photo ids")
    p.add_argument("--ids-file", help="file (path or URI) of ids, whitespace separated")
    p.add_argument("--limit", type=int, help="at most this many of the selected faces (in id order)")
    p.add_argument("--dry-run", action="store_true", help="print how many faces are selected, and stop")
    p.add_argument("--format", choices=["png", "jpg"], default="png")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality with --format jpg")
    p.add_argument("--paste-back", action="store_true", help="put each face back into its photo (needs the original layer)")
    p.add_argument("--gallery", action="store_true", help="also write gallery.html and gallery.png next to the outputs")
    p.add_argument("--engine", choices=["local", "beam", "ray"], default="local")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32, help="faces per task; the networks run on micro-batches of 16 rows on a CPU (128 on a GPU)")
    p.add_argument("--ray-address", help="address of a running Ray cluster (default: start one in-process)")
    p.add_argument("--beam-arg", action="append", help="extra Beam pipeline option, e.g. --beam-arg=--runner=DataflowRunner")
    p.add_argument("--weights")
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def register(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("encode", help="re-encode an archive into a table (incremental, resumable)")
    e.add_argument("src", nargs="?", default=os.environ.get("FACETIER_SOURCE"),
                   help="folder, glob, .tar/.zip archive or .txt list of URIs (local, gs://, s3://); default $FACETIER_SOURCE")
    e.add_argument("table", nargs="?", default=os.environ.get("FACETIER_TABLE"), help="table root (local, gs://, s3://); default $FACETIER_TABLE")
    e.add_argument("--engine", choices=["local", "beam", "ray"], default="local")
    e.add_argument("--workers", type=int, default=1)
    e.add_argument("--shard-size", type=int, default=64, help="inputs per shard (the unit of resume)")
    e.add_argument("--batch-size", type=int, default=16,
                   help="faces per model step; the networks run on fixed micro-batches (16 rows on a CPU, 128 on a GPU), so the bytes "
                        "do not depend on it, and a step of fewer rows is padded to a whole micro-batch")
    e.add_argument("--layers", help="comma-separated layers to store (default: all)")
    e.add_argument("--weights", help="model bundle (default: the embedded model)")
    e.add_argument("--device", default="auto", help="auto, cpu or cuda")
    e.add_argument("--ray-address", help="address of a running Ray cluster (default: start one in-process)")
    e.add_argument("--beam-arg", action="append", help="extra Beam pipeline option, e.g. --beam-arg=--runner=DataflowRunner")
    e.add_argument("--max-source-mb", type=float, default=64.0,
                   help="larger inputs are rejected without being read (an input is held whole while it is encoded: this bounds a worker's memory)")
    e.add_argument("--verify-content", action="store_true",
                   help="read and hash the inputs the listing calls unchanged (same name, size and mtime, or ETag) instead of skipping them "
                        "unread: new bytes kept under the same size and mtime are encoded; costs a read of the archive, no model time")
    e.add_argument("--update-index", action="store_true",
                   help="bring the identity index (facetier index) up to date right after the commit, building one if there is none")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.add_argument("--residual-quality", type=int, help="quality (0-99) of the residual layer, the face at full resolution (default 60, "
                   "AVIF's scale); recorded in each shard's options")
    e.add_argument("--rung-bytes", help="byte budgets per face of the preview and detail rungs, e.g. preview=150,detail=350 (the defaults); "
                   "each face gets the best format and quality that fits")
    e.add_argument("--gpus-per-worker", type=float,
                   help="ray: GPUs each encoder actor asks for (default: 1 when the cluster has GPUs, whichever node the driver runs on; 0 never)")
    e.add_argument("--profile", action="store_true", help="also print time per stage per face, start-up apart from steady state, and the largest encode worker's peak memory")
    e.set_defaults(func=_encode)

    d = sub.add_parser("decode", help="decode selected faces at a layer prefix (or their source files) to any folder or bucket")
    d.add_argument("table", nargs="?", default=os.environ.get("FACETIER_TABLE"), help="table root (local, gs://, s3://); default $FACETIER_TABLE")
    d.add_argument("--upto", default="enhanced", help="basic, middle, enhanced, preview, detail, residual or original (the source files, byte for byte)")
    d.add_argument("--out", required=True, help="output folder: a path, gs://bucket/prefix or s3://bucket/prefix")
    _job_arguments(d)
    d.add_argument("--as-of", type=int, metavar="VERSION", help="decode the table as it was at this version (time travel; default: the latest)")
    d.set_defaults(func=_decode)

    q = sub.add_parser("query", help="SQL over the faces index (faces) and the base family (basic)")
    q.add_argument("table")
    q.add_argument("sql")
    q.add_argument("--max-rows", type=int, default=50)
    q.add_argument("--as-of", type=int, metavar="VERSION", help="query the table as it was at this version (time travel; default: the latest)")
    _query_limit_arguments(q)
    q.set_defaults(func=_query)

    se = sub.add_parser("search", help="faces of the same person as an image or a stored face (identity index when current, else a scan)")
    se.add_argument("table")
    se.add_argument("--like", required=True, help="an image (path or URI) or a face id / photo id of the table")
    se.add_argument("-k", type=int, default=10, help="how many nearest faces (default 10)")
    se.add_argument("--within", type=float, help="every face closer than this descriptor distance instead of the k nearest (0.45: the same person)")
    se.add_argument("--where", help="SQL condition over the base family's columns the answer must meet, e.g. \"age > 40\"")
    se.add_argument("--as-of", type=int, help="search facetier version N of the table")
    se.add_argument("--no-index", action="store_true", help="scan the base family even when a current identity index exists")
    se.add_argument("--weights")
    se.add_argument("--device", default="auto")
    _query_limit_arguments(se)
    se.set_defaults(func=_search)

    ix = sub.add_parser("index", help="build or update the identity index (faiss) that search and cluster use")
    ix.add_argument("table")
    ix.add_argument("--rebuild", action="store_true", help="build from the whole base family instead of updating the last generation")
    ix.add_argument("--nprobe", type=int, help="inverted lists a query visits (default: chosen from the index size)")
    ix.add_argument("--no-progress", action="store_true")
    ix.set_defaults(func=_index)

    cl = sub.add_parser("cluster", help="a person id for every face (the persons family), incremental after the first run")
    cl.add_argument("table")
    cl.add_argument("--threshold", type=float, default=0.52, help="descriptor distance below which two faces are linked (default 0.52)")
    cl.add_argument("--neighbours", type=int, default=32, help="nearest faces each face links to (default 32)")
    cl.add_argument("--resolution", type=float, default=0.03,
                    help="Leiden (CPM): the link weight per pair of faces a person's cluster must exceed (default 0.03)")
    cl.add_argument("--join", type=float, default=0.1,
                    help="incremental runs: link weight per face a new cluster needs to join an existing person (default 0.1)")
    cl.add_argument("--engine", choices=["local", "beam", "ray"], default="local", help="where the nearest-neighbour graph is computed")
    cl.add_argument("--workers", type=int, default=1)
    cl.add_argument("--ray-address", help="address of a running Ray cluster (default: start one in-process)")
    cl.add_argument("--beam-arg", action="append", help="extra Beam pipeline option, e.g. --beam-arg=--runner=DataflowRunner")
    cl.add_argument("--full", action="store_true", help="cluster every face again (person ids stay where their cluster did not change)")
    cl.add_argument("--no-progress", action="store_true")
    cl.set_defaults(func=_cluster)

    ed = sub.add_parser("edit", help="move attributes of the basic code and decode, without the encoder")
    ed.add_argument("table", nargs="?", default=os.environ.get("FACETIER_TABLE"), help="table root (local, gs://, s3://); default $FACETIER_TABLE")
    ed.add_argument("--set", action="append", required=True, metavar="NAME=VALUE",
                    help="age=+10 (relative), smile=1.0 (absolute), gender=female, race=asian; repeatable")
    ed.add_argument("--out", required=True, help="an output folder (path, gs://, s3://) for images, or a facetier table for new rows")
    ed.add_argument("--as-table", action="store_true", help="write the edited faces as rows of the table at --out (existing, or new)")
    ed.add_argument("--upto", default="enhanced", help="the face's own layers kept on top of the edited base")
    _job_arguments(ed)
    ed.set_defaults(func=_edit)

    ck = sub.add_parser("check", help="verify every committed file, row count and checksum; list (and with --repair remove) what no commit references")
    ck.add_argument("table")
    ck.add_argument("--repair", action="store_true", help="remove unreferenced files and leftover done markers older than the retention window")
    ck.add_argument("--retention-hours", type=float, default=24.0, help="never remove files younger than this: a running job may still commit them")
    ck.add_argument("--quiet", action="store_true", help="no progress bar")
    ck.set_defaults(func=_check)

    va = sub.add_parser("vacuum", help="finish a stopped commit, compact small files (--compact), checkpoint the Delta logs, remove files no version needs")
    va.add_argument("table")
    va.add_argument("--compact", action="store_true", help="rewrite each family's small files into large ones (readers keep working)")
    va.add_argument("--retention-hours", type=float, default=24.0,
                    help="keep files younger than this (a running job may still commit them) and versions this recent (--as-of reaches back this far)")
    va.add_argument("--dry-run", action="store_true", help="list what would be removed; change nothing")
    va.add_argument("--quiet", action="store_true", help="no progress bar")
    va.set_defaults(func=_vacuum)

    mi = sub.add_parser("migrate", help="convert a table an older facetier wrote (JSON manifests) into Delta tables, in place, deleting nothing")
    mi.add_argument("table")
    mi.add_argument("--quiet", action="store_true", help="no progress bar")
    mi.set_defaults(func=_migrate)

    wh = sub.add_parser("warehouse-ddl", help="BigQuery (BigLake) Delta Lake tables over the faces index and base family")
    wh.add_argument("table")
    wh.add_argument("--dataset", required=True)
    wh.add_argument("--prefix", default="facetier")
    wh.add_argument("--connection", default="us.facetier-lake", help="the BigLake connection (region.name) that reads the bucket")
    wh.set_defaults(func=_warehouse_ddl)

    s = sub.add_parser("sample", help="build the self-made sample archive (generated faces + broken files)")
    s.add_argument("out")
    s.add_argument("--faces", type=int, default=12)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--weights")
    s.set_defaults(func=_sample)

    dm = sub.add_parser("demo", help="build a sample archive and run encode -> query -> decode on it")
    dm.add_argument("out", nargs="?", default="facetier-demo")
    dm.add_argument("--engine", choices=["local", "beam", "ray"], default="local")
    dm.add_argument("--workers", type=int, default=1)
    dm.add_argument("--faces", type=int, default=12)
    dm.set_defaults(func=_demo)

    i = sub.add_parser("info", help="describe a model bundle: layers, what it can do yet, where each part came from")
    i.add_argument("--weights")
    i.set_defaults(func=_info)
