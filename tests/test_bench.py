"""``facetier bench``: stage times, steady state and start-up per engine run, in the report."""
from __future__ import annotations

import json
import tempfile

from facetier.pipelines.evaluation.bench import render, run_bench


def test_bench_reports_stages_and_steady_state(sample_archive, tmp_path, monkeypatch):
    out = tmp_path / "bench.json"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    # batches of 2: the 6 faces of 4 shards fill batches across shards, and a steady rate needs shards that finish apart
    report = run_bench(str(sample_archive), limit=12, configs=[("local", 1)], out=str(out), shard_size=3, device="cpu", batch_sizes=(2,))
    assert json.loads(out.read_text()) == report
    assert not list(scratch.iterdir()), "the bench left its tables behind"
    decode, local, *decoded = report["rows"]
    assert decode["name"] == "jpeg-decode-only" and local["name"] == "local x1 b2"
    assert [d["name"] for d in decoded] == [f"decode {upto} local x1 b2" for upto in ("enhanced", "preview", "detail", "residual")]
    assert all(d["faces"] == 6 and d["faces_per_second"] > 0 for d in decoded)
    assert local["faces"] == 6 and local["device"] == "cpu"
    stages = local["stage_ms_per_face"]
    for stage in ("read", "decode", "detect_align", "encoder", "semantic_entropy", "human_layers", "write"):
        assert stages[stage] > 0, stage
    assert local["steady_faces_per_second"] > 0 and local["startup_seconds"] >= 0
    assert local["worker_peak_rss_mb"] > 100 and local["peak_rss_mb"] >= local["worker_peak_rss_mb"]
    text = render(report)
    assert "ms per face by stage" in text and "encoder" in text and "decode preview local" in text


def test_cross_device_check_on_the_cpu(sample_archive):
    """Without a GPU the check compares the CPU with itself: everything must agree exactly."""
    from facetier.pipelines.evaluation.cross_device import check_cross_device

    r = check_cross_device(str(sample_archive), "cpu", limit=12)  # the archive's 6 good faces
    assert r.faces == 6 and r.device == "cpu"
    assert r.streams_identical_after_cpu_recode == r.symbols_equal_to_cpu_encode == r.residual_decodes_equal == 6
    assert r.max_pixel_difference == r.max_residual_decode_difference == 0
    assert r.holds and r.to_json()["holds"]


def test_steady_rate_needs_shards_spread_over_the_run():
    from facetier.pipelines.jobs.encode import steady_rate

    rate, startup = steady_rate(0.0, [(10.0, 10), (20.0, 30), (30.0, 50)])
    assert rate == 2.0 and startup == 5.0  # 20 faces in 10 s after the first shard; the first 10 faces took 5 s of it
    assert steady_rate(0.0, [(100.0, 10), (101.0, 1000)]) == (None, None)  # all written at the end (one batch, or a group-by before the write)
    assert steady_rate(0.0, [(10.0, 10)]) == (None, None)


def test_bench_scale_measures_each_size_next_to_the_v1_manifest(sample_archive, tmp_path):
    from facetier.pipelines.evaluation.scale_bench import render, run_scale_bench
    from facetier.pipelines.jobs.encode import EncodeOptions, run_encode

    src = str(tmp_path / "src")
    run_encode(str(sample_archive), src, EncodeOptions(progress=False))
    report = tmp_path / "scale.json"
    rows = run_scale_bench([3000], tmp_path / "work", src, file_rows=1000, v1_max=3000, report=str(report))
    (r,) = rows
    assert r.faces == 3000 and r.base_bytes < r.table_bytes
    assert 0 < r.query_bytes_read < r.base_bytes  # the attribute query reads only the columns it names
    assert r.commit_seconds > 0 and r.planning_seconds > 0 and r.lookup_seconds > 0 and r.v1_manifest_mb > 0
    assert set(r.peak_rss_mb) == {"planning", "content_check", "query", "lookup", "commit"} and r.content_check_seconds > 0
    assert r.planning_scattered_seconds > 0
    assert json.loads(report.read_text())["rows"][0]["faces"] == 3000 and "v1 JSON MB" in render(rows)
