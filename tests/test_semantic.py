"""The semantic base layer: attribute columns, projection-only queries, identity search, edits."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from facetier.codec.semantic import parse_edits
from facetier.io.reader import ByteCounter, read_family
from facetier.io.table import Table
from facetier.pipelines.jobs.identity_search import search
from facetier.pipelines.jobs.edit import edit
from facetier.pipelines.jobs.analytics import run_query
from facetier.pipelines.jobs.encode import EncodeOptions, run_encode
from facetier.pipelines.evaluation.semantic_base import replicate_base_rows
from PIL import Image

from facetier.errors import ConfigError


@pytest.fixture(scope="module")
def table(sample_archive: Path, tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("sem") / "table")
    run_encode(str(sample_archive), root, EncodeOptions(engine="local", shard_size=4, progress=False))
    return root


def test_tiny_codec_attributes_are_read_from_the_tied_coordinates(tiny_codec):
    rng = np.random.default_rng(3)
    codes = tiny_codec.encode_crops(rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8))
    base = tiny_codec.base_codes(codes)
    cols = tiny_codec.describe(codes)
    cfg = tiny_codec.semantic.cfg
    age, gender = cfg.attribute("age"), cfg.attribute("gender")
    for b, c in zip(base, cols):
        assert c["age"] == pytest.approx(age.offset + age.scale * b[age.coords[0]], abs=1e-4)
        assert c["p_female"] == pytest.approx(1 / (1 + np.exp(-gender.scale * b[gender.coords[0]])), abs=1e-5)
        assert c["gender"] == ("female" if c["p_female"] >= 0.5 else "male")
        assert len(c["identity"]) == 128


def test_edits_move_exactly_their_coordinates(tiny_codec):
    sem = tiny_codec.semantic
    base = np.zeros((2, sem.cfg.code_dim))
    base[:, 0] = [3.0, -2.0]
    out = sem.edit(base, {"age": "+10", "smile": "1.0", "gender": "female", "race": "asian"})
    attrs = sem.attributes(out)
    np.testing.assert_allclose(attrs["age"], sem.attributes(base)["age"] + 10, atol=1e-4)
    np.testing.assert_allclose(attrs["smile"], 1.0, atol=1e-5)
    assert list(attrs["gender"]) == ["female", "female"] and np.all(attrs["p_female"] > 0.95)
    assert list(attrs["race"]) == ["asian", "asian"]
    untouched = [c for c in range(sem.cfg.code_dim) if c not in {0, 1, 4, 11}]
    np.testing.assert_array_equal(out[:, untouched], base[:, untouched])


@pytest.mark.parametrize("bad", [{"height": "+3"}, {"age": "old"}, {"gender": "1.5"}, {"race": "martian"}])
def test_bad_edits_are_config_errors(tiny_codec, bad):
    with pytest.raises(ConfigError):
        tiny_codec.semantic.edit(np.zeros((1, tiny_codec.semantic.cfg.code_dim)), bad)


def test_parse_edits():
    assert parse_edits(["age=+10", "smile = 1.0"]) == {"age": "+10", "smile": "1.0"}
    with pytest.raises(ConfigError):
        parse_edits(["age"])


def test_base_family_holds_typed_attribute_columns(table):
    rows = read_family(Table(table), "basic").to_pylist()
    assert len(rows) == 6
    for r in rows:
        assert 0 < r["age"] < 120 and r["gender"] in ("male", "female") and r["race"]
        assert len(r["identity"]) == 128 and all(np.isfinite(r["identity"]))


def test_attribute_query_reads_only_the_columns_it_names(table, tmp_path):
    res = run_query(table, "SELECT gender, count(*) AS n, avg(age) AS mean_age FROM basic GROUP BY gender")
    assert sum(res.table.column("n").to_pylist()) == 6
    # at a realistic size (files far above the footer read), the payload and identity columns stay unread
    rng = np.random.default_rng(0)
    rows = [{**r, "identity": rng.integers(-127, 128, 128).tolist()} for r in read_family(Table(table), "basic").to_pylist() for _ in range(500)]
    replicate_base_rows(rows, 20_000, tmp_path / "big", shards=2)
    big = run_query(str(tmp_path / "big"), "SELECT gender, count(*) AS n, avg(age) AS mean_age FROM basic GROUP BY gender")
    assert sum(big.table.column("n").to_pylist()) == 20_000
    whole = ByteCounter()
    read_family(Table(str(tmp_path / "big")), "basic", counter=whole)
    assert 0 < big.bytes_read < whole.total / 10


def test_referenced_columns_is_a_superset_and_expands_star():
    from facetier.io.table import BASE_SCHEMA
    from facetier.pipelines.jobs.analytics import referenced_columns

    assert referenced_columns("select count(*), avg(AGE) from basic where smile > 1", BASE_SCHEMA) == ["age", "smile"]
    assert referenced_columns("select * from basic", BASE_SCHEMA) == BASE_SCHEMA.names
    assert referenced_columns("select b.* from basic b", BASE_SCHEMA) == BASE_SCHEMA.names


def test_search_by_face_id_and_by_image(table, sample_archive):
    faces = sorted(r["face_id"] for r in read_family(Table(table), "basic", columns=["face_id"]).to_pylist())
    res = search(table, faces[0], k=3, device="cpu")
    got = res.table.to_pylist()
    assert len(got) == 3 and faces[0] not in {r["face_id"] for r in got}
    assert [r["rank"] for r in got] == [1, 2, 3]
    assert all(a["distance"] <= b["distance"] for a, b in zip(got, got[1:]))
    # a face searched by its own photo finds itself first, at (almost) zero distance
    src = read_family(Table(table), "faces", columns=["face_id", "source_uri"]).to_pylist()
    one = next(r for r in src if r["face_id"].endswith("-0") and "!" not in r["source_uri"])
    top = search(table, one["source_uri"], k=1, device="cpu").table.to_pylist()[0]
    assert top["face_id"] == one["face_id"] and top["distance"] < 1e-3


def test_search_scans_in_slices_within_its_limits(table, monkeypatch):
    """However large the table, the scan holds one slice of rows at a time and the best k so far: the
    ranking is the one a single pass over every row gives, and a scan past its time is a typed error."""
    from facetier.pipelines.jobs import identity_search
    from facetier.pipelines.jobs.analytics import QueryLimits

    from facetier.errors import QueryLimitError

    faces = sorted(r["face_id"] for r in read_family(Table(table), "basic", columns=["face_id"]).to_pylist())
    whole = search(table, faces[0], k=4, device="cpu").table.to_pylist()
    monkeypatch.setattr(identity_search, "_rows_per_slice", lambda limits: 2)
    assert search(table, faces[0], k=4, device="cpu").table.to_pylist() == whole
    with pytest.raises(QueryLimitError, match="time limit"):
        search(table, faces[0], k=4, device="cpu", limits=QueryLimits(seconds=1e-9))


def test_search_rejects_an_unknown_query(table):
    with pytest.raises(ConfigError):
        search(table, "no-such-face-or-file.jpg", k=3, device="cpu")


def test_edit_writes_images_and_rows(table, tmp_path):
    res = edit(table, "age > 0", {"age": "+10"}, str(tmp_path / "png"), device="cpu", limit=2)
    assert res.edited == 2 and all(Image.open(p).size == (128, 128) for p in res.outputs)
    before = {r["face_id"]: r["age"] for r in run_query(table, "SELECT face_id, age FROM basic").table.to_pylist()}
    out = str(tmp_path / "edited")
    res = edit(table, "age > 0", {"age": "+10"}, out, as_table=True, device="cpu")
    assert res.edited == 6 and res.table_version == 1
    rows = run_query(out, "SELECT faces.source_uri, basic.age FROM basic JOIN faces USING (face_id)").table.to_pylist()
    assert len(rows) == 6
    for r in rows:
        src = r["source_uri"].split("edit:")[1].split("?")[0]
        assert r["age"] == pytest.approx(before[src] + 10, abs=1.01)  # re-coding may move age by one quantisation step


def test_a_base_family_written_without_attribute_columns_reads_as_nulls(tmp_path):
    import pyarrow as pa
    from facetier.io.commit import commit
    from facetier.io.table import LAYER_SCHEMA, ShardEntry

    t = Table(str(tmp_path / "old"))
    old = pa.Table.from_pydict({"face_id": ["a-0"], "photo_id": ["a"], "payload": [b"x"], "nbytes": [1], "crc32": [0]}, schema=LAYER_SCHEMA)
    path, nbytes, stats = t.write_family("basic", "s1", old, "old", "old")
    commit(t, 0, [ShardEntry("s1", "old", "old", {"basic": path}, {"basic": 1}, {"basic": nbytes}, ("a",), {}, {"basic": stats})])
    rows = read_family(t, "basic", columns=["face_id", "age", "identity"]).to_pylist()
    assert rows == [{"face_id": "a-0", "age": None, "identity": None}]
    with pytest.raises(ValueError, match="no columns"):  # the caller's mistake, not a damaged file
        read_family(t, "basic", columns=["no_such_column"])


def test_descriptors_from_the_cpu_stage_give_the_same_bytes(embedded_codec, generated_faces):
    from facetier.codec.face_descriptor import FaceDescriptor

    crops = generated_faces[:2]
    inside = embedded_codec.encode_crops(crops, layers=["basic", "middle"])
    cpu_stage = FaceDescriptor(embedded_codec.semantic.cfg.descriptor, embedded_codec.config.alignment.crop_scale)
    prepared = embedded_codec.encode_crops(crops, layers=["basic", "middle"], descriptors=cpu_stage.embed_crops(crops))
    assert [c.layers for c in inside] == [c.layers for c in prepared]


def test_only_the_redetecting_descriptor_runs_on_the_cpu_stage(sample_archive, embedded_codec):
    """dlib-resnet-v1 re-detects the face on the CPU stage; the fixed-chip descriptor is batched with the encoder."""
    from dataclasses import replace

    from facetier.codec.face_descriptor import DETECTED_CHIP_ID, FIXED_CHIP_ID
    from facetier.pipelines.jobs.records import JobContext
    from facetier.pipelines.jobs.shard_worker import FacePreparer

    cfg = embedded_codec.config
    ctx = JobContext("unused", "", cfg.codec_id, embedded_codec.weights_hash, cfg.alignment, ("basic",), descriptor=DETECTED_CHIP_ID)
    items = FacePreparer(ctx).prepare("s", str(sample_archive / "generated-000.jpg"))
    assert [i["kind"] for i in items] == ["face"] and items[0]["descriptor"].shape == (128,)
    assert items[0]["times"]["descriptor"] > 0
    items = FacePreparer(replace(ctx, descriptor=FIXED_CHIP_ID)).prepare("s", str(sample_archive / "generated-000.jpg"))
    assert items[0]["descriptor"] is None