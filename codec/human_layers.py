"""The layers for people, above the generative prefix: ``preview`` and ``detail`` rungs, then
``residual``, the face at full resolution.

Each is a rung (``codec.rungs``) coded on the image below it: the highest layer under it that the
face holds (the generated face when none is). ``preview`` and ``detail`` are coded per face at the
best candidate that fits their byte budget; ``residual`` at a fixed quality of one candidate at
the crop's size. Any prefix decodes, and a face written without a rung decodes its upper layers
from what it has, as it was encoded.

Tables written before the rungs hold a ``residual`` that is a bare JPEG XL codestream of the halved
difference from the generated face (``image_layers``); such a payload starts with JPEG XL's
signature, which no rung header can (format and mode 3 are not assigned), and decodes as before.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from facetier.codec import image_layers, rungs
from facetier.codec.layers import DETAIL, HUMAN_LAYERS, PREVIEW, RESIDUAL, LayerCode, LayeredCode
from facetier.codec.rungs import OWN, PREDICTED, RungCandidate
from facetier.errors import ConfigError, MissingLayerError, RawStreamError

log = logging.getLogger(__name__)

RUNG_LAYERS = (PREVIEW, DETAIL)
_JXL_SIGNATURES = (b"\xff\x0a", b"\x00\x00\x00\x0cJXL ")


def _check_rung_names(budgets: dict[str, int]) -> None:
    if unknown := set(budgets) - set(RUNG_LAYERS):
        raise ConfigError(f"byte budgets are for {', '.join(RUNG_LAYERS)}, not {sorted(unknown)}")


@dataclass(frozen=True)
class RungSetting:
    """A rung coded per face at the best of ``candidates`` within ``budget`` bytes (header included)."""

    candidates: tuple[RungCandidate, ...]
    budget: int

    def __post_init__(self) -> None:
        if not isinstance(self.budget, int):
            raise ConfigError(f"a rung budget must be whole bytes, not {self.budget!r}")
        if not self.candidates:
            raise ConfigError("a rung needs at least one candidate")
        if not rungs.HEADER_BYTES + 8 <= self.budget <= 65535:
            raise ConfigError(f"a rung budget of {self.budget} B is outside {rungs.HEADER_BYTES + 8}-65535")


@dataclass(frozen=True)
class HumanLayerPlan:
    preview: RungSetting
    detail: RungSetting
    full: RungCandidate  # at the crop's size
    full_quality: int
    full_on_rungs: int = PREDICTED  # the residual's mode over a rung; with none below it, it is coded on its own

    def residual_candidate(self, over_a_rung: bool) -> RungCandidate:
        """Over a rung, the residual codes what the rung below left (its bytes are not spent twice);
        over the generated face it codes the crop itself (the generated face is a poor reference
        for people: README, *Layers for people*)."""
        return replace(self.full, mode=self.full_on_rungs if over_a_rung else OWN)

    def setting(self, name: str) -> RungSetting:
        return self.preview if name == PREVIEW else self.detail

    def with_budgets(self, budgets: dict[str, int]) -> HumanLayerPlan:
        """The same candidates in other budgets (:func:`default_plan` also picks the size by budget)."""
        _check_rung_names(budgets)
        plan = self
        for name, b in budgets.items():
            plan = replace(plan, **{name: RungSetting(plan.setting(name).candidates, b)})
        return plan

    def budgets(self) -> tuple[tuple[str, int], ...]:
        return tuple((n, self.setting(n).budget) for n in RUNG_LAYERS)

    def with_full_quality(self, quality: int | None) -> HumanLayerPlan:
        if quality is None:
            return self
        if not 0 <= quality <= rungs.MAX_QUALITY:
            raise ConfigError(f"residual quality {quality} is outside 0-{rungs.MAX_QUALITY}")
        return replace(self, full_quality=quality)

    def needs_generated(self, wanted: Sequence[str]) -> bool:
        """Whether encoding these layers reads the generated face (the lowest one written is predicted)."""
        first = next((n for n in HUMAN_LAYERS if n in wanted), None)
        if first is None:
            return False
        modes = {self.residual_candidate(False).mode} if first == RESIDUAL else {c.mode for c in self.setting(first).candidates}
        return PREDICTED in modes

    def describe(self) -> str:
        parts = [f"{n} ≤{self.setting(n).budget} B of {'|'.join(c.label for c in self.setting(n).candidates)}" for n in RUNG_LAYERS]
        return ", ".join([*parts, f"residual {self.residual_candidate(True).label} q={self.full_quality} (on its own without rungs)"])


FULL_QUALITY = 60  # the residual layer's default quality


def _at_most(crop_size: int, *candidates: RungCandidate) -> tuple[RungCandidate, ...]:
    """The candidates with sizes above the crop's brought down to it (a rung never upsamples the crop)."""
    return tuple(dict.fromkeys(replace(c, size=min(c.size, crop_size)) for c in candidates))


