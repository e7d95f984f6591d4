"""Layer plan and the central value types of a layered face code."""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field

from facetier.errors import ConfigError

GENERATIVE = "generative"
LINEAR = "linear"
SEMANTIC = "semantic"
PREVIEW = "preview"
DETAIL = "detail"
RESIDUAL = "residual"
ORIGINAL = "original"
HUMAN_LAYERS = (PREVIEW, DETAIL, RESIDUAL)  # above the generative layers, for people (codec.human_layers)
LAYER_ORDER = ("basic", "middle", "enhanced", *HUMAN_LAYERS, ORIGINAL)


@dataclass(frozen=True)
class LayerSpec:
    """One generative layer: which W+ rows it carries and how many coded latents it uses.

    A ``linear`` layer codes its rows (what the semantic layer below left of them, if there is
    one); a ``semantic`` layer (the base only) codes a compact attribute code that decodes to
    every row.
    """

    name: str
    rows: tuple[int, ...]
    latent_dim: int
    kind: str = LINEAR


@dataclass(frozen=True)
class LayerPlan:
    """Nested generative layers, lowest first; each is conditioned on every layer below it."""

    layers: tuple[LayerSpec, ...]

    def __post_init__(self) -> None:
        rows = [r for spec in self.layers if spec.kind == LINEAR for r in spec.rows]
        if len(rows) != len(set(rows)):
            raise ConfigError("a W+ row belongs to two linear layers")
        if any(s.kind not in (LINEAR, SEMANTIC) for s in self.layers) or any(s.kind == SEMANTIC for s in self.layers[1:]):
            raise ConfigError("layer kinds are 'linear' and 'semantic', and only the base layer may be semantic")
        names = [s.name for s in self.layers]
        if len(names) != len(set(names)) or any(n in (*HUMAN_LAYERS, ORIGINAL) for n in names):
            raise ConfigError(f"bad generative layer names {names}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.layers)

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise ConfigError(f"unknown generative layer {name!r}; this plan has {self.names}") from None

    @staticmethod
    def default(n_latent: int) -> LayerPlan:
        """pSp's coarse / middle / fine grouping: rows 0-2, 3-6, 7-end (18 rows at 1024 px, 12 at 128 px)."""
        return LayerPlan(
            (
                LayerSpec("basic", tuple(range(3)), 32),
                LayerSpec("middle", tuple(range(3, 7)), 64),
                LayerSpec("enhanced", tuple(range(7, n_latent)), 64),
            )
        )

    @staticmethod
    def semantic(n_latent: int, code_dim: int = 60, middle_dim: int = 64, enhanced_dim: int = 64) -> LayerPlan:
        """Semantic base code for all rows; middle refines the coarse and middle rows, enhanced the fine ones."""
        return LayerPlan(
            (
                LayerSpec("basic", tuple(range(n_latent)), code_dim, SEMANTIC),
                LayerSpec("middle", tuple(range(min(7, n_latent))), middle_dim),
                LayerSpec("enhanced", tuple(range(min(7, n_latent), n_latent)), enhanced_dim),
            )
        )

    @property
    def is_semantic(self) -> bool:
        return self.layers[0].kind == SEMANTIC

    def to_json(self) -> list[dict]:
        return [{"name": s.name, "rows": list(s.rows), "latent_dim": s.latent_dim, "kind": s.kind} for s in self.layers]

    @staticmethod
    def from_json(items: list[dict]) -> LayerPlan:
        return LayerPlan(tuple(LayerSpec(d["name"], tuple(d["rows"]), int(d["latent_dim"]), d.get("kind", LINEAR)) for d in items))


def all_layer_names(plan: LayerPlan) -> tuple[str, ...]:
    return plan.names + HUMAN_LAYERS + (ORIGINAL,)


@dataclass(frozen=True)
class LayerCode:
    """The coded bytes of one layer."""

    name: str
    payload: bytes = field(repr=False)

    @property
    def crc32(self) -> int:
        return zlib.crc32(self.payload)

    @property
    def nbytes(self) -> int:
        return len(self.payload)


@dataclass(frozen=True)
class LayeredCode:
    """A face's layers, lowest first, with the identity of the model that wrote them."""

    codec_id: str
    weights_hash: str
    layers: tuple[LayerCode, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(layer.name for layer in self.layers)

    def layer(self, name: str) -> LayerCode | None:
        return next((layer for layer in self.layers if layer.name == name), None)

    def prefix(self, upto: str) -> LayeredCode:
        """The lowest layers up to and including ``upto``."""
        if upto not in self.names:
            from facetier.errors import MissingLayerError

            raise MissingLayerError(f"layer {upto!r} is not in this code (has {self.names})")
        k = self.names.index(upto) + 1
        return LayeredCode(self.codec_id, self.weights_hash, self.layers[:k])

    def sizes(self) -> dict[str, int]:
        return {layer.name: layer.nbytes for layer in self.layers}
