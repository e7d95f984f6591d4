"""``facetier bench``: encode and decode throughput of each engine against the JPEG-decode ceiling, same files, same run.

Each engine configuration runs in its own process (so peak memory is that run's), on the same
list of inputs, into a fresh table; then (``decode_upto``) the same engine decodes every face of
that table at each of those prefixes, each in its own process too. Reported per run: wall-clock faces/s, the steady-state rate
after the first shard (engine start-up and model loads excluded) and the start-up it implies,
time per stage per face, and peak memory. Machines are shared and noisy: compare the ratios.
"""
from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from facetier.io.images import decode_image
from facetier.io.sources import SourceRef, list_sources, read_source

from facetier.errors import InputError


@dataclass(frozen=True)
class BenchRow:
    name: str
    seconds: float
    inputs: int
    faces: int
    faces_per_second: float
    ratio_to_decode_ceiling: float
    peak_rss_mb: float  # the largest process of the run: driver, a child it reaped, or a worker that wrote a shard
    steady_faces_per_second: float | None = None
    startup_seconds: float | None = None
    stage_ms_per_face: dict[str, float] | None = None
    batch_size: int | None = None
    device: str = "cpu"
    worker_peak_rss_mb: float | None = None  # the largest of the processes that wrote shards (Ray actors included)


def _decode_rate(keys: list[str]) -> float:
    start = time.perf_counter()
    for k in keys:
        try:
            decode_image(read_source(SourceRef.parse(k)))
        except InputError:
            pass  # bad inputs cost the same read in every run
    return len(keys) / (time.perf_counter() - start)


