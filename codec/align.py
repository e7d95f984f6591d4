"""Face detection and FFHQ-style alignment from five landmarks.

Detection uses YuNet (the 300 KB Apache-2.0 ONNX file ships in ``codec/assets``; run through ONNX
Runtime with OpenCV ``FaceDetectorYN``'s decoding, see :mod:`facetier.codec.yunet`), which returns a
box and the five standard landmarks (eye centres, nose tip, mouth corners) in a few milliseconds
on a CPU. Alignment follows the FFHQ recipe (a square
quad from the eye and mouth midpoints) and keeps the similarity transform, so a decoded crop
can be pasted back into the original frame with :func:`paste_back`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import cv2
import numpy as np

from facetier.codec.yunet import YuNet, YuNetSettings
from facetier.errors import FaceTooSmallError, NoFaceError

log = logging.getLogger(__name__)

_YUNET_FILE = "yunet_n_320_320.onnx"
# Longest side the detector sees; bigger photos are shrunk for detection only.
_DETECT_MAX_SIDE = 1024


@dataclass(frozen=True)
class Detection:
    """One detected face in source-image pixel coordinates."""

    box: tuple[float, float, float, float]  # x, y, width, height
    landmarks: np.ndarray = field(repr=False)  # (5, 2): eye (image left), eye (image right), nose, mouth left, mouth right
    score: float

    @property
    def eye_distance(self) -> float:
        return float(np.hypot(*(self.landmarks[1] - self.landmarks[0])))


@dataclass(frozen=True)
class AlignedFace:
    """A square face crop and how it maps back to the photo it came from."""

    crop: np.ndarray = field(repr=False)  # (S, S, 3) uint8 RGB
    face_index: int
    detection: Detection
    transform: np.ndarray = field(repr=False)  # (2, 3) affine: source pixel -> crop pixel
    source_size: tuple[int, int]  # width, height

    @property
    def size(self) -> int:
        return int(self.crop.shape[0])


@dataclass(frozen=True)
class AlignmentConfig:
    size: int = 128
    crop_scale: float = 1.0  # 1.0 is FFHQ's framing; smaller zooms in on the face
    min_eye_distance: float = 10.0
    score_threshold: float = 0.6
    nms_threshold: float = 0.3
    max_faces: int = 16


class FaceDetector:
    """YuNet face detector; one instance may be shared by threads."""

    def __init__(self, config: AlignmentConfig | None = None, model_path: str | Path | None = None) -> None:
        self.config = config or AlignmentConfig()
        if model_path is None:
            model_path = resources.files("facetier.codec").joinpath("assets", _YUNET_FILE)
        self._yunet = YuNet(str(model_path), YuNetSettings(self.config.score_threshold, self.config.nms_threshold))

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        """All faces in an RGB uint8 image, largest first.

        One pass on the photo as it is; a second on the photo with a black margin of a quarter of
        its side when the first finds no face, a face touching the frame or one too small to use
        (on LFW, a face whose landmarks collapsed), and then the second's answer is kept. Tightly
        cropped faces (the face fills the frame) are missed without the margin, and without it the
        detector also takes slivers of people cut by the frame for faces; but the padded pass sees
        2.25x the pixels: paying it only where it may matter halves detection on ordinary photos."""
        h, w = rgb.shape[:2]
        scale = min(1.0, _DETECT_MAX_SIDE / max(h, w))
        img = rgb if scale == 1.0 else cv2.resize(rgb, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
        bgr = np.ascontiguousarray(img[:, :, ::-1])
        found = self._pass(bgr, 0)
        small = self.config.min_eye_distance * scale
        if not found or any(_touches_frame(d.box, bgr.shape) or d.eye_distance < small for d in found):
            found = self._pass(bgr, max(bgr.shape[:2]) // 4)
        if scale != 1.0:
            found = [Detection(box=tuple(v / scale for v in d.box), landmarks=d.landmarks / scale, score=d.score) for d in found]
        found.sort(key=lambda d: (-d.box[2] * d.box[3], d.box[0], d.box[1]))
        return found[: self.config.max_faces]

    def _pass(self, bgr: np.ndarray, pad: int) -> list[Detection]:
        """YuNet's faces in ``bgr`` with a black margin of ``pad`` pixels around it, in ``bgr``'s coordinates."""
        if pad:
            bgr = cv2.copyMakeBorder(bgr, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=(0, 0, 0))
        rows = [np.asarray(row, dtype=np.float64) for row in self._yunet.detect(bgr)]
        return [Detection(box=(float(r[0] - pad), float(r[1] - pad), float(r[2]), float(r[3])), landmarks=r[4:14].reshape(5, 2) - pad,
                          score=float(r[14])) for r in rows]


def _touches_frame(box: tuple[float, float, float, float], shape: tuple[int, ...], margin: float = 1.0) -> bool:
    x, y, w, h = box
    return bool(x < margin or y < margin or x + w > shape[1] - margin or y + h > shape[0] - margin)


def ffhq_quad(landmarks: np.ndarray, crop_scale: float = 1.0) -> np.ndarray:
    """FFHQ's oriented square (4 corners: top-left, bottom-left, bottom-right, top-right)."""
    eye_l, eye_r, _nose, mouth_l, mouth_r = landmarks.astype(np.float64)
    eye_avg = (eye_l + eye_r) / 2
    eye_to_eye = eye_r - eye_l
    eye_to_mouth = (mouth_l + mouth_r) / 2 - eye_avg
    x = eye_to_eye - np.flipud(eye_to_mouth) * [-1, 1]
    x /= np.hypot(*x)
    x *= max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8) * crop_scale
    y = np.flipud(x) * [-1, 1]
    c = eye_avg + eye_to_mouth * 0.1
    return np.stack([c - x - y, c - x + y, c + x + y, c + x - y])


