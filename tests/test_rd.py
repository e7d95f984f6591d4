"""``facetier rd``: the conventional codecs, the sweep on generated faces, BD-rate, the report."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from facetier.pipelines.evaluation.conventional_codecs import conventional_codecs
from facetier.pipelines.evaluation.rate_distortion import FACETIER, RdPoint, _Faces, _Judge, _spread
from facetier.pipelines.evaluation.rd_envelope import beating_points, bd_rate, bd_rates, goals

from facetier.cli import main
from facetier.errors import ConfigError


def test_every_codec_works_or_says_why() -> None:
    codecs, skipped = conventional_codecs()
    names = {c.name for c in codecs} | set(skipped)
    assert {"jpeg", "webp", "avif", "heic", "jpegxl", "vvc"} <= names
    assert all(why for why in skipped.values())
    with pytest.raises(ConfigError, match="unknown codecs"):
        conventional_codecs(["jpeg", "bmp"])
    jpeg, webp = conventional_codecs(["jpeg", "webp"], (0, 1, 50, 95))[0]
    assert jpeg.qualities == (1, 50, 95) and webp.qualities == (0, 1, 50, 95)  # libjpeg's 0 is its 1
    for bad in ((), (10, 5), (0, 101), (5, 5)):
        with pytest.raises(ConfigError, match="qualities"):
            conventional_codecs(["webp"], bad)


def test_bytes_grow_with_quality_and_decodes_keep_the_crop_size(generated_faces: np.ndarray) -> None:
    face = generated_faces[0]
    codecs, _ = conventional_codecs()
    for codec in codecs:
        sizes = []
        for q in codec.qualities:
            data, decoded = codec.code(face, q)
            sizes.append(len(data))
            assert decoded.shape == face.shape and decoded.dtype == np.uint8
        assert sizes == sorted(sizes), f"{codec.name}: bytes over its quality sweep {sizes}"
        small, decoded = codec.code(face, codec.qualities[0], 0.25)
        assert decoded.shape == face.shape and len(small) < sizes[0], codec.name
        assert 0 < codec.header_bytes() < 1000


def _point(codec: str, nbytes: float, quality: float) -> RdPoint:
    return RdPoint(codec, "", None, nbytes, 0.0, quality, quality, None, 0, None, None)


def test_bd_rate_of_a_curve_needing_twice_the_bytes() -> None:
    anchor = [_point("a", b, math.log(b)) for b in (100, 200, 400, 800)]
    test = [_point("t", 2 * b, math.log(b)) for b in (100, 200, 400, 800)]
    assert bd_rate(test, anchor, "ms_ssim") == pytest.approx(100.0)
    assert bd_rate(anchor, test, "ms_ssim") == pytest.approx(-50.0)
    far = [_point("f", b, 100 + math.log(b)) for b in (100, 200)]
    assert bd_rate(far, anchor, "ms_ssim") is None  # no overlap in quality: no figure rather than an extrapolated one


def test_the_envelope_judges_every_conventional_point() -> None:
    def pt(codec: str, nbytes: float, ver: float, ssim: float, setting: str = "") -> RdPoint:
        return RdPoint(codec, setting, None, nbytes, 0.0, 30.0, ssim, ver, 0, None, None)

    ours = [pt(FACETIER, 100, 0.80, 0.90, "preview ≤30 B"), pt(FACETIER, 300, 0.92, 0.95, "preview ≤230 B")]
    points = ours + [
        pt("webp", 120, 0.79, 0.895),  # matched by the 100 B point (within 1 point and 0.005)
        pt("webp@64px", 310, 0.94, 0.95),  # 2 points better than anything at <= 310 B: it beats facetier
        pt("avif", 90, 0.70, 0.80),  # cheaper than every facetier point: nothing at its bytes matches it
        pt("jpeg", 2500, 0.99, 0.999),  # above 2,000 B: not judged
        pt("variant: x", 50, 0.99, 0.999),  # a candidate, not a conventional codec
    ]
    beaten = {(b["codec"], b["bytes"]) for b in beating_points(points)}
    assert beaten == {("webp@64px", 310), ("avif", 90)}
    assert next(b for b in beating_points(points) if b["codec"] == "avif")["closest_facetier"] is None
    g = goals(points)
    assert g["verification_within_300_B"]["value"] == 0.92 and g["verification_within_400_B"]["setting"] == "preview ≤230 B"
    assert "facetier vs envelope of all conventional points" in bd_rates(points)


def test_rd_report_on_generated_faces(tmp_path: Path, sample_archive: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "rd"
    rc = main(["rd", str(sample_archive), "--report", str(out), "--limit", "50", "--codecs", "jpeg,jpegxl", "--downscales", "4",
               "--preview-budgets", "100,150", "--detail-budgets", "300", "--residual-qualities", "10,90", "--peer-faces", "0", "--metric-faces", "4"])
    assert rc == 0
    report = json.loads((out / "rd.json").read_text())
    assert report["faces"] >= 5 and report["pairs"] == 0 and report["crop_verification"] is None
    assert report["metric_faces"] == 4 and report["judge_runtime"] in ("torch", "onnxruntime")
    assert set(report["phase_seconds"]) == {"load and align", FACETIER, "conventional codecs"}
    points = report["points"]
    ours = [p for p in points if p["codec"] == FACETIER]
    people = ["preview ≤100 B", "preview ≤150 B", "detail ≤300 B", "residual q=10", "residual q=90", "residual q=10, no rungs", "residual q=90, no rungs"]
    # no default layer for people reads the generated face: each also stands over the base layer alone
    assert [p["setting"] for p in ours] == ["basic", "middle", "enhanced", *people, *(f"{s}, over basic" for s in people)]
    by_setting = {p["setting"]: p for p in ours}
    for s in people:
        alone, over = by_setting[s], by_setting[f"{s}, over basic"]
        assert over["ms_ssim"] == alone["ms_ssim"]
        assert over["bytes_mean"] == pytest.approx(alone["bytes_mean"] - by_setting["enhanced"]["bytes_mean"] + by_setting["basic"]["bytes_mean"])
    chain = [p["bytes_mean"] for p in ours if p["setting"] in ("basic", "middle", "enhanced", "preview ≤150 B", "detail ≤300 B", "residual q=10")]
    assert chain == sorted(chain)  # each layer holds the ones below
    budgeted = [p for p in ours if p["budget"] and "over basic" not in p["setting"]]
    assert [p["budget"] for p in budgeted] == [100, 150, 300] and all(p["layer_bytes_p95"] <= 1.1 * p["budget"] for p in budgeted)
    assert set(report["goals"]) >= {"verification_within_300_B", "ms_ssim_within_1700_B", "budgets"}
    assert isinstance(report["beating_points"], list)
    assert {p["codec"] for p in points} == {FACETIER, "jpeg", "jpeg@32px", "jpegxl", "jpegxl@32px"}
    assert len([p for p in points if p["codec"] == "jpeg"]) == 6 and len([p for p in points if p["codec"] == "jpeg@32px"]) == 2
    assert all(p["verification"] is None and 0 < p["ms_ssim"] <= 1 and p["psnr_db"] > 10 for p in points)
    assert set(report["bd_rate"]) == {"facetier vs envelope of all conventional points", "facetier vs jpeg", "facetier vs jpegxl"}
    assert "vvc" in report["skipped"]
    assert not (out / "rd-so-far.csv").exists(), "the points measured so far are in rd.csv once the run ends"
    with (out / "rd.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(points) and set(rows[0]) >= {"codec", "setting", "bytes_mean", "bpp", "psnr_db", "ms_ssim", "verification"}
    pytest.importorskip("matplotlib", reason="plots need the eval extra")
    for name in ("rd.png", "rd.svg", "strip.png"):
        assert (out / name).stat().st_size > 1000
    assert "BD-rate facetier vs envelope of all conventional points" in capsys.readouterr().out


def test_a_run_that_dies_keeps_the_points_it_measured(tmp_path: Path) -> None:
    from facetier.pipelines.evaluation.rate_distortion import PointLog, RdPoint

    log_point = PointLog(tmp_path / "run" / "rd-so-far.csv")
    first = RdPoint("webp", "q=10", 10, 300.0, 0.15, 30.0, 0.95, 0.9, 0, None, None)
    assert log_point(first) is first
    log_point(RdPoint(FACETIER, "preview ≤150 B", None, 170.0, 0.08, 26.0, 0.89, 0.86, 0, None, None, budget=150))
    with (tmp_path / "run" / "rd-so-far.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["codec"], r["setting"], r["budget"]) for r in rows] == [("webp", "q=10", ""), (FACETIER, "preview ≤150 B", "150")]


def test_rd_on_lfw_pairs(tmp_path: Path, shared_data: Path) -> None:
    out = tmp_path / "rd"
    assert main(["rd", str(shared_data / "lfw"), "--report", str(out), "--limit", "16", "--codecs", "webp", "--downscales", "2",
                 "--preview-budgets", "150", "--detail-budgets", "350", "--residual-qualities", "60", "--peer-faces", "0", "--no-strip"]) == 0
    report = json.loads((out / "rd.json").read_text())
    assert report["pairs"] == 16 and report["crop_verification"] > 0.5
    best = max(p["verification"] for p in report["points"] if p["codec"] == "webp")
    assert best >= report["crop_verification"] - 0.2
    assert not (out / "strip.png").exists()


def test_image_metrics_average_the_sampled_faces(generated_faces: np.ndarray) -> None:
    """PSNR and MS-SSIM read only the faces spread over the set: decodes exact there and noisy
    elsewhere score as exact; with every face sampled, the noise shows."""
    crops = generated_faces[:4]
    noisy = np.clip(crops.astype(int) + np.random.default_rng(0).integers(-60, 60, crops.shape), 0, 255).astype(np.uint8)
    sample = _spread(len(crops), 3)
    assert sample.tolist() == [0, 1, 3] and _spread(4, None).tolist() == _spread(4, 10).tolist() == [0, 1, 2, 3]
    decoded = noisy.copy()
    decoded[sample] = crops[sample]

    def score(metric_idx: np.ndarray) -> RdPoint:
        faces = _Faces([str(i) for i in range(4)], crops, [], np.arange(0), metric_idx, np.arange(1))
        return _Judge(faces, "dlib-resnet-v1-chip", 0.8, None).score("x", "q=1", 1, [10] * 4, decoded)

    sampled, every = score(sample), score(np.arange(4))
    assert sampled.ms_ssim > 0.999 and sampled.psnr_db > 60
    assert every.ms_ssim < 0.95 and every.psnr_db < sampled.psnr_db - 10  # one noisy face in four
