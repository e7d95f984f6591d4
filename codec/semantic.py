"""The compact semantic base layer: a few dozen numbers whose coordinates are attributes.

After "A Compact and Semantic Latent Space for Disentangled and Controllable Image Editing":
W+ is projected on its principal components, and an MLP autoencoder maps those (with, where the
model says so, a CNN view of the crop and dlib's face descriptor of it) to a compact
code in which chosen coordinates are tied to attributes (age in years, gender and race logits,
head pose in degrees, expression scores) and the coordinates are decorrelated. The code, in
units of its quantisation step, is facetier's ``basic`` layer; middle and enhanced code what it
leaves out of W+. Everything a query needs is an affine function (or a softmax) of the integer
symbols, so analytics columns are computed once at encode time and edits move one coordinate.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from facetier.codec.face_descriptor import DESCRIPTOR_DIM, DESCRIPTOR_IDS, FaceDescriptor
from torch import nn

from facetier.errors import ConfigError

IDENTITY_DIM = 128
RACE_LABELS = ("white", "black", "asian", "indian", "other")  # UTKFace's race classes
EXPRESSION_NOTE = "0 = 5th, 1 = 95th percentile of the training faces"


@dataclass(frozen=True)
class AttributeSpec:
    """One attribute and the code coordinates that hold it.

    ``value``: attribute = offset + scale * code[c];
    ``probability``: P(labels[1]) = sigmoid(scale * code[c]);
    ``category``: P(labels) = softmax(scale * code[coords]).
    """

    name: str
    kind: str
    coords: tuple[int, ...]
    scale: float
    offset: float = 0.0
    labels: tuple[str, ...] = ()
    unit: str = ""


def default_attributes() -> tuple[AttributeSpec, ...]:
    return (
        AttributeSpec("age", "value", (0,), 1.0, 35.0, unit="years"),
        AttributeSpec("gender", "probability", (1,), 0.5, labels=("male", "female")),
        AttributeSpec("race", "category", (2, 3, 4, 5, 6), 0.5, labels=RACE_LABELS),
        AttributeSpec("yaw", "value", (7,), 2.0, unit="degrees"),
        AttributeSpec("pitch", "value", (8,), 2.0, unit="degrees"),
        AttributeSpec("eyes_open", "value", (9,), 0.1, unit=EXPRESSION_NOTE),
        AttributeSpec("mouth_open", "value", (10,), 0.1, unit=EXPRESSION_NOTE),
        AttributeSpec("smile", "value", (11,), 0.1, unit=EXPRESSION_NOTE),
    )


@dataclass(frozen=True)
class SemanticConfig:
    code_dim: int = 60
    pca_dim: int = 256
    hidden: int = 512
    identity_dim: int = IDENTITY_DIM
    attributes: tuple[AttributeSpec, ...] = default_attributes()
    image_size: int = 0  # > 0: the code also reads the aligned crop at this size through a small CNN
    image_features: int = 256
    descriptor: str = ""  # one of DESCRIPTOR_IDS: the code also reads dlib's identity descriptor of the crop

    def __post_init__(self) -> None:
        used = [c for a in self.attributes for c in a.coords]
        if len(used) != len(set(used)) or any(c < 0 or c >= self.code_dim for c in used):
            raise ConfigError(f"attribute coordinates {used} overlap or fall outside a {self.code_dim}-d code")
        if self.descriptor not in ("", *DESCRIPTOR_IDS):
            raise ConfigError(f"unknown face descriptor {self.descriptor!r}; this facetier knows {', '.join(DESCRIPTOR_IDS)}")

    def attribute(self, name: str) -> AttributeSpec:
        for a in self.attributes:
            if a.name == name:
                return a
        raise ConfigError(f"unknown attribute {name!r}; this model has {[a.name for a in self.attributes]}")

    def to_json(self) -> dict:
        return {
            "code_dim": self.code_dim, "pca_dim": self.pca_dim, "hidden": self.hidden, "identity_dim": self.identity_dim,
            "image_size": self.image_size, "image_features": self.image_features, "descriptor": self.descriptor,
            "attributes": [{"name": a.name, "kind": a.kind, "coords": list(a.coords), "scale": a.scale, "offset": a.offset,
                            "labels": list(a.labels), "unit": a.unit} for a in self.attributes],
        }

    @staticmethod
    def from_json(d: dict) -> SemanticConfig:
        attrs = tuple(AttributeSpec(a["name"], a["kind"], tuple(a["coords"]), float(a["scale"]), float(a["offset"]), tuple(a["labels"]), a.get("unit", ""))
                      for a in d["attributes"])
        return SemanticConfig(int(d["code_dim"]), int(d["pca_dim"]), int(d["hidden"]), int(d["identity_dim"]), attrs,
                              int(d.get("image_size", 0)), int(d.get("image_features", 256)), str(d.get("descriptor", "")))


def _mlp(i: int, h: int, o: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(i, h), nn.LeakyReLU(0.2), nn.Linear(h, h), nn.LeakyReLU(0.2), nn.Linear(h, o))


def _image_branch(size: int, features: int) -> nn.Sequential:
    """Four stride-2 convolutions: a few million multiply-adds a face at 64 px."""
    layers: list[nn.Module] = []
    ch = [3, 32, 64, 128, 128]
    for i in range(4):
        layers += [nn.Conv2d(ch[i], ch[i + 1], 3, stride=2, padding=1), nn.LeakyReLU(0.2)]
    # dropout: the branch sees 15k training faces and overfits them without it
    layers += [nn.Flatten(), nn.Linear(ch[-1] * (size // 16) ** 2, features), nn.LeakyReLU(0.2), nn.Dropout(0.3)]
    return nn.Sequential(*layers)


def crops_to_tensor(crops: np.ndarray, size: int) -> torch.Tensor:
    """(n, S, S, 3) uint8 -> (n, 3, size, size) float in [-1, 1], area-downsampled."""
    x = torch.from_numpy(np.require(crops, np.uint8, ['C', 'W'])).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    return nn.functional.interpolate(x, size=size, mode="area") if x.shape[-1] != size else x


def principal_axes(centred: torch.Tensor, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(d, >= k) orthonormal axes of the data, by variance, and their standard deviations.

    Fewer faces than latents (a user fitting an imported prior on a small set) leave fewer
    principal axes than ``k``: orthonormal directions the data does not span complete the basis,
    with the smallest seen deviation, so the layer keeps its size and its code its meaning.
    """
    _u, s, vh = torch.linalg.svd(centred, full_matrices=False)
    basis, std = vh.T, s / math.sqrt(max(1, len(centred) - 1))
    missing = min(k, centred.shape[1]) - basis.shape[1]
    if missing > 0:
        rand = torch.randn(centred.shape[1], missing, generator=torch.Generator().manual_seed(seed), dtype=basis.dtype)
        rand = rand - basis @ (basis.T @ rand)
        extra, _ = torch.linalg.qr(rand)
        basis = torch.cat([basis, extra], 1)
        floor = std[std > 0].min() if bool((std > 0).any()) else torch.tensor(1.0)
        std = torch.cat([std, floor.expand(missing)])
    return basis.contiguous(), std



