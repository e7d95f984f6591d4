"""Warehouse access to the base family: BigQuery external-table DDL generated from the manifest.

A wildcard over ``basic/*.parquet`` would also read shards a failed or racing run left behind
(written but never committed), so the DDL lists exactly the committed files of the current
manifest version. Regenerate it after each commit (the schedule does); DuckDB reads the same
files locally through ``facetier query``.
"""
from __future__ import annotations

from facetier.io.table import BASE_FAMILY, INDEX_FAMILY, Table


def bigquery_ddl(table_root: str, dataset: str, prefix: str = "facetier") -> str:
    t = Table(table_root)
    m = t.manifest()
    stmts = [f"-- generated from {table_root} manifest version {m.version}"]
    for family in (INDEX_FAMILY, BASE_FAMILY):
        uris = ",\n    ".join(f"'{t.uri(rel)}'" for rel in m.files(family))
        stmts.append(
            f"CREATE OR REPLACE EXTERNAL TABLE `{dataset}.{prefix}_{family}`\n"
            f"OPTIONS (\n  format = 'PARQUET',\n  uris = [\n    {uris}\n  ]\n);"
        )
    stmts.append(
        f"-- the same join as `facetier query`:\n-- SELECT f.face_id, f.source_uri, b.age, b.gender, b.race, b.nbytes FROM `{dataset}.{prefix}_faces` f "
        f"JOIN `{dataset}.{prefix}_basic` b USING (face_id);"
    )
    return "\n\n".join(stmts) + "\n"
