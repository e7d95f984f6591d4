"""The verification protocol shared by eval-lfw, eval-semantic and eval-prior: folds, thresholds, misses."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from facetier.pipelines.evaluation.protocol import (
    Pair,
    fold_accuracy,
    pair_distances,
    pairs_missing_a_face,
    select_pairs,
)
from facetier.pipelines.training.bundles import tiny_configs
from facetier.pipelines.training.prior import PriorTrainConfig, train_prior

from facetier.errors import InputError


def _pairs(n_folds: int = 4, per_kind: int = 5) -> list[Pair]:
    return [Pair(f, f"{kind}{f}_{i}_a", f"{kind}{f}_{i}_b", kind == "s") for f in range(1, n_folds + 1) for kind in "sd" for i in range(per_kind)]


def _vectors(pairs: list[Pair]) -> dict[str, np.ndarray]:
    """Same-person pairs 0.2 apart, different-person pairs 1.0 apart: separable at any threshold in between."""
    vecs = {}
    for p in pairs:
        vecs[p.a] = np.zeros(2)
        vecs[p.b] = np.array([0.2 if p.same else 1.0, 0.0])
    return vecs


def test_separable_pairs_verify_perfectly():
    pairs = _pairs()
    assert fold_accuracy(pairs, pair_distances(pairs, _vectors(pairs))) == 1.0


@pytest.mark.parametrize("same", [True, False])
def test_a_face_that_could_not_be_embedded_is_a_miss_whatever_the_pair(same):
    pairs = _pairs()
    vecs = _vectors(pairs)
    victim = next(p for p in pairs if p.fold == 2 and p.same == same)
    del vecs[victim.b]
    dist = pair_distances(pairs, vecs)
    assert np.isnan(dist[(victim.a, victim.b)]) and pairs_missing_a_face(pairs, vecs) == 1
    # fold 2 has 10 pairs, one of them now wrong; the mean runs over 4 folds
    assert fold_accuracy(pairs, dist) == pytest.approx(1 - 0.1 / 4)


def _write_pairs_file(path: Path, folds: list[list[tuple[str, int, str, int]]]) -> None:
    """LFW's format: header "n_folds per_kind", then per fold `per_kind` same lines and `per_kind` different lines."""
    lines = [f"{len(folds)} 1"]
    for fold in folds:
        (n1, i, _, j), (a, x, b, y) = fold
        lines += [f"{n1} {i} {j}", f"{a} {x} {b} {y}"]
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture
def tiny_lfw(tmp_path: Path, sample_archive: Path) -> Path:
    """An LFW-shaped folder: generated faces as photos of four people, and one photo without a face."""
    root = tmp_path / "lfw"
    photos = sorted(sample_archive.glob("generated-*.jpg"))
    people = {"Ann": photos[:2], "Bob": photos[2:4], "Cat": photos[4:5]}
    for name, files in people.items():
        (root / "images" / name).mkdir(parents=True)
        for k, f in enumerate(files, 1):
            shutil.copy(f, root / "images" / name / f"{name}_{k:04d}.jpg")
    (root / "images" / "Dan").mkdir()
    shutil.copy(sample_archive / "broken-no-face.png", root / "images" / "Dan" / "Dan_0001.jpg")
    fold = [("Ann", 1, "", 2), ("Bob", 1, "Cat", 1)]
    with_missing = [("Bob", 1, "", 2), ("Ann", 1, "Dan", 1)]
    _write_pairs_file(root / "pairs_folds1-8.txt", [fold] * 4 + [fold, fold, fold, with_missing])
    return root


def test_select_pairs_reads_lfw_folds(tiny_lfw):
    pairs = select_pairs(tiny_lfw, (5, 6, 7, 8), None)
    assert len(pairs) == 8 and {p.fold for p in pairs} == {5, 6, 7, 8}
    assert pairs[-1] == Pair(8, "Ann/Ann_0001.jpg", "Dan/Dan_0001.jpg", False)