def _child_json(code: str, what: str) -> dict:
    """Run ``code`` in a fresh interpreter (its own peak memory) and parse the JSON it prints last."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"bench {what} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _decode_row(table: Path, out: Path, engine: str, workers: int, batch: int, device: str, weights: str | None, upto: str) -> BenchRow:
    opts = f"engine={engine!r}, workers={workers}, batch_size={batch}, device={device!r}, weights={weights!r}"
    code = (
        "import json,resource;from facetier.pipelines.jobs.decode import run_decode, DecodeOptions;"
        f"r=run_decode({str(table)!r}, None, {upto!r}, {str(out)!r}, DecodeOptions({opts}, where='true'));"
        "rss=max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss);"
        "print(json.dumps({'faces': r.written, 'selected': r.selected, 'seconds': r.seconds, 'rss_kb': rss, 'steady': r.faces_per_second,"
        " 'startup': r.startup_seconds, 'balanced': r.balanced}))"
    )
    res = _child_json(code, f"decode {engine} x{workers}")
    if not res["balanced"]:
        raise RuntimeError(f"bench decode {engine} x{workers}: selected {res['selected']} but the outputs do not balance")
    fps = res["faces"] / res["seconds"]
    return BenchRow(f"decode {upto} {engine} x{workers} b{batch}", res["seconds"], res["selected"], res["faces"], fps, 0.0, res["rss_kb"] / 1024,
                    res["steady"], res["startup"], None, batch, device)


def run_bench(src: str, *, limit: int, configs: list[tuple[str, int]], out: str | None, batch_sizes: tuple[int, ...] = (16,),
              device: str = "auto", weights: str | None = None, shard_size: int = 64, cross_device: int = 0,
              decode_upto: tuple[str, ...] = ("enhanced", "preview", "detail", "residual")) -> dict:
    keys = [r.key for r in list_sources(src)][:limit]
    work = Path(tempfile.mkdtemp(prefix="facetier-bench-"))
    try:
        listing = work / "inputs.txt"
        listing.write_text("\n".join(keys) + "\n")
        ceiling = _decode_rate(keys)
        rows = [BenchRow("jpeg-decode-only", len(keys) / ceiling, len(keys), len(keys), ceiling, 1.0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)]
        query = None
        decode_rows: list[BenchRow] = []
        for engine, workers in configs:
            for batch in batch_sizes:
                table = work / f"table-{engine}-{workers}-{batch}"
                opts = f"engine={engine!r}, workers={workers}, batch_size={batch}, device={device!r}, weights={weights!r}, shard_size={shard_size}, progress=False"
                code = (
                    "import json,resource,sys,torch;from facetier.pipelines.jobs.encode import run_encode, EncodeOptions;"
                    f"s=run_encode({str(listing)!r}, {str(table)!r}, EncodeOptions({opts}));"
                    "rss=max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss);"
                    "from facetier.codec.stage_times import per_face_ms;"
                    "dev='cuda' if torch.cuda.is_available() and " + repr(device) + " != 'cpu' else 'cpu';"
                    "print(json.dumps({'faces': s.faces, 'inputs': s.inputs, 'seconds': s.seconds, 'rss_kb': rss, 'steady': s.steady_faces_per_second,"
                    " 'startup': s.startup_seconds, 'stages': per_face_ms(s.stage_seconds, s.faces), 'device': dev, 'worker_mb': s.worker_peak_rss_mb}))"
                )
                res = _child_json(code, f"run {engine} x{workers} batch {batch}")
                # the largest single process of that run (driver, a worker it reaped, or a Ray actor that wrote a
                # shard); per run, not cumulative
                peak = max(res["rss_kb"] / 1024, res.get("worker_mb") or 0.0)
                fps = res["faces"] / res["seconds"]
                rows.append(BenchRow(f"{engine} x{workers} b{batch}", res["seconds"], res["inputs"], res["faces"], fps, fps / ceiling, peak,
                                     res["steady"], res["startup"], res["stages"], batch, res["device"], res.get("worker_mb")))
                for upto in decode_upto:  # each prefix a person may ask for: the rungs skip the generator
                    decode_rows.append(_decode_row(table, work / f"decoded-{engine}-{workers}-{batch}-{upto}", engine, workers, batch, device, weights, upto))
                if query is None:
                    from facetier.pipelines.jobs.analytics import run_query

                    q = run_query(str(table), "select count(*) from faces f join basic b using (face_id)")
                    query = {"bytes_read": q.bytes_read, "table_bytes": q.table_bytes, "fraction": q.bytes_read / q.table_bytes}
    finally:
        # each run's table and decodes (GBs at 10,000 photos): the report holds what was measured
        shutil.rmtree(work, ignore_errors=True)
    report = {"inputs": len(keys), "rows": [asdict(r) for r in rows + decode_rows], "base_only_query": query}
    if cross_device:
        from facetier.pipelines.evaluation.cross_device import check_cross_device

        report["cross_device"] = check_cross_device(src, device, cross_device, weights).to_json()
    if out:
        Path(out).write_text(json.dumps(report, indent=1))
    return report


def render(report: dict) -> str:
    lines = [f"{'run':<28}{'seconds':>9}{'faces':>7}{'faces/s':>9}{'steady/s':>9}{'start-up s':>11}{'x ceiling':>10}{'peak MB':>9}"]
    for r in report["rows"]:
        steady = "" if r.get("steady_faces_per_second") is None else f"{r['steady_faces_per_second']:.2f}"
        startup = "" if r.get("startup_seconds") is None else f"{r['startup_seconds']:.1f}"
        ratio = f"{r['ratio_to_decode_ceiling']:.4f}" if r["ratio_to_decode_ceiling"] else ""
        lines.append(f"{r['name']:<28}{r['seconds']:>9.1f}{r['faces']:>7}{r['faces_per_second']:>9.2f}{steady:>9}{startup:>11}"
                     f"{ratio:>10}{r['peak_rss_mb']:>9.0f}")
    staged = [r for r in report["rows"] if r.get("stage_ms_per_face")]
    if staged:
        names = list(dict.fromkeys(k for r in staged for k in r["stage_ms_per_face"]))
        lines.append("")
        lines.append("ms per face by stage " + "".join(f"{r['name']:>20}" for r in staged))
        for n in names:
            lines.append(f"{n:<21}" + "".join(f"{r['stage_ms_per_face'].get(n, 0.0):>20.1f}" for r in staged))
    if x := report.get("cross_device"):
        lines.append(f"cross-device ({x['device']} -> cpu), {x['faces']} faces: streams re-coded identically on the CPU "
                     f"{x['streams_identical_after_cpu_recode']}, same symbols as a CPU encode {x['symbols_equal_to_cpu_encode']}, "
                     f"full decodes equal {x['residual_decodes_equal']}, max synthesis difference {x['max_pixel_difference']}/255, "
                     f"max full-decode difference {x['max_residual_decode_difference']}/255 (stated bound {x['device_pixel_bound']}): "
                     f"{'holds' if x['holds'] else 'DOES NOT HOLD'}")
    q = report["base_only_query"]
    if q:
        lines.append(f"base-only query read {q['bytes_read']} of {q['table_bytes']} table bytes ({100 * q['fraction']:.2f}%)")
    return "\n".join(lines)
