"""``facetier measure``: rate and fidelity of every layer prefix on a folder or list of faces."""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from facetier.codec.layers import HUMAN_LAYERS
from facetier.codec.metrics import ms_ssim, psnr
from facetier.codec.model import FaceCodec
from facetier.pipelines.evaluation.protocol import first_faces, save_gallery
from tqdm import tqdm

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrefixStats:
    prefix: str
    bytes_mean: float
    bpp: float
    psnr_db: float
    ms_ssim: float


@dataclass(frozen=True)
class MeasureReport:
    codec_id: str
    weights_hash: str
    faces: int
    skipped: int
    size: int
    source_bytes_mean: float
    layer_bytes_mean: dict[str, float]
    prefixes: list[PrefixStats]

    def render(self) -> str:
        lines = [f"{self.codec_id} ({self.weights_hash[:12]}), {self.faces} faces at {self.size}x{self.size} ({self.skipped} inputs without a usable face)",
                 "bytes per layer: " + ", ".join(f"{k} {v:.1f}" for k, v in self.layer_bytes_mean.items()),
                 f"source file mean {self.source_bytes_mean:.0f} bytes",
                 f"{'prefix':<10}{'bytes':>10}{'bpp':>10}{'PSNR dB':>10}{'MS-SSIM':>10}"]
        lines += [f"{p.prefix:<10}{p.bytes_mean:>10.1f}{p.bpp:>10.4f}{p.psnr_db:>10.2f}{p.ms_ssim:>10.4f}" for p in self.prefixes]
        return "\n".join(lines)


def measure_folder(src: str, *, weights: str | None = None, limit: int = 200, gallery: str | None = None, report_path: str | None = None) -> MeasureReport:
    codec = FaceCodec.load(weights, device="cpu")
    crops_arr, source_sizes, skipped = first_faces(src, limit, codec.align)
    codes = []
    for i in tqdm(range(0, len(crops_arr), 16), desc="encode", unit="batch", mininterval=5):
        codes += codec.encode_crops(crops_arr[i : i + 16])
    prefixes = [*codec.plan.names, *HUMAN_LAYERS]
    ref_t = torch.from_numpy(crops_arr).permute(0, 3, 1, 2).float() / 255
    layer_bytes = {n: float(np.mean([c.sizes()[n] for c in codes])) for n in prefixes}
    stats, decoded_all = [], {}
    cum = 0.0
    pixels = codec.size * codec.size
    for name in prefixes:
        cum += layer_bytes[name]
        dec = np.concatenate([np.stack([d.image for d in codec.decode_many(codes[i : i + 16], name)]) for i in range(0, len(codes), 16)])
        decoded_all[name] = dec
        t = torch.from_numpy(dec).permute(0, 3, 1, 2).float() / 255
        stats.append(PrefixStats(name, cum, cum * 8 / pixels, float(psnr(t, ref_t).mean()), float(ms_ssim(t, ref_t).mean())))
    report = MeasureReport(codec.codec_id, codec.weights_hash, len(codes), skipped, codec.size, float(np.mean(source_sizes)), layer_bytes, stats)
    if gallery:
        save_gallery(gallery, [crops_arr, *(decoded_all[n] for n in prefixes)], 16)
    if report_path:
        Path(report_path).write_text(json.dumps(asdict(report), indent=1))
    return report