# A rung's size by its budget, chosen on LFW folds 5-8 (``facetier rd``; README, *Layers for
# people*): below 200 B a face coded at 48 px beats 64 px, from 200 B 64 px, from 450 B 96 px.
# Trying each size per face and keeping the better bought 0.07-0.10 dB for twice the encode time.
RUNG_SIZE_BY_BUDGET: tuple[tuple[int, int], ...] = ((200, 48), (450, 64))
LARGE_RUNG_SIZE = 96
DEFAULT_BUDGETS = {PREVIEW: 150, DETAIL: 350}


def rung_candidates(budget: int, crop_size: int) -> tuple[RungCandidate, ...]:
    """The default rung of ``budget`` bytes: AVIF, without its container, at the size the budget buys."""
    size = next((s for below, s in RUNG_SIZE_BY_BUDGET if budget < below), LARGE_RUNG_SIZE)
    return _at_most(crop_size, RungCandidate("avif", size))


def check_settings(budgets: dict[str, int], full_quality: int | None) -> None:
    """Raise :class:`ConfigError` unless these are budgets of known rungs and a residual quality in range."""
    default_plan(128, budgets=budgets, full_quality=full_quality)


def default_plan(crop_size: int, full_quality: int | None = FULL_QUALITY, budgets: dict[str, int] | None = None) -> HumanLayerPlan:
    """Chosen on LFW folds 5-8 (``facetier rd``; README, *Layers for people*). Rung sizes are in
    pixels whatever the crop's size: the budgets are bytes a person looks at, not a share of the
    crop. ``budgets`` replaces the default budget of the rungs it names (and so their size)."""
    budgets = budgets or {}
    _check_rung_names(budgets)
    b = {**DEFAULT_BUDGETS, **budgets}
    plan = HumanLayerPlan(
        preview=RungSetting(rung_candidates(b[PREVIEW], crop_size), b[PREVIEW]),
        detail=RungSetting(rung_candidates(b[DETAIL], crop_size), b[DETAIL]),
        full=RungCandidate("avif", crop_size, OWN),
        full_quality=FULL_QUALITY,
    )
    return plan.with_full_quality(full_quality)


def encode_layer(name: str, crop: np.ndarray, below: np.ndarray | None, over_a_rung: bool, plan: HumanLayerPlan) -> rungs.CodedRung:
    """One layer for people of one face, on ``below`` (the image of the layer under it, or the
    generated face); ``over_a_rung``: whether that image is a rung's. Where the plan's format cannot
    be stored without its container (an encoder that no longer writes what the shipped templates
    say), the layer is coded as WebP of the same size and mode, whose container is rebuilt from the
    stream itself: bigger at the budget's quality, but the face is kept."""
    try:
        return _encode_layer(name, crop, below, over_a_rung, plan, None)
    except RawStreamError as exc:
        _warn_fallback(name, exc)
        return _encode_layer(name, crop, below, over_a_rung, plan, FALLBACK_FORMAT)


FALLBACK_FORMAT = "webp"


