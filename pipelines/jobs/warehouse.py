"""Warehouse access to the index and base families: BigQuery DDL for the families' Delta tables.

BigQuery reads a Delta Lake table through BigLake (``format = 'DELTA_LAKE'``): it follows the
Delta log, so it sees exactly the committed files of the latest version, never the files a failed
or racing run left uncommitted, and the DDL does not need regenerating after each commit.
"""
from __future__ import annotations

from facetier.io.table import BASE_FAMILY, INDEX_FAMILY, Table


def bigquery_ddl(table_root: str, dataset: str, prefix: str = "facetier", connection: str = "us.facetier-lake") -> str:
    t = Table(table_root)
    snapshot = t.snapshot()
    stmts = [f"-- Delta Lake families of {table_root} (facetier version {snapshot.version} when generated; BigLake follows later commits)",
             f"-- needs a BigLake connection ({connection}) whose service account can read the bucket"]
    for family in (INDEX_FAMILY, BASE_FAMILY):
        stmts.append(
            f"CREATE OR REPLACE EXTERNAL TABLE `{dataset}.{prefix}_{family}`\n"
            f"WITH CONNECTION `{connection}`\n"
            f"OPTIONS (\n  format = 'DELTA_LAKE',\n  uris = ['{t.uri(family)}']\n);"
        )
    stmts.append(
        f"-- the same join as `facetier query`:\n-- SELECT f.face_id, f.source_uri, b.age, b.gender, b.race, b.nbytes FROM `{dataset}.{prefix}_faces` f "
        f"JOIN `{dataset}.{prefix}_basic` b USING (face_id);"
    )
    return "\n\n".join(stmts) + "\n"
