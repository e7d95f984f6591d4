"""Tables from facetier's v1 manifest format: refused with a clear error, then migrated in place with
every row kept. The fixture under tests/data/v1-table was written by facetier at 3d73565 (the last
manifest version) from the project's own generated sample faces: two manifest versions, 4 faces
(layers basic and middle), an alias, a NoFaceError and an UnsafeMemberError."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from facetier.cli import main
from facetier.errors import LegacyTableError
from facetier.io.identity import unpack_identity
from facetier.io.reader import read_family
from facetier.io.table import Table
from facetier.pipelines.jobs.analytics import run_query
from facetier.pipelines.jobs.check import check_table
from facetier.pipelines.jobs.migrate import migrate_v1

FIXTURE = Path(__file__).parent / "data" / "v1-table"


@pytest.fixture()
def v1_table(tmp_path: Path) -> Path:
    root = tmp_path / "v1-table"
    shutil.copytree(FIXTURE, root)
    return root


def _v1_rows(root: Path, family: str) -> list[dict]:
    manifest = json.loads((root / "_manifest" / "v00000002.json").read_text())
    return [r for s in manifest["shards"] if family in s["files"] for r in pq.read_table(root / s["files"][family]).to_pylist()]


def test_every_command_refuses_a_v1_table_and_names_migrate(v1_table: Path, capsys):
    with pytest.raises(LegacyTableError, match="facetier migrate"):
        Table(str(v1_table)).version()
    assert main(["vacuum", str(v1_table), "--quiet"]) != 0
    assert "facetier migrate" in capsys.readouterr().err
    assert len(list((v1_table / "faces").glob("*.parquet"))) == 3, "nothing was deleted"


def test_migrate_keeps_every_row_and_the_table_then_works(v1_table: Path, tmp_path: Path):
    before_faces, before_basic = _v1_rows(v1_table, "faces"), _v1_rows(v1_table, "basic")
    report = migrate_v1(str(v1_table), progress=False)
    assert report.manifest_version == 2 and report.version == 1 and report.shards == 3
    assert report.rows == {"faces": 4, "basic": 4, "middle": 4, "rejects": 2, "aliases": 1}
    t = Table(str(v1_table))
    faces = read_family(t, "faces").to_pylist()
    assert sorted(f["face_id"] for f in faces) == sorted(f["face_id"] for f in before_faces)
    basic = read_family(t, "basic").sort_by("face_id")
    old = sorted(before_basic, key=lambda r: r["face_id"])
    assert basic.column("payload").to_pylist() == [r["payload"] for r in old]
    stored = unpack_identity(basic.column("identity"), basic.column("identity_scale"))
    np.testing.assert_allclose(stored, np.array([r["identity"] for r in old], np.float32), atol=np.abs(stored).max() / 127)
    assert sorted(r["error_class"] for r in read_family(t, "rejects").to_pylist()) == ["NoFaceError", "UnsafeMemberError"]
    assert run_query(str(v1_table), "select count(*) as n from aliases").table.column("n")[0].as_py() == 1
    assert check_table(str(v1_table), progress=False).healthy
    # written before facetier stored descriptors: search uses the identity column, and says so
    from facetier.pipelines.jobs.identity_search import search

    found = search(str(v1_table), faces[0]["face_id"], k=2)
    assert found.space == "identity" and "identity column" in found.method and found.table.num_rows == 2
    again = migrate_v1(str(v1_table), progress=False)
    assert again.already_migrated and Table(str(v1_table)).version() == 1
    # the fixture's streams were written by v3, which is no longer the embedded model (v3.1): the
    # migrated table is read, and its decode names the weights the streams need instead of guessing
    out = tmp_path / "decoded"
    assert main(["decode", str(v1_table), "--ids", faces[0]["face_id"], "--upto", "middle", "--out", str(out), "--device", "cpu", "--quiet"]) != 0
    (failure,) = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert failure["id"] == faces[0]["face_id"] and failure["error_class"] == "ModelMismatchError"
    assert "facetier-prior-128-v3 weights" in failure["message"], "the message names the model that wrote the stream"
