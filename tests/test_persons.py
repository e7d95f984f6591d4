"""Who is in the archive: descriptors in the base family, the identity index, search through it, persons."""
from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from facetier.io import derived
from facetier.io.derived import INDEX_KIND, PERSONS_KIND
from facetier.io.reader import read_family
from facetier.io.table import Table
from facetier.pipelines.jobs.analytics import run_query
from facetier.pipelines.jobs.check import check_table
from facetier.pipelines.jobs.encode import EncodeOptions, run_encode
from facetier.pipelines.jobs.identity_index import build_index
from facetier.pipelines.jobs.identity_search import search
from facetier.pipelines.jobs.maintenance import vacuum
from facetier.pipelines.jobs.persons import ClusterOptions, cluster, persons_rows
from PIL import Image

from facetier.errors import ConfigError

# faces the embedded prior generates are closer to each other than real people are (0.36-0.64 apart;
# a copy of one, shrunk and re-compressed, lies within 0.2 of it): the tests' same-person distance
SAME = 0.25
OPTS = EncodeOptions(engine="local", shard_size=3, layers=("basic",), progress=False)


def _copies(sample_archive: Path, out: Path) -> dict[str, str]:
    """Each good sample photo, and a second photo of the same face (shrunk, JPEG at another quality):
    file name -> the person it shows."""
    out.mkdir()
    person = {}
    good = sorted(p for p in sample_archive.iterdir() if p.name.startswith("generated"))
    for k, p in enumerate(good):
        shutil.copy(p, out / p.name)
        img = Image.open(p).convert("RGB")
        buf = io.BytesIO()
        img.resize((int(img.width * 0.85), int(img.height * 0.85))).save(buf, "JPEG", quality=70)
        (out / f"again-{p.stem}.jpg").write_bytes(buf.getvalue())
        person[p.name] = person[f"again-{p.stem}.jpg"] = f"person{k}"
    return person


@pytest.fixture(scope="module")
def people(sample_archive: Path, tmp_path_factory) -> tuple[str, Path, dict[str, str]]:
    base = tmp_path_factory.mktemp("persons")
    truth = _copies(sample_archive, base / "photos")
    root = str(base / "table")
    run_encode(str(base / "photos"), root, OPTS)
    return root, base / "photos", truth


def _names(root: str) -> dict[str, str]:
    rows = read_family(Table(root), "faces", columns=["face_id", "source_uri", "face_index"]).to_pylist()
    return {r["face_id"]: Path(r["source_uri"]).name for r in rows if r["face_index"] == 0}


def test_every_face_stores_its_descriptor_at_one_fixed_step(people):
    root, _, truth = people
    rows = run_query(root, "select face_id, descriptor from basic").table.to_pylist()
    assert len(rows) >= len(truth) and all(len(r["descriptor"]) == 128 and max(map(abs, r["descriptor"])) <= 127 for r in rows)


def test_search_through_the_index_answers_as_the_scan_does(people):
    root, _, _ = people
    face = sorted(_names(root))[0]
    scanned = search(root, face, k=4, use_index=False)
    assert "scanning" in scanned.method and "no identity index" not in scanned.method
    assert "no identity index" in search(root, face, k=4).method  # none built yet: a scan, and it says so
    report = build_index(root, progress=False)
    assert report.rebuilt and report.faces == len(_names(root)) + 0 * report.lists
    indexed = search(root, face, k=4)
    assert indexed.method.startswith("identity index generation 1")
    assert indexed.table.column("face_id").to_pylist() == scanned.table.column("face_id").to_pylist()
    np.testing.assert_allclose(indexed.table.column("distance").to_numpy(), scanned.table.column("distance").to_numpy(), atol=1e-5)
    assert indexed.table.column("age").to_pylist() == scanned.table.column("age").to_pylist()
    assert build_index(root, progress=False).up_to_date