def _encode_layer(name: str, crop: np.ndarray, below: np.ndarray | None, over_a_rung: bool, plan: HumanLayerPlan, fmt: str | None) -> rungs.CodedRung:
    def as_fmt(c: RungCandidate) -> RungCandidate:
        return c if fmt is None else replace(c, fmt=fmt)

    if name == RESIDUAL:
        return rungs.code_rung(crop, below, as_fmt(plan.residual_candidate(over_a_rung)), plan.full_quality)
    s = plan.setting(name)
    return rungs.best_within(crop, below, tuple(dict.fromkeys(map(as_fmt, s.candidates))), s.budget)


_WARNED: set[str] = set()


def _warn_fallback(name: str, exc: RawStreamError) -> None:
    if name in _WARNED:
        return
    _WARNED.add(name)
    log.warning("the %s layer is coded as %s from here on where its format cannot be stored without its container (%s); "
                "reinstall the lock's Pillow to store the smaller stream", name, FALLBACK_FORMAT.upper(), exc)


def encode_human(crop: np.ndarray, generated: np.ndarray | None, wanted: Sequence[str], plan: HumanLayerPlan) -> list[LayerCode]:
    """The human layers of ``wanted`` for one face, lowest first."""
    image, out = generated, []
    for name in (n for n in HUMAN_LAYERS if n in wanted):
        r = encode_layer(name, crop, image, bool(out), plan)
        out.append(LayerCode(name, r.payload))
        image = r.image
    return out


def encode_many(crops: Sequence[np.ndarray], generated: Sequence[np.ndarray | None], wanted: Sequence[str], plan: HumanLayerPlan) -> list[list[LayerCode]]:
    """:func:`encode_human` of a batch, the faces spread over the cores (the image codecs release
    the GIL, and the model thread waits for this stage)."""
    if len(crops) < 2:
        return [encode_human(c, g, wanted, plan) for c, g in zip(crops, generated)]
    return list(image_layers.pool().map(lambda pair: encode_human(pair[0], pair[1], wanted, plan), zip(crops, generated)))


def is_legacy_residual(payload: bytes) -> bool:
    return payload.startswith(_JXL_SIGNATURES)


def payload_problem(name: str, payload: bytes) -> str | None:
    """Why a stored layer for people cannot be what it claims (None: its header reads), without decoding it."""
    if name == RESIDUAL and is_legacy_residual(payload):
        return None
    try:
        rungs.read_header(payload)
    except RawStreamError as exc:
        return f"is not a {name} layer: {exc}"
    return None


def needs_generated(code: LayeredCode, upto: str) -> bool:
    """Whether decoding ``code`` up to the human layer ``upto`` reads the generated face."""
    first = next((code.layer(n) for n in HUMAN_LAYERS[: HUMAN_LAYERS.index(upto) + 1] if code.layer(n) is not None), None)
    if first is None:
        return True
    return is_legacy_residual(first.payload) or rungs.read_header(first.payload)[0].mode == PREDICTED


def decode_human(code: LayeredCode, generated: np.ndarray | None, upto: str, crop_size: int) -> tuple[np.ndarray, tuple[str, ...]]:
    """The face at the human layer ``upto`` and the human layers used. Rungs the face was written
    without are passed over; ``upto`` itself must be there."""
    if upto not in HUMAN_LAYERS:
        raise ConfigError(f"{upto!r} is not one of the layers for people {HUMAN_LAYERS}")
    if code.layer(upto) is None:
        raise MissingLayerError(f"no {upto!r} layer in this stream (has {code.names})")
    image, used = generated, []
    for name in HUMAN_LAYERS[: HUMAN_LAYERS.index(upto) + 1]:
        layer = code.layer(name)
        if layer is None:
            continue
        if name == RESIDUAL and is_legacy_residual(layer.payload):
            if image is None or used:
                raise MissingLayerError("an old residual layer decodes on the generated face")
            image = image_layers.apply_residual(image, layer.payload)
        else:
            image = rungs.decode_rung(layer.payload, image, crop_size)
        used.append(name)
    assert image is not None
    return image, tuple(used)
