"""File and member names that are not UTF-8 are inputs like any other, never a crashed run.

POSIX names are bytes: a latin-1 ``café.jpg`` reaches Python surrogate-escaped (PEP 383), and a
tar written by an old tool stores latin-1 member names. The tables keep valid UTF-8 text for the
name (``\\xNN`` escapes) and the raw bytes beside it, so the file can be found again.
"""
from __future__ import annotations

import io
import os
import shutil
import tarfile
from pathlib import Path

import pytest
from facetier.io.reader import read_family
from facetier.io.sources import SourceRef, key_bytes, list_sources, read_source, storable_uri
from facetier.io.table import Table
from facetier.pipelines.jobs.decode import run_decode
from facetier.pipelines.jobs.encode import EncodeOptions, plan_shards, run_encode

LATIN1_NAME = b"caf\xe9-photo.jpg"


@pytest.fixture()
def odd_names(sample_archive: Path, tmp_path: Path) -> Path:
    faces = sorted(sample_archive.glob("generated-*.jpg"))
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(faces[0], os.fsencode(src) + b"/" + LATIN1_NAME)  # a name that is not UTF-8
    shutil.copy(faces[1], src / "plain.jpg")
    with tarfile.open(src / "old-tool.tar", "w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tf:
        data = faces[2].read_bytes()
        info = tarfile.TarInfo("jos\xe9/portrait.jpg")  # stored as latin-1 bytes
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    (src / "missing.txt").write_bytes(b"/nowhere/\xff\xfe.jpg\n")  # a list line that is not UTF-8 either
    return src


def test_storable_uri_keeps_text_valid_and_bytes_recoverable():
    key = os.fsdecode(b"/data/" + LATIN1_NAME)
    text, raw = storable_uri(key)
    assert text == "/data/caf\\xe9-photo.jpg" and raw == b"/data/" + LATIN1_NAME
    assert os.fsdecode(raw) == key and text.encode("utf-8")
    assert storable_uri("/data/café.jpg") == ("/data/café.jpg", None)
    lone = "/data/\ud800.jpg"  # not an escaped byte: a hand-written surrogate
    assert storable_uri(lone)[0].encode("utf-8") and key_bytes(lone)


def test_names_that_are_not_utf8_are_listed_read_planned_and_encoded(odd_names: Path, tmp_path: Path):
    keys = [r.key for r in list_sources(str(odd_names))]
    assert any(k.endswith("caf\udce9-photo.jpg") for k in keys)
    member = next(k for k in keys if "old-tool.tar!" in k)
    assert read_source(SourceRef.parse(member)) and plan_shards(keys, "w", 2)
    root = str(tmp_path / "table")
    summary = run_encode(str(odd_names), root, EncodeOptions(engine="local", shard_size=2, progress=False))
    assert summary.balanced and summary.faces == 3 and summary.inputs == 4, summary.render()
    faces = read_family(Table(root), "faces").to_pylist()
    latin = next(f for f in faces if f["source_uri_raw"] is not None and f["source_uri_raw"].endswith(LATIN1_NAME))
    assert "caf\\xe9-photo.jpg" in latin["source_uri"]
    assert Path(os.fsdecode(latin["source_uri_raw"])).read_bytes()  # the raw name opens the very file
    assert next(f for f in faces if f["source_uri"].endswith("plain.jpg"))["source_uri_raw"] is None
    # the list line that is not UTF-8: listed, rejected as unreadable, stored with valid text
    missing = str(odd_names / "missing.txt")
    again = run_encode(missing, root, EncodeOptions(engine="local", progress=False))
    assert again.balanced and again.rejected == 1
    rejects = read_family(Table(root), "rejects").to_pylist()
    assert any(r["source_uri_raw"] == b"/nowhere/\xff\xfe.jpg" and r["error_class"] == "SourceReadError" for r in rejects)
    decoded = run_decode(root, [latin["photo_id"]], "original", str(tmp_path / "out"))
    assert decoded.files and Path(decoded.files[0].path).read_bytes() == Path(os.fsdecode(latin["source_uri_raw"])).read_bytes()