def alignment_transform(landmarks: np.ndarray, size: int, crop_scale: float = 1.0) -> np.ndarray:
    """The 2x3 similarity transform taking source pixels to the aligned crop."""
    quad = ffhq_quad(landmarks, crop_scale)
    dst = np.array([[0, 0], [0, size], [size, size]], dtype=np.float32)
    return cv2.getAffineTransform(quad[:3].astype(np.float32), dst).astype(np.float64)


def warp_face(rgb: np.ndarray, transform: np.ndarray, size: int) -> np.ndarray:
    """Resample the crop; large shrink factors are pre-filtered to avoid aliasing."""
    scale = float(np.sqrt(abs(np.linalg.det(transform[:, :2]))))
    m = transform.copy()
    img = rgb
    if scale < 0.5:
        shrink = max(1, int(np.floor(1 / (2 * scale))))
        img = cv2.resize(rgb, (max(1, rgb.shape[1] // shrink), max(1, rgb.shape[0] // shrink)), interpolation=cv2.INTER_AREA)
        m[:, :2] *= shrink
    return cv2.warpAffine(img, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def align_faces(rgb: np.ndarray, detector: FaceDetector) -> list[AlignedFace]:
    """Detect and align every usable face; raises a typed error when there is none."""
    cfg = detector.config
    detections = detector.detect(rgb)
    if not detections:
        raise NoFaceError("no face detected")
    usable = [d for d in detections if d.eye_distance >= cfg.min_eye_distance]
    if not usable:
        biggest = max(d.eye_distance for d in detections)
        raise FaceTooSmallError(f"largest face has eye distance {biggest:.1f}px < {cfg.min_eye_distance}px")
    h, w = rgb.shape[:2]
    faces = []
    for i, det in enumerate(usable):
        m = alignment_transform(det.landmarks, cfg.size, cfg.crop_scale)
        faces.append(AlignedFace(crop=warp_face(rgb, m, cfg.size), face_index=i, detection=det, transform=m, source_size=(w, h)))
    return faces


def paste_back(photo: np.ndarray, crop: np.ndarray, transform: np.ndarray, feather: float = 0.08) -> np.ndarray:
    """Blend a (decoded) crop back into the photo it was aligned from."""
    h, w = photo.shape[:2]
    size = crop.shape[0]
    inv = cv2.invertAffineTransform(transform)
    warped = cv2.warpAffine(crop, inv, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    mask = np.zeros((size, size), np.float32)
    margin = max(1, int(size * feather))
    mask[margin:-margin, margin:-margin] = 1.0
    mask = cv2.GaussianBlur(mask, (0, 0), margin / 2)
    mask_src = cv2.warpAffine(mask, inv, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)[..., None]
    out = photo.astype(np.float32) * (1 - mask_src) + warped.astype(np.float32) * mask_src
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)
