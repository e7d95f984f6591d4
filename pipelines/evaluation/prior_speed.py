"""``facetier bench-prior``: encode and decode speed of a bundle built from public-format checkpoints.

What a user holding FFHQ StyleGAN2 + pSp weights should expect per face, measured without the
weights: speed does not depend on the values, so the checkpoints are written here with random
weights at the real widths (StyleGAN2 config-f, pSp's IR-SE50 GradualStyleEncoder), imported with
``import-prior``, their layers fitted briefly, and the resulting codec timed stage by stage on
generated faces. Each size runs in its own process, so its peak memory is its own.
"""
from __future__ import annotations

import json
import logging
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from facetier.codec.checkpoints import load_bundle, save_psp
from facetier.codec.encoder import EncoderConfig, StyleEncoder
from facetier.codec.layers import RESIDUAL
from facetier.codec.model import FaceCodec
from facetier.codec.stylegan import Generator, GeneratorConfig
from facetier.pipelines.training.bundles import bundle_wplus, export_fitted_bundle
from facetier.pipelines.training.entropy_fit import EntropyTrainConfig
from facetier.pipelines.training.import_prior import import_prior, psp_encoder_config

from facetier.errors import ConfigError, FacetierError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PriorSpeed:
    size: int
    device: str
    threads: int
    faces: int
    batch: int
    generator_params: int
    encoder_params: int
    bundle_mb: float
    encoder_ms: float  # crop -> W+, per face
    layer_coding_ms: float  # W+ -> basic/middle/enhanced bytes, per face
    encode_all_layers_ms: float  # encode_crops with every layer (the layers for people included)
    decode_enhanced_ms: float  # bytes -> pixels at the full generative prefix
    decode_residual_ms: float
    peak_rss_mb: float

    @property
    def encode_faces_per_second(self) -> float:
        return 1000 / self.encode_all_layers_ms

    @property
    def decode_faces_per_second(self) -> float:
        return 1000 / self.decode_enhanced_ms


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up: allocator, kernels, lazy imports
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def measure_size(size: int, *, faces: int = 4, batch: int = 2, device: str = "cpu", work: Path | None = None,
                 generator: GeneratorConfig | None = None, encoder: EncoderConfig | None = None) -> PriorSpeed:
    """Build a random-weight bundle at ``size`` px with the public widths (or the configs given) and time its codec on ``faces`` faces."""
    if work is None:  # the checkpoints are GBs at the public widths: never leave them behind
        with tempfile.TemporaryDirectory(prefix=f"facetier-prior-speed-{size}-") as tmp:
            return measure_size(size, faces=faces, batch=batch, device=device, work=Path(tmp), generator=generator, encoder=encoder)
    torch.manual_seed(0)
    gen = Generator(generator or GeneratorConfig.ffhq(size))
    enc = StyleEncoder(encoder or psp_encoder_config(gen.config))
    save_psp(work / "psp.pt", enc, gen, torch.zeros(gen.n_latent, gen.config.style_dim))
    imported = import_prior(work / "imported.safetensors", encoder=work / "psp.pt")
    bundle = load_bundle(imported.path)
    rng = np.random.default_rng(0)
    # random crops through the real encoder: the fitted layers are meaningless, their cost is not
    side = enc.config.input_size
    wplus = bundle_wplus(bundle, rng.integers(0, 256, (64, side, side, 3), dtype=np.uint8), device=device, progress=False)
    fitted = work / "codec.safetensors"
    export_fitted_bundle(bundle, wplus, fitted, entropy_cfg=EntropyTrainConfig(steps=50, batch_size=64))
    codec = FaceCodec.load(fitted, device=device)
    crops = rng.integers(0, 256, (faces, size, size, 3), dtype=np.uint8)
    batches = [crops[i : i + batch] for i in range(0, faces, batch)]
    per = 1000 / faces
    w_batches = [codec.encode_wplus(b) for b in batches]
    encoder_ms = _timed(lambda: [codec.encode_wplus(b) for b in batches], 1) * per
    coding_ms = _timed(lambda: [codec._symbols(w) for wb in w_batches for w in wb], 1) * per
    generative = list(codec.plan.names)
    encode_all_ms = _timed(lambda: [codec.encode_crops(b) for b in batches], 1) * per
    codes = [c for b in batches for c in codec.encode_crops(b, layers=[*generative, RESIDUAL])]
    code_batches = [codes[i : i + batch] for i in range(0, faces, batch)]
    dec_ms = _timed(lambda: [codec.decode_many(cb, generative[-1]) for cb in code_batches], 1) * per
    res_ms = _timed(lambda: [codec.decode_many(cb, RESIDUAL) for cb in code_batches], 1) * per
    return PriorSpeed(size, str(codec.device), torch.get_num_threads(), faces, batch, sum(p.numel() for p in codec.prior.generator.parameters()),
                      sum(t.numel() for t in codec.bundle.prefixed("encoder.").values()), fitted.stat().st_size / 2**20, encoder_ms, coding_ms,
                      encode_all_ms, dec_ms, res_ms, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def run_prior_speed(sizes: list[int], *, faces: int, batch: int, device: str, report: str | None) -> list[PriorSpeed]:
    if bad := [s for s in sizes if s < 8 or s & (s - 1)]:
        raise ConfigError(f"--sizes must be powers of two (StyleGAN2 resolutions), not {bad}")
    rows = []
    for size in sizes:
        code = ("import json,dataclasses;from facetier.pipelines.evaluation.prior_speed import measure_size;"
                f"print(json.dumps(dataclasses.asdict(measure_size({size}, faces={faces}, batch={batch}, device={device!r}))))")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if proc.returncode != 0:
            raise FacetierError(f"bench-prior at {size} px failed:\n{proc.stderr[-2000:]}")
        rows.append(PriorSpeed(**json.loads(proc.stdout.strip().splitlines()[-1])))
        log.info("%d px done", size)
    if report:
        Path(report).write_text(json.dumps([asdict(r) | {"encode_faces_per_second": r.encode_faces_per_second,
                                                          "decode_faces_per_second": r.decode_faces_per_second} for r in rows], indent=1))
    return rows


def render(rows: list[PriorSpeed]) -> str:
    head = f"{'size':>6}{'device':>8}{'thr':>5}{'G params':>10}{'E params':>10}{'bundle MB':>10}{'E ms':>9}{'code ms':>9}{'encode ms':>11}{'dec ms':>9}{'dec+res ms':>11}{'peak MB':>9}"
    lines = [head] + [
        f"{r.size:>6}{r.device:>8}{r.threads:>5}{r.generator_params / 1e6:>9.1f}M{r.encoder_params / 1e6:>9.1f}M{r.bundle_mb:>10.0f}"
        f"{r.encoder_ms:>9.0f}{r.layer_coding_ms:>9.1f}{r.encode_all_layers_ms:>11.0f}{r.decode_enhanced_ms:>9.0f}{r.decode_residual_ms:>11.0f}{r.peak_rss_mb:>9.0f}"
        for r in rows]
    lines.append("per face; random weights at the public widths (speed does not depend on the values); encode = every layer incl. the layers for people")
    return "\n".join(lines)
