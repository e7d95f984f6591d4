"""What ``facetier rd`` writes: the points as JSON and CSV, the curves as PNG and SVG, a strip of
faces from every codec at a few byte budgets, and a text table for the terminal."""
from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
from facetier.pipelines.evaluation.rate_distortion import FACETIER, RdPoint, RdReport
from facetier.pipelines.evaluation.rd_envelope import BEAT_MAX_BYTES, VARIANT

log = logging.getLogger(__name__)

BUDGETS = (100, 500, 2000)  # bytes per face shown in the strip
METRICS = (("verification", "LFW verification (dlib)"), ("ms_ssim", "MS-SSIM"), ("psnr_db", "PSNR (dB)"))


def write_report(report: RdReport, strips: dict[tuple[str, str], np.ndarray], out_dir: Path, *, strip: bool = True) -> list[Path]:
    """Every output of a run under ``out_dir``; the plots need matplotlib (the ``eval`` extra)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "rd.json", out_dir / "rd.csv"]
    written[0].write_text(json.dumps(asdict(report), indent=1))
    with written[1].open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow([f.name for f in fields(RdPoint)])
        w.writerows([[getattr(p, f.name) for f in fields(RdPoint)] for p in report.points])
    try:
        import matplotlib

        matplotlib.use("Agg")
    except ImportError:
        log.warning("matplotlib is not installed (pip install -e '.[eval]'): no plots, only rd.json and rd.csv")
        return written
    for suffix in ("png", "svg"):
        written.append(plot_curves(report, out_dir / f"rd.{suffix}"))
    if strip:
        written.append(plot_strip(strips, report, out_dir / "strip.png"))
    return written


_FACETIER_GROUPS = (("preview", "k-o"), ("detail", "k-s"), ("residual", "k-^"), ("residual, no rungs", "k:^"), ("preview, over basic", "b-o"),
                    ("detail, over basic", "b-s"), ("residual, over basic", "b-^"), ("residual, no rungs, over basic", "b:^"))


def _group(p: RdPoint) -> str:
    """Which sweep of facetier's a point belongs to: its layer, whether the rungs are under it, and
    whether the whole generative prefix is."""
    layer = p.setting.split(" ")[0]
    return ", ".join([layer] + [part for part in ("no rungs", "over basic") if part in p.setting])


def _families(points: list[RdPoint]) -> list[str]:
    return list(dict.fromkeys(p.codec for p in points))


def plot_curves(report: RdReport, path: Path) -> Path:
    import matplotlib.pyplot as plt

    metrics = [(m, t) for m, t in METRICS if any(getattr(p, m) is not None for p in report.points)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4.8), squeeze=False)
    for ax, (metric, title) in zip(axes[0], metrics):
        for codec in _families(report.points):
            pts = sorted((p for p in report.points if p.codec == codec and getattr(p, metric) is not None), key=lambda p: p.bytes_mean)
            if codec.startswith(VARIANT):
                continue  # in rd.csv and the table: too many curves for one plot
            if codec == FACETIER:
                gen = [p for p in pts if " " not in p.setting]
                ax.plot([p.bytes_mean for p in gen], [getattr(p, metric) for p in gen], "r*", ms=13, label="facetier prefixes", zorder=5)
                for p in gen:
                    ax.annotate(p.setting, (p.bytes_mean, getattr(p, metric)), textcoords="offset points", xytext=(4, -10), fontsize=8, color="r")
                for group, style in _FACETIER_GROUPS:
                    sweep = [p for p in pts if _group(p) == group]
                    ax.plot([p.bytes_mean for p in sweep], [getattr(p, metric) for p in sweep], style, lw=2, ms=4, label=f"facetier {group}", zorder=4)
            else:
                style = "-" if "@" not in codec else ":"
                ax.plot([p.bytes_mean for p in pts], [getattr(p, metric) for p in pts], style, marker=".", label=codec)
        if metric == "verification" and report.crop_verification is not None:
            ax.axhline(report.crop_verification, color="grey", lw=0.8, ls="--", label="uncoded crop")
        ax.set_xscale("log")
        ax.set_xlabel("bytes per face (whole file)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7, ncol=2)
    fig.suptitle(f"{report.faces} faces at {report.crop_size} px, {report.pairs} pairs; {report.codec_id}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def nearest(points: list[RdPoint], codec: str, budget: float) -> RdPoint | None:
    """The codec's point whose bytes are nearest ``budget`` on a log scale (any of its scales)."""
    pts = [p for p in points if p.codec.split("@")[0] == codec]
    return min(pts, key=lambda p: abs(math.log(p.bytes_mean / budget))) if pts else None