def test_eval_prior_on_lfw_pairs_counts_a_faceless_photo_as_a_miss(tiny_lfw, tmp_path):
    from facetier.pipelines.evaluation.prior_reconstruction import evaluate_priors

    gen, enc, _ = tiny_configs(32)
    faces = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    train_prior(faces, tmp_path / "prior", gen, enc, PriorTrainConfig(steps=1, batch_size=4), torch.device("cpu"))
    evaluation = evaluate_priors([str(tmp_path / "prior")], "unused", lfw=str(tiny_lfw))
    assert evaluation.pairs == 8 and evaluation.faces == 5  # Dan's photo has no face
    # fold 8's different pair involves Dan: a miss, so no method can score above 7/8 there
    assert evaluation.crop_lfw_accuracy <= 1 - 0.5 / 4
    assert evaluation.results[0].lfw_accuracy is not None


def test_lfw_pairs_without_any_face_are_an_input_error(tiny_lfw):
    from facetier.codec.align import FaceDetector
    from facetier.pipelines.evaluation.protocol import lfw_crops

    only_dan = [Pair(8, "Dan/Dan_0001.jpg", "Dan/Dan_0001.jpg", True)]
    with pytest.raises(InputError, match="no usable face"):
        lfw_crops(tiny_lfw, only_dan, FaceDetector())


def test_measure_reports_every_prefix_and_accounts_for_every_source(sample_archive, tiny_bundle, tmp_path):
    import json

    from facetier.io.sources import list_sources
    from facetier.pipelines.evaluation.measure import measure_folder
    from PIL import Image

    report = measure_folder(str(sample_archive), weights=str(tiny_bundle), gallery=str(tmp_path / "g.png"), report_path=str(tmp_path / "m.json"))
    assert report.faces + report.skipped == len(list_sources(str(sample_archive)))
    assert report.faces >= 5 and report.skipped >= 4  # the generated photos code; the broken files do not
    assert [p.prefix for p in report.prefixes] == ["basic", "middle", "enhanced", "preview", "detail", "residual"]
    cumulative = [p.bytes_mean for p in report.prefixes]
    assert cumulative == sorted(cumulative) and cumulative[0] > 0
    assert report.prefixes[-1].psnr_db > report.prefixes[0].psnr_db  # the residual layer restores the crop
    assert Image.open(tmp_path / "g.png").size == (7 * 32, min(16, report.faces) * 32)
    assert json.loads((tmp_path / "m.json").read_text())["faces"] == report.faces


def test_eval_semantic_renders_lfw_accuracies_and_miss_counts():
    from facetier.pipelines.evaluation.semantic_base import SemanticReport, render

    lfw = {"pairs": 2400, "base identity embedding": 0.9646, "pairs missing a face (counted wrong)": {"base identity embedding": 0, "dlib on original photos": 15},
           "dlib on original photos": 0.9796, "photos without a dlib face": 11}
    text = render(SemanticReport(lfw=lfw))
    assert "96.46%" in text and "97.96%" in text and "photos without a dlib face: 11" in text and "'dlib on original photos': 15" in text


def test_eval_lfw_reports_guards_for_every_generative_prefix(tiny_lfw, tmp_path):
    """eval-lfw on the tiny LFW: the JPEG + resize re-verification, fidelity and the gallery, per prefix."""
    from facetier.pipelines.evaluation.lfw_verification import GUARD_SUFFIX, degrade, evaluate_lfw, render

    report = evaluate_lfw(tiny_lfw, report=str(tmp_path / "r.json"), gallery=str(tmp_path / "g.png"))
    names = ("basic", "middle", "enhanced")
    assert all(f"{n}{GUARD_SUFFIX}" in report.accuracy for n in names)
    assert set(report.fidelity) == {*names, "preview", "detail", "residual"}
    assert report.fidelity["residual"]["psnr_db"] > report.fidelity["basic"]["psnr_db"]
    assert report.pairs_missing_a_face["basic" + GUARD_SUFFIX] >= 1  # Dan's photo has no face, guards included
    assert (tmp_path / "g.png").exists() and "MS-SSIM" in render(report)
    img = np.full((128, 128, 3), 128, np.uint8)
    assert degrade(img).shape == (115, 115, 3)