class SemanticNet(nn.Module):
    """PCA of W+ (optionally a CNN view of the crop and the face descriptor) -> MLP -> code; code -> W+; code -> identity."""

    def __init__(self, cfg: SemanticConfig, wplus_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.register_buffer("pca_mean", torch.zeros(wplus_dim))
        self.register_buffer("pca_basis", torch.zeros(wplus_dim, cfg.pca_dim))
        self.register_buffer("pca_std", torch.ones(cfg.pca_dim))
        extra = (cfg.image_features if cfg.image_size else 0) + (DESCRIPTOR_DIM if cfg.descriptor else 0)
        if cfg.descriptor:
            self.register_buffer("desc_mean", torch.zeros(DESCRIPTOR_DIM))
            self.register_buffer("desc_std", torch.ones(DESCRIPTOR_DIM))
        self.image = _image_branch(cfg.image_size, cfg.image_features) if cfg.image_size else None
        self.enc = _mlp(cfg.pca_dim + extra, cfg.hidden, cfg.code_dim)
        self.dec = _mlp(cfg.code_dim, cfg.hidden, cfg.pca_dim)
        self.ident = nn.Sequential(nn.Linear(cfg.code_dim, cfg.hidden), nn.LeakyReLU(0.2), nn.Linear(cfg.hidden, cfg.identity_dim))

    def fit_pca(self, flat: torch.Tensor) -> None:
        mean = flat.mean(0)
        basis, std = principal_axes(flat - mean, self.cfg.pca_dim, seed=0)
        self.pca_mean.copy_(mean)
        self.pca_basis.copy_(basis[:, : self.cfg.pca_dim])
        self.pca_std.copy_(std[: self.cfg.pca_dim].clamp_min(1e-6))

    def fit_descriptor(self, desc: torch.Tensor) -> None:
        """Standardise the descriptor input with the training faces' mean and spread."""
        self.desc_mean.copy_(desc.mean(0))
        self.desc_std.copy_(desc.std(0).clamp_min(1e-6))

    def encode(self, flat: torch.Tensor, images: torch.Tensor | None = None, descriptors: torch.Tensor | None = None) -> torch.Tensor:
        x = ((flat - self.pca_mean) @ self.pca_basis) / self.pca_std
        if self.image is not None:
            if images is None:
                raise ConfigError("this semantic layer reads the aligned crop: pass the crops")
            x = torch.cat([x, self.image(images)], 1)
        if self.cfg.descriptor:
            if descriptors is None:
                raise ConfigError("this semantic layer reads the face descriptor: pass the descriptors")
            x = torch.cat([x, (descriptors - self.desc_mean) / self.desc_std], 1)
        return self.enc(x)

    def decode(self, code: torch.Tensor) -> torch.Tensor:
        return (self.dec(code) * self.pca_std) @ self.pca_basis.T + self.pca_mean

    def identity(self, code: torch.Tensor) -> torch.Tensor:
        return self.ident(code)


class SemanticCodec:
    """Runtime side: float code from W+, W+ from (integer) codes, attribute columns, edits."""

    def __init__(self, cfg: SemanticConfig, tensors: Mapping[str, torch.Tensor], wplus_shape: tuple[int, int],
                 crop_scale: float = 1.0, device: str | torch.device = "cpu") -> None:
        self.cfg = cfg
        self.crop_scale = crop_scale
        self.descriptor_device = device
        self.wplus_shape = wplus_shape
        self.net = SemanticNet(cfg, wplus_shape[0] * wplus_shape[1])
        self.net.load_state_dict({k: v.float() for k, v in tensors.items()})
        self.net.eval()
        # The dense layers (PCA projection, MLPs, identity head) run in float64 at run time. Why: in
        # float32, MKL's matrix product of a batch of W+ rows (3,072 long) split its sums by thread
        # count, so a face's code moved with the worker's threads; float64 sums differ only far below
        # the float32 inputs' precision, so the symbols they round to do not (and they cost little).
        # The crop's CNN branch stays float32 (oneDNN, thread-independent at the codec's fixed batch).
        self._dense = copy.deepcopy(self.net).double()
        self._dense.image = None
        self._descriptor: FaceDescriptor | None = None

    def descriptors(self, crops: np.ndarray) -> np.ndarray:
        """dlib descriptors of (n, S, S, 3) uint8 crops; its network loads on first use."""
        if self._descriptor is None:
            self._descriptor = FaceDescriptor(self.cfg.descriptor, self.crop_scale, self.descriptor_device)
        return self._descriptor.embed_crops(crops)

    @torch.no_grad()
    def encode(self, wplus: np.ndarray, crops: np.ndarray | None = None, descriptors: np.ndarray | None = None) -> np.ndarray:
        """Float codes (float64) of (n, rows, dim) W+; ``crops`` (n, S, S, 3) uint8 when the model reads pixels too.

        ``descriptors`` (n, 128), when given, stand for the descriptors of ``crops``.
        """
        dense = self._dense
        flat = torch.from_numpy(np.asarray(wplus, np.float32).reshape(len(wplus), -1).astype(np.float64))
        parts = [((flat - dense.pca_mean) @ dense.pca_basis) / dense.pca_std]
        if self.net.image is not None:
            if crops is None:
                raise ConfigError("this semantic layer reads the aligned crop: pass the crops")
            parts.append(self.net.image(crops_to_tensor(crops, self.cfg.image_size)).double())
        if self.cfg.descriptor:
            if descriptors is None and crops is None:
                raise ConfigError("this semantic layer reads the face descriptor: pass the descriptors")
            desc = np.asarray(descriptors if descriptors is not None else self.descriptors(crops), np.float32)
            parts.append((torch.from_numpy(desc.reshape(len(flat), -1).astype(np.float64)) - dense.desc_mean) / dense.desc_std)
        return dense.enc(torch.cat(parts, 1)).numpy()

    @torch.no_grad()
    def decode(self, code: np.ndarray) -> np.ndarray:
        flat = self._dense.decode(torch.from_numpy(np.asarray(code, np.float64).reshape(-1, self.cfg.code_dim)))
        return flat.numpy().astype(np.float32).reshape(-1, *self.wplus_shape)

    @torch.no_grad()
    def identity(self, code: np.ndarray) -> np.ndarray:
        return self._dense.identity(torch.from_numpy(np.asarray(code, np.float64).reshape(-1, self.cfg.code_dim))).numpy().astype(np.float32)

    def attributes(self, code: np.ndarray) -> dict[str, np.ndarray]:
        """Analytics columns (name -> one value per face) read from the code."""
        code = np.asarray(code, np.float64).reshape(-1, self.cfg.code_dim)
        out: dict[str, np.ndarray] = {}
        for a in self.cfg.attributes:
            c = code[:, list(a.coords)] * a.scale
            if a.kind == "value":
                out[a.name] = (a.offset + c[:, 0]).astype(np.float32)
            elif a.kind == "probability":
                p = 1.0 / (1.0 + np.exp(-c[:, 0]))
                out[f"p_{a.labels[1]}"] = p.astype(np.float32)
                out[a.name] = np.where(p >= 0.5, a.labels[1], a.labels[0]).astype(object)
            else:
                e = np.exp(c - c.max(1, keepdims=True))
                p = e / e.sum(1, keepdims=True)
                out[a.name] = np.asarray(a.labels, dtype=object)[p.argmax(1)]
                out[f"{a.name}_confidence"] = p.max(1).astype(np.float32)
        return out

    def edit(self, code: np.ndarray, edits: Mapping[str, str]) -> np.ndarray:
        """Move attribute coordinates. ``"+10"``/``"-5"`` are relative, numbers absolute, labels pick a class."""
        code = np.array(code, np.float64).reshape(-1, self.cfg.code_dim)
        for name, raw in edits.items():
            a = self.cfg.attribute(name)
            text = str(raw).strip()
            relative = text[:1] in "+-" and len(text) > 1
            if a.kind == "value":
                c = a.coords[0]
                v = _number(name, text)
                code[:, c] = code[:, c] + v / a.scale if relative else (v - a.offset) / a.scale
            elif a.kind == "probability":
                c = a.coords[0]
                if text in a.labels:
                    p = 0.97 if text == a.labels[1] else 0.03
                else:
                    p = _number(name, text)
                    if relative or not 0.0 < p < 1.0:
                        raise ConfigError(f"{name}: give {a.labels[0]!r}, {a.labels[1]!r} or a probability of {a.labels[1]!r} in (0, 1)")
                code[:, c] = math.log(p / (1 - p)) / a.scale
            else:
                if text not in a.labels:
                    raise ConfigError(f"{name}: give one of {a.labels}")
                k = a.coords[a.labels.index(text)]
                others = [c for c in a.coords if c != k]
                # the chosen class ends 3.5 logits (about 97 %) above the best other class
                code[:, k] = code[:, others].max(1) + 3.5 / a.scale
        return code


def _number(name: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{name}: {text!r} is not a number") from None
    if not math.isfinite(value):  # a NaN or infinite coordinate decodes to a colour blob, not a face
        raise ConfigError(f"{name}: {text!r} is not a finite number")
    return value


def require_finite_edits(edits: Mapping[str, str]) -> None:
    """A NaN or infinite edit value is an error before any face is selected or decoded."""
    for name, text in edits.items():
        try:
            float(str(text).strip())
        except ValueError:
            continue  # a label (``gender=female``); checked against the attribute when applied
        _number(name, str(text).strip())


def parse_edits(items: list[str]) -> dict[str, str]:
    """``["age=+10", "smile=1.0"]`` -> ``{"age": "+10", "smile": "1.0"}``."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise ConfigError(f"bad edit {item!r}; write NAME=VALUE, NAME=+DELTA or NAME=-DELTA")
        out[name.strip()] = value.strip()
    require_finite_edits(out)
    return out
