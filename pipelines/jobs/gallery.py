"""A contact sheet of a decode or edit job, written next to its outputs.

``gallery.html`` shows every output (up to ``MAX_HTML``) as a thumbnail with its id, the layers
it came from, a badge saying whether its pixels are generated, a lossy copy of the crop or the
source's own, and the face's base attributes
(read from the base family, no model). Images are linked relatively, so the page works wherever
the folder is opened or served (a local folder, a bucket behind a web endpoint).
``gallery.png`` tiles the first ``MAX_PNG`` outputs, for a report or a chat message.
"""
from __future__ import annotations

import html
import io
import logging
from collections.abc import Sequence

import numpy as np
from facetier.codec.layers import HUMAN_LAYERS, ORIGINAL
from facetier.io.reader import read_family
from facetier.io.table import BASE_FAMILY, Table
from facetier.pipelines.jobs.decode_records import OutputRecord
from facetier.pipelines.jobs.outputs import OutputFolder
from PIL import Image

from facetier.errors import FacetierError

log = logging.getLogger(__name__)

MAX_HTML = 5000
MAX_PNG = 64
THUMB = 128

_STYLE = """body{font-family:system-ui,sans-serif;margin:1em;background:#fafafa}
main{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;width:150px;background:#fff;border:1px solid #ddd;border-radius:4px;padding:4px}
img{width:142px;height:142px;object-fit:contain;background:#eee;display:block}
figcaption{font-size:11px;line-height:1.35;word-break:break-all}
.badge{display:inline-block;padding:0 4px;border-radius:3px;color:#fff;font-size:10px}
.generated{background:#c0392b}.coded{background:#d68910}.source{background:#27ae60}"""

# Counts images that loaded (and that did not) into data attributes: what a headless browser check reads.
_SCRIPT = """window.addEventListener('load',()=>{const imgs=[...document.images];
document.body.dataset.loaded=imgs.filter(i=>i.complete&&i.naturalWidth>0).length;
document.body.dataset.broken=imgs.filter(i=>!(i.complete&&i.naturalWidth>0)).length;});"""


def _attributes(table_root: str, face_ids: list[str]) -> dict[str, str]:
    """'age 34 · female · white' per face id, from the base family; empty where it has none."""
    if not face_ids:
        return {}
    try:
        base = read_family(Table(table_root), BASE_FAMILY, columns=["face_id", "age", "gender", "race"], filters=[("face_id", "in", face_ids)])
    except FacetierError as exc:
        log.warning("gallery without attributes: %s", exc)
        return {}
    out = {}
    for row in base.to_pylist():
        parts = [f"age {row['age']:.0f}" if row["age"] is not None else "", row["gender"] or "", row["race"] or ""]
        out[row["face_id"]] = " · ".join(p for p in parts if p)
    return out


def render_html(records: Sequence[OutputRecord], attributes: dict[str, str], total: int) -> str:
    figures = []
    for r in records:
        badge = ('<span class="badge source">source pixels</span>' if not r.generated
                 else '<span class="badge coded">lossy copy</span>' if set(r.layers) & set(HUMAN_LAYERS)
                 else '<span class="badge generated">generated</span>')
        attrs = html.escape(attributes.get(r.id, ""))
        figures.append(f'<figure><a href="{html.escape(r.file)}"><img src="{html.escape(r.file)}" loading="eager" alt="{html.escape(r.id)}"></a>'
                       f'<figcaption>{html.escape(r.id)}<br>{html.escape("+".join(r.layers))} {badge}<br>{attrs}</figcaption></figure>')
    more = f"<p>first {len(records)} of {total} outputs; manifest.jsonl lists all</p>" if total > len(records) else ""
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>facetier: {total} outputs</title><style>{_STYLE}</style>"
            f"<script>{_SCRIPT}</script></head><body><h1>{total} outputs</h1>{more}<main>{''.join(figures)}</main></body></html>")


def _thumb(data: bytes) -> np.ndarray:
    img = Image.open(io.BytesIO(data)).convert("RGB")
    img.thumbnail((THUMB, THUMB))
    tile = Image.new("RGB", (THUMB, THUMB), (238, 238, 238))
    tile.paste(img, ((THUMB - img.width) // 2, (THUMB - img.height) // 2))
    return np.asarray(tile)


def render_png(out: OutputFolder, records: Sequence[OutputRecord], columns: int = 8) -> bytes:
    tiles = [_thumb(out.read(r.file)) for r in records if not r.file.endswith(".bin")]
    columns = max(1, min(columns, len(tiles)))
    tiles += [np.full((THUMB, THUMB, 3), 238, np.uint8)] * (-len(tiles) % columns)
    rows = [np.concatenate(tiles[i:i + columns], 1) for i in range(0, len(tiles), columns)]
    buf = io.BytesIO()
    Image.fromarray(np.concatenate(rows, 0)).save(buf, "PNG")
    return buf.getvalue()


def write_gallery(out: OutputFolder, records: Sequence[OutputRecord], table_root: str) -> tuple[str, ...]:
    shown = list(records[:MAX_HTML])
    faces = [r.id for r in shown if ORIGINAL not in r.layers or len(r.layers) > 1]
    out.write("gallery.html", render_html(shown, _attributes(table_root, faces), len(records)).encode())
    out.write("gallery.png", render_png(out, shown[:MAX_PNG]))
    return out.uri_of("gallery.html"), out.uri_of("gallery.png")