def test_within_returns_every_face_of_the_person_and_where_restricts(people):
    root, _, truth = people
    build_index(root, progress=False)
    names = _names(root)
    face = next(f for f, n in names.items() if n.startswith("again-"))
    same = {f for f, n in names.items() if truth.get(n) == truth[names[face]] and f != face}
    got = search(root, face, within=SAME)
    assert set(got.table.column("face_id").to_pylist()) == same
    assert set(search(root, face, within=SAME, use_index=False).table.column("face_id").to_pylist()) == same
    none = search(root, face, within=SAME, where="age < -1000")
    assert none.table.num_rows == 0
    with pytest.raises(ConfigError):
        search(root, face, within=float("nan"))


def test_a_stale_index_is_never_used_silently_and_an_update_adds_only_the_new(people, sample_archive, tmp_path):
    root, photos, _ = people
    build_index(root, progress=False)
    before = len(_names(root))
    extra = tmp_path / "more"
    extra.mkdir()
    img = Image.open(next(p for p in sorted(photos.iterdir()) if p.name.startswith("generated"))).convert("RGB")
    img.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(extra / "mirrored.png")
    shutil.copytree(photos, tmp_path / "all")
    shutil.copy(extra / "mirrored.png", tmp_path / "all" / "mirrored.png")
    run_encode(str(tmp_path / "all"), root, OPTS)
    face = sorted(_names(root))[0]
    stale = search(root, face, k=2)
    assert "not" in stale.method and "scanning" in stale.method  # covers an older version: a scan, and it says so
    report = build_index(root, progress=False)
    assert not report.rebuilt and report.added == len(_names(root)) - before and report.removed == 0
    assert search(root, face, k=2).method.startswith(f"identity index generation {report.generation}")
    # one face more: a small delta beside the base, which stays as it was (not the whole index again)
    gens = derived.generations(Table(root), INDEX_KIND)
    assert set(gens[-1].files) == {"index", "faces", "added", "removed"} and gens[-1].files["index"] == gens[-2].files["index"]
    assert search(root, face, k=4).table.column("face_id").to_pylist() == search(root, face, k=4, use_index=False).table.column("face_id").to_pylist()


def test_compaction_moves_faces_between_files_and_the_index_follows(people):
    root, _, _ = people
    build_index(root, progress=False)
    face = sorted(_names(root))[0]
    want = search(root, face, k=3, use_index=False).table.column("face_id").to_pylist()
    vacuum(Table(root), compact=True, retention_hours=1e6)
    report = build_index(root, progress=False)
    assert report.removed == report.added > 0 and report.faces == len(_names(root))
    got = search(root, face, k=3)
    assert got.method.startswith("identity index") and got.table.column("face_id").to_pylist() == want


def test_encode_can_bring_the_index_up_to_date_right_after_its_commit(people, tmp_path):
    from dataclasses import replace

    _, photos, _ = people
    root = str(tmp_path / "table")
    s = run_encode(str(photos), root, replace(OPTS, update_index=True))
    assert any(n.startswith("identity index generation 1 built") for n in s.notes)
    face = sorted(_names(root))[0]
    assert search(root, face, k=2).method.startswith("identity index generation 1")


def test_a_delta_generation_takes_faces_out_and_in_as_a_full_one_would(people, monkeypatch, tmp_path):
    from facetier.pipelines.jobs import identity_index

    root = str(tmp_path / "copy")
    shutil.copytree(people[0], root)
    build_index(root, rebuild=True, progress=False)
    face = sorted(_names(root))[0]
    want = search(root, face, k=5, use_index=False).table.column("face_id").to_pylist()
    monkeypatch.setattr(identity_index, "DELTA_FRACTION", 10.0)  # every change a delta, however large
    vacuum(Table(root), compact=True, retention_hours=1e6)  # every face leaves its file and comes back in another
    report = build_index(root, progress=False)
    assert report.removed == report.added == len(_names(root))
    gen = derived.latest(Table(root), INDEX_KIND)
    assert "removed" in gen.files and gen.rows == len(_names(root))
    got = search(root, face, k=5)
    assert got.method.startswith(f"identity index generation {gen.number}") and got.table.column("face_id").to_pylist() == want
    monkeypatch.setattr(identity_index, "DELTA_FRACTION", 0.0)  # the next change rewrites the whole index, deltas folded in
    vacuum(Table(root), compact=True, retention_hours=1e6)
    build_index(root, progress=False)
    assert set(derived.latest(Table(root), INDEX_KIND).files) == {"index", "faces"}
    assert search(root, face, k=5).table.column("face_id").to_pylist() == want


