"""YuNet through ONNX Runtime against OpenCV's FaceDetectorYN, which runs the same file: the same
faces, boxes and landmarks within float rounding, at any image size (no multiple of 32 needed)."""
from __future__ import annotations

from importlib import resources

import cv2
import numpy as np
import pytest
from facetier.codec.yunet import YuNet, YuNetSettings

MODEL = str(resources.files("facetier.codec").joinpath("assets", "yunet_n_320_320.onnx"))


def _opencv_rows(bgr: np.ndarray, settings: YuNetSettings) -> np.ndarray:
    det = cv2.FaceDetectorYN.create(MODEL, "", (bgr.shape[1], bgr.shape[0]), settings.score_threshold, settings.nms_threshold, settings.top_k)
    _, faces = det.detect(bgr)
    return np.zeros((0, 15), np.float32) if faces is None else faces


def _scene(faces: np.ndarray, height: int, width: int, seed: int) -> np.ndarray:
    """Faces of different sizes on a textured background, BGR."""
    rng = np.random.default_rng(seed)
    canvas = cv2.GaussianBlur(rng.integers(0, 255, (height, width, 3), dtype=np.uint8), (0, 0), 3)
    x = 4
    for i, face in enumerate(faces):
        side = [96, 64, 128][i % 3]
        if x + side > width:
            break
        y = int(rng.integers(0, height - side))
        canvas[y : y + side, x : x + side] = cv2.resize(face, (side, side))[:, :, ::-1]
        x += side + 10
    return canvas


@pytest.mark.parametrize(("height", "width"), [(250, 250), (190, 333), (300, 420), (97, 131)])
def test_matches_opencv_face_detector(generated_faces, height, width):
    settings = YuNetSettings()
    yunet = YuNet(MODEL, settings)
    found = 0
    for seed in range(3):
        bgr = _scene(generated_faces[seed * 3 : seed * 3 + 3], height, width, seed)
        ours, theirs = yunet.detect(bgr), _opencv_rows(bgr, settings)
        assert ours.shape == theirs.shape
        assert np.abs(ours - theirs).max(initial=0) < 1e-3
        found += len(ours)
    assert found > 0, "the scenes must hold faces the detector finds, or the comparison proves nothing"


def test_thresholds_are_the_settings(generated_faces):
    bgr = _scene(generated_faces[:3], 200, 360, 7)
    strict_settings = YuNetSettings(score_threshold=0.95)
    strict, everyone = YuNet(MODEL, strict_settings).detect(bgr), YuNet(MODEL).detect(bgr)
    assert len(strict) <= len(everyone) and (strict[:, 14] >= 0.95).all()
    theirs = _opencv_rows(bgr, strict_settings)
    assert strict.shape == theirs.shape and np.abs(strict - theirs).max(initial=0) < 1e-3


def test_a_blank_image_has_no_faces():
    assert YuNet(MODEL).detect(np.zeros((64, 80, 3), np.uint8)).shape == (0, 15)
