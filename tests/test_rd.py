"""``facetier rd``: the conventional codecs, the sweep on generated faces, BD-rate, the report."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from facetier.pipelines.evaluation.conventional_codecs import conventional_codecs
from facetier.pipelines.evaluation.rate_distortion import FACETIER, RdPoint, _Faces, _Judge, _spread, bd_rate

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


def test_rd_report_on_generated_faces(tmp_path: Path, sample_archive: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "rd"
    rc = main(["rd", str(sample_archive), "--report", str(out), "--limit", "50", "--codecs", "jpeg,jpegxl", "--downscales", "4",
               "--residual-qualities", "10,90", "--peer-faces", "0", "--metric-faces", "4"])
    assert rc == 0
    report = json.loads((out / "rd.json").read_text())
    assert report["faces"] >= 5 and report["pairs"] == 0 and report["crop_verification"] is None
    assert report["metric_faces"] == 4 and report["judge_runtime"] in ("torch", "onnxruntime")
    assert set(report["phase_seconds"]) == {"load and align", FACETIER, "conventional codecs"}
    points = report["points"]
    ours = [p for p in points if p["codec"] == FACETIER]
    assert [p["setting"] for p in ours] == ["basic", "middle", "enhanced", "residual q=10", "residual q=90"]
    assert [p["bytes_mean"] for p in ours] == sorted(p["bytes_mean"] for p in ours)  # each prefix holds the one below
    assert {p["codec"] for p in points} == {FACETIER, "jpeg", "jpeg@32px", "jpegxl", "jpegxl@32px"}
    assert len([p for p in points if p["codec"] == "jpeg"]) == 6 and len([p for p in points if p["codec"] == "jpeg@32px"]) == 2
    assert all(p["verification"] is None and 0 < p["ms_ssim"] <= 1 and p["psnr_db"] > 10 for p in points)
    assert set(report["bd_rate"]) == {"facetier residual vs jpeg", "facetier residual vs jpegxl"}
    assert "vvc" in report["skipped"]
    with (out / "rd.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(points) and set(rows[0]) >= {"codec", "setting", "bytes_mean", "bpp", "psnr_db", "ms_ssim", "verification"}
    pytest.importorskip("matplotlib", reason="plots need the eval extra")
    for name in ("rd.png", "rd.svg", "strip.png"):
        assert (out / name).stat().st_size > 1000
    assert "BD-rate facetier residual vs jpeg" in capsys.readouterr().out


def test_rd_on_lfw_pairs(tmp_path: Path, shared_data: Path) -> None:
    out = tmp_path / "rd"
    assert main(["rd", str(shared_data / "lfw"), "--report", str(out), "--limit", "16", "--codecs", "webp", "--downscales", "2",
                 "--residual-qualities", "80", "--peer-faces", "0", "--no-strip"]) == 0
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