def test_cluster_finds_the_persons_and_keeps_their_ids(people, tmp_path):
    root, photos, truth = people
    first = cluster(root, ClusterOptions(threshold=SAME, progress=False))
    names = _names(root)
    t = Table(root)
    person = {r["face_id"]: r["person_id"] for r in persons_rows(t, t.version()).to_pylist()}
    by_truth: dict[str, set[int]] = {}
    for fid, name in names.items():
        if name in truth:
            by_truth.setdefault(truth[name], set()).add(person[fid])
    assert all(len(ids) == 1 for ids in by_truth.values())  # both photos of a person, one id
    assert len({next(iter(ids)) for ids in by_truth.values()}) == len(by_truth)  # different people, different ids
    assert cluster(root, ClusterOptions(threshold=SAME, progress=False)).generation == first.generation  # nothing new: no new generation
    # SQL over persons with the other families
    rows = run_query(root, "select person_id, count(*) n from persons group by 1 order by 2 desc, 1").table.to_pylist()
    assert sum(r["n"] for r in rows) == len(person)
    # a third photo of one person joins its person; ids elsewhere stay as they were
    face0 = next(n for n in sorted(truth) if n.startswith("generated"))
    again = tmp_path / "again"
    shutil.copytree(photos, again)
    Image.open(photos / face0).convert("RGB").save(again / "third.png")
    run_encode(str(again), root, OPTS)
    step = cluster(root, ClusterOptions(threshold=SAME, progress=False))
    assert not step.full and step.new_faces == 1 and step.joined == 1 and step.new_persons == 0
    after = {r["face_id"]: r["person_id"] for r in persons_rows(t, t.version()).to_pylist()}
    assert all(after[f] == p for f, p in person.items())
    third = next(f for f, n in _names(root).items() if n == "third.png")
    assert after[third] == person[next(f for f, n in names.items() if n == face0)]
    full = cluster(root, ClusterOptions(threshold=SAME, full=True, progress=False))
    assert full.full and {r["face_id"]: r["person_id"] for r in persons_rows(t, t.version()).to_pylist()} == after
    # persons as of an older version: the clustering computed then
    assert persons_rows(t, first.table_version).num_rows == first.faces