def plot_strip(strips: dict[tuple[str, str], np.ndarray], report: RdReport, path: Path) -> Path:
    """Rows: the same faces; one block per budget; columns: the crop, then each codec's point nearest the budget."""
    import matplotlib.pyplot as plt

    families = list(dict.fromkeys(p.codec.split("@")[0] for p in report.points if not p.codec.startswith("variant")))
    crop = strips[("crop", "")]
    n_faces = len(crop)
    cols = 1 + len(families)
    fig, axes = plt.subplots(n_faces * len(BUDGETS), cols, figsize=(1.3 * cols, 1.45 * n_faces * len(BUDGETS)), squeeze=False)
    for b, budget in enumerate(BUDGETS):
        columns: list[tuple[np.ndarray | None, str]] = [(crop, f"~{budget} B\ncrop")]
        for family in families:
            point = nearest(report.points, family, budget)
            faces = strips.get((point.codec, point.setting)) if point else None
            columns.append((faces, f"{point.codec}\n{point.setting}, {point.bytes_mean:.0f} B" if point else family))
        for c, (faces, title) in enumerate(columns):
            for r in range(n_faces):
                ax = axes[b * n_faces + r][c]
                ax.axis("off")
                if faces is not None:
                    ax.imshow(faces[r])
                if r == 0:
                    ax.set_title(title, fontsize=6)
    fig.tight_layout(pad=0.2)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def render(report: RdReport) -> str:
    head = (f"rate-distortion on {report.faces} faces ({report.crop_size} px crops) from {report.source}; "
            f"{report.pairs} LFW pairs, judge {report.judge} ({report.judge_runtime}); PSNR/MS-SSIM over {report.metric_faces} faces; "
            f"{report.seconds / 60:.1f} min")
    lines = [head]
    if report.phase_seconds:
        lines.append("time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in report.phase_seconds.items()))
    if report.crop_verification is not None:
        lines.append(f"uncoded crops verify at {100 * report.crop_verification:.2f}%")
    cw = max([14, *(len(p.codec) + 2 for p in report.points)])
    sw = max([16, *(len(p.setting) + 2 for p in report.points)])
    lines.append(f"{'codec':<{cw}}{'setting':<{sw}}{'bytes':>8}{'bpp':>8}{'PSNR':>7}{'MS-SSIM':>9}{'verif.':>8}{'gender':>8}{'age':>6}")
    for p in report.points:
        ver = "" if p.verification is None else f"{100 * p.verification:.1f}%"
        gen = "" if p.gender_agreement is None else f"{100 * p.gender_agreement:.0f}%"
        age = "" if p.age_mae_years is None else f"{p.age_mae_years:.1f}"
        lines.append(f"{p.codec:<{cw}}{p.setting:<{sw}}{p.bytes_mean:>8.0f}{p.bpp:>8.3f}{p.psnr_db:>7.2f}{p.ms_ssim:>9.3f}{ver:>8}{gen:>8}{age:>6}")
    lines.append("header bytes (flat 8x8 image, lowest setting): " + ", ".join(f"{k} {v}" for k, v in report.header_bytes.items()))
    for name, figures in report.bd_rate.items():
        lines.append(f"BD-rate {name}: " + ", ".join(f"{m} {'n/a' if v is None else f'{v:+.1f}%'}" for m, v in figures.items()))
    g = report.goals
    for key, label, fmt in (("verification_within_300_B", "best verification within 300 B", "{:.2%}"),
                            ("verification_within_400_B", "best verification within 400 B", "{:.2%}"),
                            ("ms_ssim_within_1700_B", "best MS-SSIM within 1,700 B", "{:.4f}")):
        if g.get(key):
            lines.append(f"{label}: {fmt.format(g[key]['value'])} (facetier {g[key]['setting']}, {g[key]['bytes']:.0f} B)")
    for setting, b in g.get("budgets", {}).items():
        lines.append(f"budget {setting}: mean {b['mean_vs_budget']:+.1%}, 95th percentile {b['p95_vs_budget']:+.1%} of the budget")
    lines.append(f"conventional points at <= {BEAT_MAX_BYTES} B that facetier does not match at their bytes: {len(report.beating_points)}")
    for b in report.beating_points:
        near = b["closest_facetier"]
        ver = "" if b["verification"] is None else f"{b['verification']:.2%}, "
        lines.append(f"  {b['codec']} {b['setting']}: {b['bytes']:.0f} B, {ver}MS-SSIM {b['ms_ssim']:.4f}"
                     + ("" if near is None else f"; closest facetier {near['setting']} at {near['bytes']:.0f} B: "
                        + ("" if near["verification"] is None else f"{near['verification']:.2%}, ") + f"MS-SSIM {near['ms_ssim']:.4f}"))
    for name, why in report.skipped.items():
        lines.append(f"skipped {name}: {why}")
    return "\n".join(lines)
