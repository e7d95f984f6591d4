"""``FaceCodec``: the Python API the pipelines use (image bytes in, layered codes out, and back)."""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from facetier.codec import human_layers, image_layers
from facetier.codec.align import AlignedFace, FaceDetector, align_faces
from facetier.codec.checkpoints import ModelBundle, load_bundle
from facetier.codec.entropy import FrozenLayerModel, LayerEntropyCoder
from facetier.codec.face_descriptor import DESCRIPTOR_DIM
from facetier.codec.human_layers import HumanLayerPlan
from facetier.codec.layers import (
    HUMAN_LAYERS,
    ORIGINAL,
    SEMANTIC,
    LayerCode,
    LayeredCode,
    all_layer_names,
)
from facetier.codec.prior import TRAIN_AN_ENCODER, StylePrior
from facetier.codec.semantic import SemanticCodec
from facetier.codec.stage_times import StageTimes

from facetier.errors import (
    ConfigError,
    MissingLayerError,
    ModelError,
    ModelMismatchError,
)

log = logging.getLogger(__name__)

EMBEDDED_WEIGHTS = "facetier-prior-128.safetensors"


def embedded_weights_path() -> Path:
    return Path(str(resources.files("facetier.codec").joinpath("assets", EMBEDDED_WEIGHTS)))


@dataclass(frozen=True)
class EncodedFace:
    face: AlignedFace
    code: LayeredCode


@dataclass(frozen=True)
class DecodedFace:
    image: np.ndarray = field(repr=False)  # (S, S, 3) uint8 RGB
    layers_used: tuple[str, ...]
    generated: bool  # True unless the pixels are the source's own (never evidence when True)


MICRO_BATCH = {"cpu": 16, "cuda": 128}
"""Rows of every network call that decides stored bytes or decoded pixels, per device kind, whatever
the job's batch size (other device kinds take the CUDA figure).

Why: PyTorch's CPU kernels (oneDNN convolutions, MKL matrix products) pick their algorithm, and so
their float rounding, by the shape of a call and the number of threads; a face coded in a batch of
4 came out a pixel level away from the same face in a batch of 16, and the residual's bytes moved.
At one fixed shape a face's outputs do not depend on its batch-mates, its place in the batch, or
the thread count (measured on an AVX-512 Xeon: 1-16 threads, random mates and places; the dense
layers that did depend on the thread count run in float64, see ``SemanticCodec``), so a table's
bytes do not depend on how a job was cut. One shape also keeps peak memory set by this number:
every new shape leaves oneDNN buffers of another size in glibc's heap. A GPU gets a larger shape
because it needs one to be busy; its bytes differ from a CPU's by float rounding anyway.
"""


def micro_batch(device: torch.device) -> int:
    return MICRO_BATCH.get(device.type, MICRO_BATCH["cuda"])


def in_fixed_batches(fn: Callable[..., np.ndarray], rows: int, *arrays: np.ndarray | None) -> np.ndarray:
    """``fn(*arrays)`` run on batches of exactly ``rows`` rows, the last one padded by repeating its
    final row and the padding's outputs dropped."""
    n = len(next(a for a in arrays if a is not None))
    if n in (0, rows):
        return fn(*arrays)
    outs = []
    for start in range(0, n, rows):
        part = [None if a is None else a[start:start + rows] for a in arrays]
        real = min(rows, n - start)
        padded = [None if p is None else np.concatenate([p, np.repeat(p[-1:], rows - real, 0)]) for p in part]
        outs.append(np.asarray(fn(*padded))[:real])
    return np.concatenate(outs)


def frozen_layers_from_bundle(bundle: ModelBundle) -> tuple[list[FrozenLayerModel], np.ndarray]:
    models = []
    for spec in bundle.config.plan.layers:
        t = bundle.prefixed(f"entropy.{spec.name}.")
        if spec.kind == SEMANTIC:  # the transform is the semantic network, not a matrix pair
            k = spec.latent_dim
            t |= {"mu": torch.zeros(0), "analysis": torch.zeros(0, k), "synthesis": torch.zeros(k, 0)}
        f32 = {k: t[k].numpy().astype(np.float32) for k in ("mu", "analysis", "synthesis")}
        i64 = {k: t[k].numpy().astype(np.int64) for k in ("w1", "b1", "wm", "bm", "ws", "bs")}
        models.append(FrozenLayerModel(spec.name, spec.rows, **f32, **i64))
    return models, bundle.tensors["entropy_tables"].numpy().astype(np.int64)


