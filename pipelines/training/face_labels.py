"""Offline labels measured on aligned crops with models nobody here trained (dlib, CC0).

The semantic base layer ties coordinates to attributes. Age, gender and race come from
UTKFace's labels; head pose and expression are *measured* on every training crop from dlib's
68-point landmarks, and the identity target is dlib's 128-d embedding. Definitions:

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
from facetier.codec.face_descriptor import UPSCALE, FaceDescriptor
from tqdm import tqdm

log = logging.getLogger(__name__)

MEASURED = ("yaw", "pitch", "eyes_open", "mouth_open", "smile")

# generic 3-D positions (mm) of nose tip, chin, left/right eye outer corner, left/right mouth corner
_MODEL_3D = np.array(
    [(0.0, 0.0, 0.0), (0.0, -330.0, -65.0), (-225.0, 170.0, -135.0), (225.0, 170.0, -135.0), (-150.0, -150.0, -125.0), (150.0, -150.0, -125.0)]
)
_PNP_IDX = (30, 8, 36, 45, 48, 54)


class DlibFaceModels(FaceDescriptor):
    """The face descriptor's models plus dlib's 68-point landmarks (training labels only)."""

    def __init__(self) -> None:
        super().__init__()
        self.shape68 = self.dlib.shape_predictor(str(self.models_dir / "shape_predictor_68_face_landmarks.dat"))

    def crop_labels(self, crop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(measured attributes in ``MEASURED`` order, 128-d descriptor) of one aligned crop."""
        img, rect = self.upscaled(crop)
        pts = np.array([(p.x, p.y) for p in self.shape68(img, rect).parts()], np.float64)
        return measure_landmarks(pts, UPSCALE), self.descriptor_at(img, rect)


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


def measure_crops(crops: np.ndarray, out_file: Path, chunk: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """Labels for every crop, saved in chunks so an interrupted run resumes where it stopped."""
    out_file.parent.mkdir(parents=True, exist_ok=True)
    part = out_file.with_suffix(".part.npz")
    attrs = np.full((len(crops), len(MEASURED)), np.nan, np.float32)
    embs = np.full((len(crops), 128), np.nan, np.float32)
    start = 0
    if out_file.exists():
        d = np.load(out_file)
        if len(d["attrs"]) == len(crops):
            return d["attrs"], d["embs"]
    if part.exists():
        d = np.load(part)
        if len(d["attrs"]) == len(crops):
            attrs, embs, start = d["attrs"].copy(), d["embs"].copy(), int(d["done"])
            log.info("resuming face labels at %d of %d", start, len(crops))
    models = DlibFaceModels()
    for i in tqdm(range(start, len(crops)), desc="measuring face labels", unit="face", initial=start, total=len(crops), mininterval=10):
        attrs[i], embs[i] = models.crop_labels(crops[i])
        if (i + 1) % chunk == 0:
            np.savez(part, attrs=attrs, embs=embs, done=i + 1)
    np.savez(out_file, attrs=attrs, embs=embs)
    part.unlink(missing_ok=True)
    return attrs, embs