def test_check_verifies_the_generations_and_vacuum_keeps_the_newest(people):
    root, _, _ = people
    build_index(root, progress=False)
    cluster(root, ClusterOptions(threshold=SAME, progress=False))
    t = Table(root)
    report = check_table(root, progress=False)
    assert report.healthy and any(d.startswith("identity-index") and d.endswith("current") for d in report.derived)
    vacuum(t, retention_hours=0)
    for kind in (INDEX_KIND, PERSONS_KIND):
        assert derived.removable(t, kind, 0) == ([], [])
        assert not derived.verify(t, derived.latest(t, kind))
    gen = derived.latest(t, INDEX_KIND)
    path = Path(t._p(gen.files["index"]))
    body = bytearray(path.read_bytes())
    body[len(body) // 2] ^= 0x10
    path.write_bytes(bytes(body))
    damaged = check_table(root, progress=False)
    assert not damaged.healthy and any("identity-index" in p and "SHA-256" in p for p in damaged.problems)
    face = sorted(_names(root))[0]
    fallback = search(root, face, k=2)  # the base family still answers
    assert "damaged" in fallback.method and fallback.table.num_rows == 2
    assert build_index(root, progress=False).rebuilt
    assert check_table(root, progress=False).healthy


def test_the_scale_bench_measures_a_real_index(tmp_path):
    from facetier.pipelines.evaluation.persons_scale import bench_persons, synthetic

    codes, labels = synthetic(2000, seed=1)
    same = labels[:200, None] == labels[None, :200]
    d = np.linalg.norm((codes[:200, None].astype(np.float32) - codes[None, :200]) * 0.005, axis=2)
    assert 0.35 < np.median(d[same & ~np.eye(200, dtype=bool)]) < 0.55 < 0.7 < np.median(d[~same]) < 0.95
    row = bench_persons((30_000,), queries=40, cluster_upto=30_000, report=str(tmp_path / "r.json"))[0]
    assert row.lists > 0 and row.recall_at_10 >= 0.9 and row.cluster_s is not None and (tmp_path / "r.json").exists()


@pytest.mark.shared_data
def test_persons_on_real_faces_come_out_as_dlibs_do(shared_data, tmp_path):
    from facetier.pipelines.evaluation.persons_eval import evaluate_persons

    r = evaluate_persons(shared_data / "lfw", limit=60, thresholds=(0.52,), dlib_thresholds=(0.45,), report=str(tmp_path / "p.json"), progress=False)
    assert r.photos == 60 and r.facetier_default.pair_precision >= 0.9
    assert r.facetier_default.bcubed_f >= r.dlib[0].bcubed_f - 0.05


def test_the_neighbour_graph_on_ray_and_beam_gives_the_persons_the_local_engine_does(people, monkeypatch):
    import ray
    from facetier.pipelines.jobs import neighbour_graph

    monkeypatch.setattr(neighbour_graph, "ROWS_PER_SLICE", 5)  # several slices, the last one shorter
    root, _, _ = people
    t = Table(root)
    local = cluster(root, ClusterOptions(threshold=SAME, full=True, progress=False))
    want = {r["face_id"]: r["person_id"] for r in persons_rows(t, t.version()).to_pylist()}
    try:
        for engine in ("beam", "ray"):
            got = cluster(root, ClusterOptions(threshold=SAME, full=True, engine=engine, progress=False))
            assert got.generation > local.generation and got.persons == local.persons
            assert {r["face_id"]: r["person_id"] for r in persons_rows(t, t.version()).to_pylist()} == want
    finally:
        ray.shutdown()
    assert not t.fs.exists(t._p("_derived/_work")) or not t.fs.ls(t._p("_derived/_work"))  # Beam's job folder is gone


def _blob(rng: np.random.Generator, first: int, size: int, distance: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each of ``size`` faces linked to 32 others of its person: what a nearest-neighbour graph gives a person with many photos."""
    a = np.repeat(np.arange(first, first + size), 32)
    b = first + rng.integers(0, size, len(a))
    keep = a != b
    return a[keep], b[keep], np.full(int(keep.sum()), distance, np.float32)


def test_leiden_keeps_a_person_with_many_photos_whole_and_cuts_a_thin_chain():
    from facetier.pipelines.jobs.neighbour_graph import Edges
    from facetier.pipelines.jobs.persons import leiden

    rng = np.random.default_rng(0)
    big, small = _blob(rng, 0, 2000, 0.30), _blob(rng, 2000, 40, 0.30)
    chain = (np.array([0, 1, 2]), np.array([2000, 2001, 2002]), np.full(3, 0.40, np.float32))  # three stray links between them
    edges = Edges(*(np.concatenate(parts) for parts in zip(big, small, chain))).undirected()
    labels = leiden(2040, edges, ClusterOptions())
    assert len(set(labels[:2000])) == 1 and len(set(labels[2000:])) == 1 and labels[0] != labels[2000]
    # without the node weights CPM's penalty, quadratic in size, cuts the big person into pieces
    assert len(set(leiden(2040, edges, ClusterOptions(linear_above=10**9))[:2000])) > 1


def test_new_faces_join_the_person_they_are_linked_to_most_and_strangers_stay_apart():
    from facetier.pipelines.jobs.persons import join_existing

    labels = np.array([7, 7, 7, 9, 9, 100, 101, 102])  # 0-4: existing persons 7 and 9; 5-7: new clusters
    a = np.array([5, 5, 5, 6, 7])
    b = np.array([0, 1, 3, 4, 3])
    w = np.array([0.6, 0.5, 0.4, 0.9, 0.1])  # 5: 1.1 to person 7, 0.4 to 9; 6: 0.9 to 9; 7: one weak link
    got = join_existing(labels, a, b, w, 0.5, np.arange(5))
    assert got.tolist() == [7, 7, 7, 9, 9, 7, 9, 102]
