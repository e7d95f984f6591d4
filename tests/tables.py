"""Helpers the table tests share."""
from __future__ import annotations

from facetier.io.reader import read_family
from facetier.io.table import Table

FAMILIES = ("faces", "basic", "middle", "enhanced", "preview", "detail", "residual", "original", "rejects")


def table_snapshot(root: str) -> dict[str, list]:
    """Every committed family's rows, sorted: two tables are equal iff their snapshots are."""
    t = Table(root)
    m = t.snapshot()
    out = {}
    for fam in FAMILIES:
        rows = read_family(t, fam, snapshot=m).to_pylist()
        out[fam] = sorted(rows, key=lambda r: repr(sorted(r.items())))
    return out


def differing_families(a: dict[str, list], b: dict[str, list]) -> dict[str, str]:
    """Family by family, what differs between two snapshots (empty when the tables are equal)."""
    out = {}
    for fam in FAMILIES:
        if a[fam] != b[fam]:
            ids_a = {r.get("face_id") or r.get("photo_id") or r.get("source_uri"): r for r in a[fam]}
            ids_b = {r.get("face_id") or r.get("photo_id") or r.get("source_uri"): r for r in b[fam]}
            changed = sorted(k for k in ids_a.keys() & ids_b.keys() if ids_a[k] != ids_b[k])
            out[fam] = f"{len(a[fam])} vs {len(b[fam])} rows; {len(changed)} rows differ, e.g. {changed[:3]}"
    return out