class FaceCodec:
    """Align, encode to nested layers, and decode any prefix of them."""

    def __init__(self, bundle: ModelBundle, device: str = "auto") -> None:
        cfg = bundle.config
        self.config = cfg
        self.bundle = bundle
        self.weights_hash = bundle.weights_hash
        self.codec_id = cfg.codec_id
        self.plan = cfg.plan
        self.prior = StylePrior(bundle, device)
        if self.prior.encoder is None:
            raise ModelError(f"{cfg.codec_id} ({bundle.weights_hash[:12]}) is a generator without an encoder, so it cannot code faces: {TRAIN_AN_ENCODER}")
        if not bundle.has_entropy_models:
            raise ModelError(
                f"{cfg.codec_id} ({bundle.weights_hash[:12]}) is an imported prior without fitted layers, so it cannot code faces yet: "
                "run `facetier train entropy --from-bundle BUNDLE --out CODEC_BUNDLE` (README: 'Bring your own prior')"
            )
        self.device = self.prior.device
        self.micro_batch = micro_batch(self.device)
        self.latent_avg = self.prior.latent_avg
        self.semantic: SemanticCodec | None = None
        if cfg.plan.is_semantic:
            if cfg.semantic is None:
                raise ModelError("the layer plan has a semantic base layer but the bundle has no semantic configuration")
            self.semantic = SemanticCodec(cfg.semantic, bundle.prefixed("semantic."), (cfg.generator.n_latent, cfg.generator.style_dim),
                                          crop_scale=cfg.alignment.crop_scale, device=self.device)
        models, tables = frozen_layers_from_bundle(bundle)
        self.coders = [LayerEntropyCoder(m, tables) for m in models]
        self.detector = FaceDetector(cfg.alignment)

    @classmethod
    def load(cls, path: str | Path | None = None, device: str = "auto") -> FaceCodec:
        return cls(load_bundle(Path(path) if path else embedded_weights_path()), device=device)

    @property
    def size(self) -> int:
        return self.config.generator.size

    @property
    def layer_names(self) -> tuple[str, ...]:
        return all_layer_names(self.plan)

    # --- W+ --------------------------------------------------------------------------------------
    def encode_wplus(self, crops: np.ndarray) -> np.ndarray:
        """(n, S, S, 3) uint8 crops -> (n, n_latent, style_dim) float32 W+."""
        return self.prior.encode_wplus(crops)

    def synthesise(self, wplus: np.ndarray) -> np.ndarray:
        """(n, n_latent, style_dim) W+ -> (n, S, S, 3) uint8 images."""
        return self.prior.synthesise(wplus)

    def _symbols(self, wplus: np.ndarray, crop: np.ndarray | None = None, descriptor: np.ndarray | None = None,
                 semantic_code: np.ndarray | None = None) -> list[np.ndarray]:
        """Integer symbols of every generative layer of one face's W+ (n_latent, style_dim).

        ``semantic_code``: the face's float semantic code when a batched call already computed it.
        """
        context = np.zeros(0, np.int64)
        base = np.zeros_like(wplus)  # what the layers below already explain of each row
        out = []
        for i, coder in enumerate(self.coders):
            if i == 0 and self.semantic is not None:
                if semantic_code is None:
                    semantic_code = self.semantic.encode(wplus[None], None if crop is None else crop[None],
                                                         None if descriptor is None else descriptor[None])[0]
                sym = coder.quantise(semantic_code, context)
                base = self.semantic.decode(sym)[0]
            else:
                rows = list(coder.model.rows)
                sym = coder.quantise(coder.model.analyse(wplus[rows] - base[rows]), context)
            out.append(sym)
            context = np.concatenate([context, sym])
        return out

    def wplus_from_symbols(self, symbols: Sequence[np.ndarray]) -> np.ndarray:
        """W+ from the decoded layers; missing upper layers take their conditional mean."""
        w = self.latent_avg.numpy().astype(np.float32).copy()  # rows outside the plan keep the mean
        base = np.zeros_like(w)
        context = np.zeros(0, np.int64)
        for i, coder in enumerate(self.coders):
            latents = symbols[i].astype(np.float64) if i < len(symbols) else coder.predict(context)
            if i == 0 and self.semantic is not None:
                base = self.semantic.decode(latents)[0]
                w = base.copy()
            else:
                rows = list(coder.model.rows)
                w[rows] = base[rows] + coder.model.synthesise(latents)
            context = np.concatenate([context, symbols[i] if i < len(symbols) else np.rint(latents).astype(np.int64)])
        return w

    def describe(self, codes: Sequence[LayeredCode]) -> list[dict]:
        """Analytics columns decoded from each code's basic layer: attributes and identity embedding."""
        if self.semantic is None:
            raise ConfigError(f"{self.codec_id} has no semantic base layer: no attribute columns to describe")
        return self.describe_base(self.base_codes(codes).astype(np.float64))

    def describe_base(self, base: np.ndarray) -> list[dict]:
        """Attribute columns and identity embedding of (n, code_dim) base codes."""
        if self.semantic is None:
            raise ConfigError(f"{self.codec_id} has no semantic base layer")
        attrs = self.semantic.attributes(base)
        # one face at a time: a batched matmul may round differently with the batch's size, and a
        # face's columns must not depend on which faces an engine happened to batch it with
        identity = np.concatenate([self.semantic.identity(b[None]) for b in base]) if len(base) else np.zeros((0, self.semantic.cfg.identity_dim))
        return [{**{k: v[i].item() if hasattr(v[i], "item") else v[i] for k, v in attrs.items()}, "identity": identity[i].tolist()} for i in range(len(base))]

    def base_codes(self, codes: Sequence[LayeredCode]) -> np.ndarray:
        """(n, code_dim) integer symbols of the basic layer."""
        return np.stack([self.decode_symbols(c, self.plan.names[0])[0] for c in codes])

    def wplus_from_base(self, base: np.ndarray) -> np.ndarray:
        """W+ (n, n_latent, style_dim) from base codes alone, the upper layers at their conditional mean."""
        return np.stack([self.wplus_from_symbols([np.rint(b).astype(np.int64)]) for b in np.asarray(base).reshape(len(base), -1)])

    # --- encode ------------------------------------------------------------------------------------
    def align(self, rgb: np.ndarray) -> list[AlignedFace]:
        return align_faces(rgb, self.detector)

    def human_plan(self, residual_quality: int | None = None, rung_bytes: dict[str, int] | None = None) -> HumanLayerPlan:
        """How the layers for people are coded: the defaults with these budgets (and so rung sizes) and residual quality."""
        return human_layers.default_plan(self.size, residual_quality, rung_bytes)

    def encode_crops(
        self, crops: np.ndarray, *, layers: Sequence[str] | None = None, human: HumanLayerPlan | None = None,
        descriptors: np.ndarray | None = None, times: StageTimes | None = None,
    ) -> list[LayeredCode]:
        """Layered codes for aligned crops (without the ``original`` layer, which needs the source file).

        ``human``: how the layers for people are coded (default: :meth:`human_plan`).
        ``descriptors``: the crops' face descriptors when a CPU stage already computed them (the
        detected-chip method does); computed here in one batch otherwise. ``times`` collects the
        seconds of each stage. Every network runs on batches of :data:`MICRO_BATCH` rows (per device
        kind), so a face's bytes do not depend on which faces it was coded with.
        """
        times = StageTimes() if times is None else times
        wanted = self._wanted(layers)
        human = self.human_plan() if human is None else human
        people = [n for n in HUMAN_LAYERS if n in wanted]
        needs_generated = human.needs_generated(people)
        if descriptors is not None and np.shape(descriptors) != (len(crops), DESCRIPTOR_DIM):
            raise ConfigError(f"descriptors of shape {np.shape(descriptors)} for {len(crops)} crops; expected ({len(crops)}, {DESCRIPTOR_DIM})")
        with times.stage("encoder"):
            wplus = in_fixed_batches(self.encode_wplus, self.micro_batch, crops)
        if descriptors is None:
            with times.stage("descriptor"):
                descriptors = self.descriptors(crops)
        codes_layers: list[list[LayerCode]] = []
        quantised = []
        with times.stage("semantic_entropy"):
            semantic_codes = (in_fixed_batches(self.semantic.encode, self.micro_batch, wplus, crops, descriptors)
                              if self.semantic is not None else [None] * len(wplus))
            for w, semantic_code in zip(wplus, semantic_codes):
                symbols = self._symbols(w, semantic_code=semantic_code)
                context = np.zeros(0, np.int64)
                layer_codes = []
                for coder, sym in zip(self.coders, symbols):
                    if coder.model.name in wanted:
                        layer_codes.append(LayerCode(coder.model.name, coder.encode(sym, context)))
                    context = np.concatenate([context, sym])
                codes_layers.append(layer_codes)
                if needs_generated:  # only a rung predicted from the generated face reads it at encode time
                    quantised.append(self.wplus_from_symbols(symbols))
        if people:
            generated: Sequence[np.ndarray | None] = [None] * len(crops)
            if needs_generated:
                with times.stage("synthesis"):
                    generated = in_fixed_batches(self.synthesise, self.micro_batch, np.stack(quantised))
            with times.stage("human_layers"):
                for layer_codes, rung_codes in zip(codes_layers, human_layers.encode_many(crops, generated, people, human)):
                    layer_codes.extend(rung_codes)
        return [LayeredCode(self.codec_id, self.weights_hash, tuple(lc)) for lc in codes_layers]

    def descriptors(self, crops: np.ndarray) -> np.ndarray | None:
        """dlib's descriptors of aligned crops, as the semantic layer reads them (None: it reads none).
        One batched call at the fixed micro-batch, so a face's descriptor does not depend on its batch."""
        if self.semantic is None or not self.semantic.cfg.descriptor:
            return None
        return in_fixed_batches(self.semantic.descriptors, self.micro_batch, crops)

    def encode(self, image: np.ndarray, *, source_bytes: bytes | None = None, source_is_jpeg: bool = False, layers: Sequence[str] | None = None,
               human: HumanLayerPlan | None = None) -> list[EncodedFace]:
        """Detect, align and encode every face of an RGB photo. ``source_bytes`` feeds the original layer;
        ``human``: how the layers for people are coded (default: :meth:`human_plan`)."""
        faces = self.align(image)
        codes = self.encode_crops(np.stack([f.crop for f in faces]), layers=layers, human=human)
        wanted = self._wanted(layers)
        if ORIGINAL in wanted and source_bytes is not None:
            original = LayerCode(ORIGINAL, image_layers.encode_original(source_bytes, is_jpeg=source_is_jpeg))
            codes = [LayeredCode(c.codec_id, c.weights_hash, c.layers + (original,)) for c in codes]
        return [EncodedFace(f, c) for f, c in zip(faces, codes)]

    def _wanted(self, layers: Sequence[str] | None) -> set[str]:
        names = self.layer_names
        wanted = set(names if layers is None else layers)
        unknown = wanted - set(names)
        if unknown:
            raise ConfigError(f"unknown layers {sorted(unknown)}; this codec has {names}")
        gen = [n for n in self.plan.names if n in wanted]
        if gen != list(self.plan.names[: len(gen)]):
            raise ConfigError(f"generative layers must be a prefix of {self.plan.names}, got {gen}")
        return wanted

    # --- decode ------------------------------------------------------------------------------------
    def check_identity(self, code: LayeredCode) -> None:
        if code.weights_hash[:32] != self.weights_hash[:32] or code.codec_id != self.codec_id:
            raise ModelMismatchError(
                f"stream was written by {code.codec_id} weights {code.weights_hash[:12]}, "
                f"this codec is {self.codec_id} weights {self.weights_hash[:12]}"
            )

    def decode_symbols(self, code: LayeredCode, upto: str) -> list[np.ndarray]:
        self.check_identity(code)
        if upto not in self.plan.names:
            raise ConfigError(f"{upto!r} is not a generative layer of {self.plan.names}")
        k = self.plan.index(upto) + 1
        context = np.zeros(0, np.int64)
        symbols = []
        for coder in self.coders[:k]:
            layer = code.layer(coder.model.name)
            if layer is None:
                raise MissingLayerError(f"layer {coder.model.name!r} needed for upto={upto!r} is not in the stream (has {code.names})")
            sym = coder.decode(layer.payload, context)
            symbols.append(sym)
            context = np.concatenate([context, sym])
        return symbols

    def decode_many(self, codes: Sequence[LayeredCode], upto: str) -> list[DecodedFace]:
        """Decode faces at a prefix: a generative layer or a layer for people (``preview``, ``detail``,
        ``residual``). The generator runs only for faces whose layers read the generated face."""
        if upto not in self.plan.names and upto not in HUMAN_LAYERS:
            raise ConfigError(f"--upto must be one of {[*self.plan.names, *HUMAN_LAYERS]}")
        top = self.plan.names[-1] if upto in HUMAN_LAYERS else upto
        synthesise = [upto not in HUMAN_LAYERS or human_layers.needs_generated(c, upto) for c in codes]
        used = self.plan.names[: self.plan.index(top) + 1]
        images: list[np.ndarray | None] = [None] * len(codes)
        if any(synthesise):
            at = [i for i, s in enumerate(synthesise) if s]
            wplus = np.stack([self.wplus_from_symbols(self.decode_symbols(codes[i], top)) for i in at])
            # the encoder's reference for a predicted rung, exactly, on this machine
            for i, img in zip(at, in_fixed_batches(self.synthesise, self.micro_batch, wplus)):
                images[i] = img
        out = []
        for code, img, gen in zip(codes, images, synthesise):
            if upto in HUMAN_LAYERS:
                self.check_identity(code)
                face, people = human_layers.decode_human(code, img, upto, self.size)
                out.append(DecodedFace(face, (used if gen else ()) + people, generated=True))  # lossy either way: never evidence
            else:
                out.append(DecodedFace(img, used, generated=True))
        return out

    def decode(self, code: LayeredCode, upto: str | None = None) -> DecodedFace:
        return self.decode_many([code], upto or self.plan.names[-1])[0]

    def original_bytes(self, code: LayeredCode) -> bytes:
        layer = code.layer(ORIGINAL)
        if layer is None:
            raise MissingLayerError(f"no original layer in this stream (has {code.names})")
        return image_layers.decode_original(layer.payload)
