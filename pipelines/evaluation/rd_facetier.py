"""facetier's own points in ``facetier rd``: each generative prefix, then the layers for people
swept over their settings, each on the layers below it as an encode writes them.

- ``preview ≤B``: the preview rung alone above the generative prefix, at budget B (what
  ``encode --rung-bytes preview=B --layers basic,middle,enhanced,preview`` stores);
- ``detail ≤B``: the detail rung at budget B over the default preview;
- ``residual q=Q``: the full-resolution layer at quality Q over the default preview and detail;
- ``residual q=Q, no rungs``: the same layer written without the rungs (``--layers`` without them);
- ``…, over basic``: each of these in a table that stores the base layer (for analytics) and no other
  generative layer: the same payloads and decodes, since no default layer for people reads the
  generated face, with the base layer's bytes under them instead of the whole generative prefix.

Every point's bytes are the generative prefix's plus its layers' (rung headers included), and its
faces are decoded from the stored payloads, as ``decode --upto`` would.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from facetier.codec import human_layers, rungs
from facetier.codec.human_layers import DETAIL, PREVIEW, HumanLayerPlan
from facetier.codec.layers import RESIDUAL, LayerCode, LayeredCode
from facetier.codec.model import FaceCodec
from tqdm import tqdm

FACETIER = "facetier"
PREVIEW_BUDGETS = (80, 100, 115, 130, 150, 200, 250, 330, 350, 370, 450)  # AVIF at 48 px and quality 0 takes ~75 B
DETAIL_BUDGETS = (250, 350, 500, 700)
FULL_QUALITIES = (20, 35, 50, 60, 62, 65, 70, 80)
CHUNK = 64


@dataclass(frozen=True)
class HumanSetting:
    """One facetier point above the generative prefix: which layers are written, and how."""

    label: str
    layers: tuple[str, ...]
    plan: HumanLayerPlan

    @property
    def budget(self) -> int | None:
        top = self.layers[-1]
        return self.plan.setting(top).budget if top in (PREVIEW, DETAIL) else None


def human_settings(model: FaceCodec, preview_budgets: tuple[int, ...] = PREVIEW_BUDGETS, detail_budgets: tuple[int, ...] = DETAIL_BUDGETS,
                   full_qualities: tuple[int, ...] = FULL_QUALITIES) -> list[HumanSetting]:
    base = model.human_plan()
    out = [HumanSetting(f"preview ≤{b} B", (PREVIEW,), model.human_plan(rung_bytes={PREVIEW: b})) for b in preview_budgets]
    out += [HumanSetting(f"detail ≤{b} B", (PREVIEW, DETAIL), model.human_plan(rung_bytes={DETAIL: b})) for b in detail_budgets]
    out += [HumanSetting(f"{RESIDUAL} q={q}", (PREVIEW, DETAIL, RESIDUAL), base.with_full_quality(q)) for q in full_qualities]
    out += [HumanSetting(f"{RESIDUAL} q={q}, no rungs", (RESIDUAL,), base.with_full_quality(q)) for q in full_qualities]
    return out


@dataclass(frozen=True)
class HumanCoded:
    top_bytes: np.ndarray  # the setting's top layer, per face
    total_bytes: np.ndarray  # every layer for people, per face
    decoded: np.ndarray


class LayerCache:
    """Layers already coded in this run, per face: the sweeps share their lower layers (every
    residual setting sits on the same default preview and detail), so each is coded once. A layer's
    key is its own setting and every key below it."""

    def __init__(self) -> None:
        self._coded: dict[tuple, rungs.CodedRung] = {}

    def layers(self, face: int, crop: np.ndarray, generated: np.ndarray, setting: HumanSetting) -> list[LayerCode]:
        key: tuple = (face,)
        image, out = generated, []
        for k, name in enumerate(setting.layers):
            key += ((name, setting.plan.full_quality) if name == RESIDUAL else (name, setting.plan.setting(name)),)
            coded = self._coded.get(key)
            if coded is None:
                coded = human_layers.encode_layer(name, crop, image, bool(out), setting.plan)
                if k < len(setting.layers) - 1:  # only lower layers are shared; a top layer's images would fill GBs
                    self._coded[key] = coded
            out.append(LayerCode(name, coded.payload))
            image = coded.image
        return out


def code_setting(model: FaceCodec, setting: HumanSetting, crops: np.ndarray, generated: np.ndarray, pool: ThreadPoolExecutor,
                 cache: LayerCache) -> HumanCoded:
    """Every face through one setting (as ``encode_human`` codes it, lower layers from ``cache``),
    then decoded from its payloads alone."""
    size = model.size

    def one(face: int) -> tuple[int, int, np.ndarray]:
        layers = cache.layers(face, crops[face], generated[face], setting)
        code = LayeredCode(model.codec_id, model.weights_hash, tuple(layers))
        image, _ = human_layers.decode_human(code, generated[face], setting.layers[-1], size)
        return layers[-1].nbytes, sum(layer.nbytes for layer in layers), image

    out = list(pool.map(one, range(len(crops)), chunksize=CHUNK))
    return HumanCoded(np.array([o[0] for o in out]), np.array([o[1] for o in out]), np.stack([o[2] for o in out]))


def generative_prefixes(model: FaceCodec, crops: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Each generative prefix's decodes and cumulative bytes per face."""
    prefixes = list(model.plan.names)
    decoded: dict[str, list[np.ndarray]] = {p: [] for p in prefixes}
    sizes: dict[str, list[int]] = {p: [] for p in prefixes}
    for i in tqdm(range(0, len(crops), CHUNK), desc="facetier", unit="chunk"):
        codes = model.encode_crops(crops[i:i + CHUNK], layers=prefixes)
        total = np.zeros(len(codes), int)
        for p in prefixes:
            total = total + [c.sizes()[p] for c in codes]
            decoded[p] += [d.image for d in model.decode_many(codes, p)]
            sizes[p] += total.tolist()
    return {p: np.stack(v) for p, v in decoded.items()}, {p: np.array(v) for p, v in sizes.items()}
