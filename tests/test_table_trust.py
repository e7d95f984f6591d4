"""A table an archive can trust: damage `check` must name, and what `check --repair` may and may not do.

Each test damages a copy of one table built from the self-made sample archive as storage or a
careless hand would: a lost or garbled Delta log file, a deleted family folder, a lost claim log,
bytes flipped anywhere in any committed file, a log whose statistics no longer bound their file.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from facetier.cli import main
from facetier.io.reader import read_family
from facetier.io.table import ALL_FAMILIES, COMMITS_TABLE, Table, add_actions, recorded_digest
from facetier.pipelines.jobs.analytics import run_query
from facetier.pipelines.jobs.check import check_table
from facetier.pipelines.jobs.encode import EncodeOptions, run_encode
from facetier.pipelines.jobs.maintenance import vacuum

from facetier.errors import TableCorruptError


@pytest.fixture(scope="module")
def pristine(sample_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    here = tmp_path_factory.mktemp("trust")
    root, half = str(here / "table"), here / "half"
    half.mkdir()
    for p in sorted(sample_archive.iterdir())[::2]:
        shutil.copy(p, half / p.name)
    # two commits, so every family's log has more than one version to lose
    for src in (half, sample_archive):
        run_encode(str(src), root, EncodeOptions(engine="local", shard_size=3, progress=False))
    assert check_table(root, progress=False).healthy
    return root


@pytest.fixture()
def table(pristine: str, tmp_path: Path) -> str:
    root = tmp_path / "table"
    shutil.copytree(pristine, root)
    return str(root)


def _faces(root: str) -> int:
    return run_query(root, "select count(*) as n from faces join basic using (face_id)").table.to_pylist()[0]["n"]


def _log_files(root: str, family: str) -> list[Path]:
    return sorted((Path(root) / family / "_delta_log").glob("*.json"))


def _data_files(root: str) -> set[Path]:
    return {p for p in Path(root).rglob("*.parquet") if "_delta_log" not in p.parts}


def test_every_file_facetier_commits_is_named_after_its_bytes(pristine: str):
    t = Table(pristine)
    for family in (*ALL_FAMILIES, COMMITS_TABLE):
        dt = t.delta(family)
        if dt is None:
            continue
        for path in add_actions(dt).column("path").to_pylist():
            assert recorded_digest(path), f"{family}/{path} has no digest in its name"


def test_a_lost_newest_log_file_is_named_and_repair_brings_its_rows_back(table: str, capsys):
    faces = _faces(table)
    files = _data_files(table)
    _log_files(table, "basic")[-1].unlink()  # the newest commit of the base family: Delta opens the one before it
    assert _faces(table) < faces  # what a reader sees: rows gone without an error
    assert main(["check", table, "--quiet"]) == 5
    out = capsys.readouterr().out
    assert "basic family's log ends at facetier version" in out
    assert main(["check", table, "--repair", "--retention-hours", "0", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "REPAIRED re-applied version" in out and "basic" in out
    assert _faces(table) == faces and files <= _data_files(table)
    assert check_table(table, progress=False).healthy


def test_a_lost_middle_log_file_is_a_typed_error_everywhere_and_repair_deletes_nothing(table: str, capsys, tmp_path: Path):
    _log_files(table, "basic")[1].unlink()
    files = _data_files(table)
    assert main(["check", table, "--quiet"]) == 5
    assert "commit file(s) of version 1 are missing" in capsys.readouterr().out
    assert main(["query", table, "select count(*) from basic"]) == 2
    err = capsys.readouterr().err
    assert "TableCorruptError" in err and "basic family's Delta log" in err and "Traceback" not in err
    assert main(["decode", table, "--where", "true", "--upto", "basic", "--out", str(tmp_path / "out")]) == 2
    assert "TableCorruptError" in capsys.readouterr().err
    assert main(["check", table, "--repair", "--retention-hours", "0", "--quiet"]) == 5
    assert "KEPT removed nothing" in capsys.readouterr().out
    assert _data_files(table) == files
    with pytest.raises(TableCorruptError, match="damaged"):
        vacuum(Table(table), retention_hours=0)


def test_a_garbled_log_file_is_a_problem_not_a_traceback(table: str, capsys):
    newest = _log_files(table, "middle")[-1]
    newest.write_text(newest.read_text()[:-40] + "#garbage")
    assert main(["check", table, "--quiet"]) == 5
    assert f"{newest.name}: line" in capsys.readouterr().out
    assert main(["query", table, "select count(*) from faces"]) in (0, 2)  # faces is intact; either way no traceback
    assert "Traceback" not in capsys.readouterr().err


def test_a_deleted_family_is_named_and_nothing_is_removed(table: str, capsys):
    shutil.rmtree(Path(table) / "basic")
    files = _data_files(table)
    assert main(["check", table, "--repair", "--retention-hours", "0", "--quiet"]) == 5
    out = capsys.readouterr().out
    assert "the basic family is gone" in out and "KEPT removed nothing" in out
    assert _data_files(table) == files


def test_a_lost_claim_log_stops_every_writer(table: str, sample_archive: Path, capsys):
    shutil.rmtree(Path(table) / COMMITS_TABLE)
    assert main(["check", table, "--quiet"]) == 5
    assert "no _commits log" in capsys.readouterr().out
    with pytest.raises(TableCorruptError, match="no _commits log"):
        run_encode(str(sample_archive), table, EncodeOptions(engine="local", progress=False))


def test_a_log_whose_statistics_no_longer_bound_its_file_is_a_problem(table: str, capsys):
    newest = _log_files(table, "basic")[0 if len(_log_files(table, "basic")) == 1 else 1]
    lines = []
    for line in newest.read_text().splitlines():
        action = json.loads(line)
        if "add" in action and action["add"].get("stats"):
            stats = json.loads(action["add"]["stats"])
            stats["maxValues"]["face_id"] = "0"  # a reader looking for any real id would now skip this file
            action["add"]["stats"] = json.dumps(stats)
        lines.append(json.dumps(action))
    newest.write_text("\n".join(lines) + "\n")
    assert main(["check", table, "--quiet"]) == 5
    assert "above the maximum '0' its log records" in capsys.readouterr().out


def test_a_byte_flipped_anywhere_in_any_committed_file_is_reported(table: str):
    """100 random single-byte flips across every committed data file of every family (the claim log's too)."""
    t = Table(table)
    by_family = {}
    for family in (*ALL_FAMILIES, COMMITS_TABLE):
        if (dt := t.delta(family)) is not None:
            by_family[family] = [Path(table) / family / p for p in add_actions(dt).column("path").to_pylist()]
    families = sorted(by_family)
    committed = [p for paths in by_family.values() for p in paths]
    rng = random.Random(33)
    missed = []
    for i in range(100):
        path = rng.choice(by_family[families[i % len(families)]])  # every family's files, in turn
        body = bytearray(path.read_bytes())
        at = rng.randrange(len(body))
        body[at] ^= 1 << rng.randrange(8)
        original = path.read_bytes()
        path.write_bytes(bytes(body))
        try:
            report = check_table(table, progress=False)
            if not any(path.name in p for p in report.problems):  # reported, and as that file
                missed.append(f"{path.parent.name}/{path.name}@{at}")
        finally:
            path.write_bytes(original)
    assert not missed
    assert len({p.parent.name for p in committed}) == len([f for f in (*ALL_FAMILIES, COMMITS_TABLE) if t.delta(f) is not None])
    assert check_table(table, progress=False).healthy  # every flip was undone: the problems were the flips


def test_repair_names_files_written_without_a_digest_after_theirs(table: str):
    t = Table(table)
    t.delta("basic").optimize.compact()  # Delta's own compaction, as Spark or delta-rs would run it: no digest in the names
    report = check_table(table, progress=False)
    assert report.healthy and report.undigested
    before = _faces(table)
    repaired = check_table(table, repair=True, progress=False)
    assert repaired.healthy and any("named" in r for r in repaired.repaired) and not repaired.undigested
    assert all(recorded_digest(p) for p in add_actions(t.delta("basic")).column("path").to_pylist())
    assert _faces(table) == before and len(read_family(t, "basic", columns=["face_id"])) == before


def test_a_damaged_heavy_family_does_not_stop_what_does_not_need_it(table: str, tmp_path: Path, capsys):
    faces = _faces(table)
    newest = _log_files(table, "residual")[-1]
    newest.write_text("{not json")
    assert _faces(table) == faces  # the base family and the index still serve
    assert main(["decode", table, "--where", "true", "--upto", "middle", "--out", str(tmp_path / "middle")]) == 0
    assert len(list((tmp_path / "middle").glob("*_middle.png"))) == faces
    capsys.readouterr()
    assert main(["decode", table, "--where", "true", "--upto", "residual", "--out", str(tmp_path / "residual")]) in (2, 4)
    err = capsys.readouterr().err
    assert "TableCorruptError" in err and "residual" in err and "Traceback" not in err
    with pytest.raises(TableCorruptError, match="residual"):
        run_encode(str(tmp_path), table, EncodeOptions(engine="local", progress=False))  # nothing is written to a damaged table


@pytest.mark.slow
def test_a_bit_flipped_in_a_delta_log_is_reported_or_changes_no_answer(table: str):
    """100 random bit flips across every family's Delta log files: `check` reports the flip, or every
    query below answers as before (a flip in a timestamp, or one that loosens a bound); never a
    silently different answer, never a traceback."""
    sqls = ["select count(*), sum(hash(face_id)) from faces", "select count(*), sum(hash(face_id)), sum(age), sum(hash(identity)) from basic",
            "select count(*), sum(hash(source_uri)) from inputs", "select count(*) from rejects"]

    def answers() -> list:
        out = []
        for sql in sqls:
            try:
                out.append(run_query(table, sql).table.to_pylist())
            except TableCorruptError as exc:  # typed: a reader is told, not misled
                out.append(type(exc).__name__)
        return out

    truth = answers()
    logs = [p for p in Path(table).rglob("*") if "_delta_log" in p.parts and p.is_file()]
    rng = random.Random(7)
    silent = []
    for _ in range(100):
        path = rng.choice(logs)
        original = path.read_bytes()
        body = bytearray(original)
        at = rng.randrange(len(body))
        body[at] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(body))
        try:
            if check_table(table, progress=False).healthy and (got := answers()) != truth and not any(isinstance(g, str) for g in got):
                silent.append(f"{path.relative_to(table)}@{at}: {original[max(0, at - 20):at + 20]!r}")
        finally:
            path.write_bytes(original)
    assert not silent
