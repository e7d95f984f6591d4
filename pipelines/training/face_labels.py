"""Offline labels measured on aligned crops with models nobody here trained (dlib, CC0).

The semantic base layer ties coordinates to attributes. Age, gender and race come from
UTKFace's labels; head pose and expression are *measured* on every training crop from dlib's
68-point landmarks (dlib's HOG detector re-finds the face on a 256 px upscale of the crop for
them), and the identity target is dlib's 128-d descriptor of the crop. Definitions:

* ``yaw``, ``pitch`` - degrees, from ``cv2.solvePnP`` of six landmarks against a generic 3-D face.
  Roll is not an attribute: alignment removes it from the crop, so no code of the crop holds it.
* ``eyes_open`` - mean eye aspect ratio (lid gap / eye width) of both eyes.
* ``mouth_open`` - inner-lip gap / eye-centre distance.
* ``smile`` - height of the mouth corners above the inner-lip midpoint / eye-centre distance
  (positive when the corners are lifted).

Landmark model licence: the 68-point predictor's training data (iBUG 300-W) excludes
commercial use; labels measured with it are used only to train, and the model card says so.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from facetier.codec.face_descriptor import DETECTED_CHIP_ID, UPSCALE, FaceDescriptor
from tqdm import tqdm

log = logging.getLogger(__name__)

MEASURED = ("yaw", "pitch", "eyes_open", "mouth_open", "smile")

# generic 3-D positions (mm) of nose tip, chin, left/right eye outer corner, left/right mouth corner
_MODEL_3D = np.array(
    [(0.0, 0.0, 0.0), (0.0, -330.0, -65.0), (-225.0, 170.0, -135.0), (225.0, 170.0, -135.0), (-150.0, -150.0, -125.0), (150.0, -150.0, -125.0)]
)
_PNP_IDX = (30, 8, 36, 45, 48, 54)


class LandmarkLabeller:
    """dlib's HOG detector and 68-point landmarks on an upscaled crop (training labels only)."""

    def __init__(self) -> None:
        from facetier.codec.face_descriptor import dlib_models

        self.finder = FaceDescriptor(DETECTED_CHIP_ID)
        dlib, models = dlib_models()
        self.shape68 = dlib.shape_predictor(str(models / "shape_predictor_68_face_landmarks.dat"))

    def crop_labels(self, crop: np.ndarray) -> np.ndarray:
        """Measured attributes of one aligned crop, in ``MEASURED`` order."""
        img, rect = self.finder.upscaled(crop)
        pts = np.array([(p.x, p.y) for p in self.shape68(img, rect).parts()], np.float64)
        return measure_landmarks(pts, UPSCALE)


def measure_landmarks(pts: np.ndarray, size: int) -> np.ndarray:
    """Pose and expression from 68 dlib landmarks (pixel coordinates in a ``size`` image)."""
    import cv2

    cam = np.array([[size, 0, size / 2], [0, size, size / 2], [0, 0, 1]], np.float64)
    ok, rvec, _ = cv2.solvePnP(_MODEL_3D, pts[list(_PNP_IDX)], cam, np.zeros(4), flags=cv2.SOLVEPNP_ITERATIVE)
    rot, _ = cv2.Rodrigues(rvec)
    pitch = np.degrees(np.arctan2(rot[2, 1], rot[2, 2]))
    pitch = (pitch + 180.0) % 360.0 - 180.0
    pitch = pitch - 180.0 if pitch > 90 else (pitch + 180.0 if pitch < -90 else pitch)
    yaw = np.degrees(np.arcsin(np.clip(-rot[2, 0], -1, 1)))

    def ear(e: np.ndarray) -> float:
        return float((np.linalg.norm(e[1] - e[5]) + np.linalg.norm(e[2] - e[4])) / (2 * np.linalg.norm(e[0] - e[3]) + 1e-6))

    left, right = pts[36:42], pts[42:48]
    iod = float(np.linalg.norm(left.mean(0) - right.mean(0))) + 1e-6
    eyes = (ear(left) + ear(right)) / 2
    mouth_open = float(np.linalg.norm(pts[62] - pts[66])) / iod
    lip_mid_y = (pts[62, 1] + pts[66, 1]) / 2
    smile = float(lip_mid_y - (pts[48, 1] + pts[54, 1]) / 2) / iod
    return np.array([yaw if ok else 0.0, pitch if ok else 0.0, eyes, mouth_open, smile], np.float32)


def measure_crops(crops: np.ndarray, out_file: Path, chunk: int = 500) -> np.ndarray:
    """Landmark labels for every crop, saved in chunks so an interrupted run resumes where it stopped."""
    out_file.parent.mkdir(parents=True, exist_ok=True)
    part = out_file.with_suffix(".part.npz")
    attrs = np.full((len(crops), len(MEASURED)), np.nan, np.float32)
    start = 0
    if out_file.exists():
        d = np.load(out_file)
        if len(d["attrs"]) == len(crops):
            return d["attrs"]
    if part.exists():
        d = np.load(part)
        if len(d["attrs"]) == len(crops):
            attrs, start = d["attrs"].copy(), int(d["done"])
            log.info("resuming face labels at %d of %d", start, len(crops))
    labeller = LandmarkLabeller()
    for i in tqdm(range(start, len(crops)), desc="measuring face labels", unit="face", initial=start, total=len(crops), mininterval=10):
        attrs[i] = labeller.crop_labels(crops[i])
        if (i + 1) % chunk == 0:
            np.savez(part, attrs=attrs, done=i + 1)
    np.savez(out_file, attrs=attrs)
    part.unlink(missing_ok=True)
    return attrs


def crop_descriptors(crops: np.ndarray, method: str, crop_scale: float, out_file: Path, device: str = "cpu") -> np.ndarray:
    """dlib descriptors of every crop by ``method`` (cached: the detected-chip method takes minutes)."""
    if out_file.exists():
        cached = np.load(out_file)
        if len(cached) == len(crops):
            return cached
    desc = FaceDescriptor(method, crop_scale, device)
    step = 256
    out = np.concatenate([desc.embed_crops(crops[i:i + step])
                          for i in tqdm(range(0, len(crops), step), desc=f"dlib descriptors ({method})", unit="batch", mininterval=10)])
    np.save(out_file, out)
    return out
