"""Nothing silently wrong: damaged stored layers, unreadable family files and hostile SQL.

The table is built from the self-made sample archive, then damaged on purpose as storage or a
careless hand would damage it: a flipped byte inside a payload (which Parquet does not notice), a
truncated family file, originals swapped between two photos, and SQL that tries to write or read
outside the table.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from facetier.cli import main
from facetier.io.reader import read_family
from facetier.io.table import Table
from facetier.pipelines.jobs.analytics import run_query
from facetier.pipelines.jobs.decode import run_decode
from facetier.pipelines.jobs.edit import edit
from facetier.pipelines.jobs.encode import EncodeOptions, run_encode

from facetier.errors import QueryError, TableCorruptError


@pytest.fixture(scope="module")
def pristine(sample_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    root = str(tmp_path_factory.mktemp("integrity") / "table")
    summary = run_encode(str(sample_archive), root, EncodeOptions(engine="local", shard_size=2, progress=False))
    assert summary.faces >= 4
    return root


@pytest.fixture()
def table(pristine: str, tmp_path: Path) -> str:
    root = tmp_path / "table"
    shutil.copytree(pristine, root)
    return str(root)


@dataclass(frozen=True)
class _Files:
    files: dict[str, str]  # family -> file holding the photo's rows, relative to the root


def _two_faces_in_two_shards(root: str) -> tuple[dict, dict, dict]:
    """(face A, face B, {photo id: its files}) with A and B in different files."""
    t = Table(root)
    shard_of: dict[str, _Files] = {}
    for fam in ("faces", "basic", "middle", "enhanced", "residual", "original"):
        rows = read_family(t, fam, columns=["photo_id"], with_file=True)
        for p, rel in zip(rows.column("photo_id").to_pylist(), rows.column("__file").to_pylist()):
            shard_of.setdefault(p, _Files({})).files[fam] = rel
    faces = sorted(read_family(t, "faces").to_pylist(), key=lambda r: r["face_id"])
    a = faces[0]
    b = next(f for f in faces if shard_of[f["photo_id"]].files["faces"] != shard_of[a["photo_id"]].files["faces"])
    return a, b, shard_of


def _rewrite(path: Path, change) -> None:
    """Rewrite a Parquet file with ``change`` applied to its rows, keeping schema and metadata (what bit rot keeps)."""
    t = pq.read_table(path)
    rows = change(t.to_pylist())
    pq.write_table(pa.Table.from_pylist(rows, schema=t.schema), path)


def test_a_flipped_byte_in_a_payload_is_a_checksum_failure_not_another_face(table: str, tmp_path: Path):
    a, b, shard_of = _two_faces_in_two_shards(table)
    middle = Path(table) / shard_of[a["photo_id"]].files["middle"]

    def flip(rows):
        for r in rows:
            if r["face_id"] == a["face_id"]:
                p = bytearray(r["payload"])
                p[len(p) // 2] ^= 0x5A
                p[-1] ^= 0x01
                r["payload"] = bytes(p)
        return rows

    _rewrite(middle, flip)
    result = run_decode(table, [a["face_id"], b["face_id"]], "enhanced", str(tmp_path / "out"), device="cpu")
    assert [f.face_id for f in result.files] == [b["face_id"]]
    (failure,) = result.failures
    assert failure.id == a["face_id"] and failure.error_class == "ChecksumError"
    assert "middle" in failure.message and str(middle.name) in failure.message
    assert not (tmp_path / "out" / f"{a['face_id']}_enhanced.png").exists()
    # `basic` alone does not read the damaged layer: that prefix still decodes
    assert len(run_decode(table, [a["face_id"]], "basic", str(tmp_path / "out"), device="cpu").files) == 1


def test_a_truncated_family_file_fails_only_its_faces_and_names_the_file(table: str, tmp_path: Path, capsys):
    a, b, shard_of = _two_faces_in_two_shards(table)
    basic = Path(table) / shard_of[a["photo_id"]].files["basic"]
    basic.write_bytes(basic.read_bytes()[: basic.stat().st_size // 2])
    result = run_decode(table, [a["face_id"], b["face_id"]], "middle", str(tmp_path / "out"), device="cpu")
    assert [f.face_id for f in result.files] == [b["face_id"]]
    assert [(f.id, f.error_class) for f in result.failures] == [(a["face_id"], "TableCorruptError")]
    assert basic.name in result.failures[0].message
    # through the CLI: the good face is written, the bad one listed, exit 4
    assert main(["decode", table, "--ids", a["face_id"], b["face_id"], "--upto", "middle", "--out", str(tmp_path / "cli")]) == 4
    err = capsys.readouterr().err
    assert f"FAILED {a['face_id']}\tTableCorruptError" in err and "1 written, 1 failed" in err
    # a query over the damaged family is a typed error naming the file, not a traceback
    with pytest.raises(TableCorruptError, match=basic.name):
        run_query(table, "select count(*) from basic")
    assert main(["query", table, "select avg(age) from basic"]) == 2
    assert basic.name in capsys.readouterr().err


def test_an_original_that_does_not_hash_to_its_photo_is_refused(table: str, tmp_path: Path):
    a, b, shard_of = _two_faces_in_two_shards(table)
    orig_a = Path(table) / shard_of[a["photo_id"]].files["original"]
    other = pq.read_table(Path(table) / shard_of[b["photo_id"]].files["original"]).to_pylist()[0]["payload"]

    def swap(rows):
        for r in rows:
            if r["photo_id"] == a["photo_id"]:
                r["payload"] = other  # a valid original, of another photo
        return rows

    _rewrite(orig_a, swap)
    result = run_decode(table, [a["photo_id"], b["photo_id"]], "original", str(tmp_path / "out"))
    assert [f.face_id for f in result.files] == [b["photo_id"]]
    assert [(f.id, f.error_class) for f in result.failures] == [(a["photo_id"], "ChecksumError")]


def test_edit_records_damaged_faces_and_edits_the_rest(table: str, tmp_path: Path):
    a, _, shard_of = _two_faces_in_two_shards(table)
    enhanced = Path(table) / shard_of[a["photo_id"]].files["enhanced"]
    _rewrite(enhanced, lambda rows: [r | {"payload": r["payload"][:-1]} if r["face_id"] == a["face_id"] else r for r in rows])
    res = edit(table, "1 = 1", {"age": "+10"}, str(tmp_path / "edited"), device="cpu")
    assert [f.id for f in res.failures] == [a["face_id"]] and res.failures[0].error_class == "ChecksumError"
    assert res.edited >= 3 and all(a["face_id"] not in o for o in res.outputs)


@pytest.mark.parametrize(("sql", "why"), [
    ("copy (select * from faces) to '{root}/faces/v00000099.parquet'", "read-only"),
    ("select 1; select 2", "exactly one"),
    ("attach '{root}/x.db' as x", "read-only"),
    ("select * from read_text('/etc/hostname')", "Permission"),
    ("select * from read_parquet('{root}/middle/*.parquet')", "Permission"),
    ("select * from glob('/etc/*')", "Permission"),
    ("set enable_external_access = true", "read-only"),
    ("pragma version", "read-only"),
])
def test_query_is_one_read_only_select_over_the_table(table: str, sql: str, why: str):
    version = Table(table).version()
    with pytest.raises(QueryError, match=why):
        run_query(table, sql.format(root=table))
    assert Table(table).version() == version and not (Path(table) / "faces" / "v00000099.parquet").exists() and not (Path(table) / "x.db").exists()
    assert run_query(table, "select count(*) as n from faces").table.column("n")[0].as_py() >= 4


def test_rejects_can_be_queried_and_their_bytes_are_counted(table: str):
    res = run_query(table, "select error_class, count(*) as n from rejects group by error_class order by error_class")
    classes = dict(zip(res.table.column("error_class").to_pylist(), res.table.column("n").to_pylist()))
    assert classes.get("NoFaceError") == 1 and sum(classes.values()) >= 5 and res.bytes_read > 0
