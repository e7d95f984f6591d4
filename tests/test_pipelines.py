"""The encode job end to end: engines, rejects accounting, incremental runs, resume, races, queries."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable
from facetier.io.commit import commit
from facetier.io.reader import family_files, read_family
from facetier.io.table import Table
from facetier.pipelines.jobs.analytics import run_query
from facetier.pipelines.jobs.decode import run_decode
from facetier.pipelines.jobs.encode import EncodeOptions, run_encode

from facetier.errors import ConcurrentCommitError, ConfigError
from tables import table_snapshot

EXPECTED_REJECTS = {"EmptyFileError", "NotAnImageError", "CorruptImageError", "NoFaceError", "ImageTooLargeError", "UnsafeMemberError"}


@pytest.fixture(scope="module")
def local_table(sample_archive: Path, tmp_path_factory) -> tuple[str, object]:
    root = str(tmp_path_factory.mktemp("t") / "table")
    summary = run_encode(str(sample_archive), root, EncodeOptions(engine="local", shard_size=3, progress=False))
    return root, summary


def test_every_bad_input_is_one_reject_and_nothing_is_lost(local_table):
    root, s = local_table
    assert s.inputs == 12
    assert s.inputs == s.encoded_inputs + s.rejected + s.skipped
    assert s.encoded_inputs == 6 and s.faces == 6
    assert set(s.rejects_by_class) == EXPECTED_REJECTS and all(v == 1 for v in s.rejects_by_class.values())
    rejects = read_family(Table(root), "rejects").to_pylist()
    assert len(rejects) == 6 and all(r["message"] for r in rejects)
    faces = read_family(Table(root), "faces").to_pylist()
    assert len({f["face_id"] for f in faces}) == 6


def test_parquet_metadata_and_no_nested_layers(local_table):
    root, _ = local_table
    t = Table(root)
    for fam in ("basic", "faces", "preview", "residual"):
        rel = family_files(t, fam, t.snapshot())[0]
        pf = pq.ParquetFile(t.fs.open(t._p(rel), "rb"))
        meta = pf.schema_arrow.metadata
        assert meta[b"facetier_family"] == fam.encode() and meta[b"facetier_schema_version"] == b"2"
        assert DeltaTable(t.delta_uri(fam)).version() >= 0  # every family is a Delta table any Delta reader opens
        assert pf.metadata.row_group(0).column(0).compression == "ZSTD"
        assert not any(str(f.type).startswith("struct") for f in pf.schema_arrow)


def test_layer_settings_are_encode_options_recorded_with_the_shard(local_table, sample_archive: Path, tmp_path: Path):
    root, _ = local_table
    low = str(tmp_path / "low")
    run_encode(str(sample_archive), low, EncodeOptions(engine="local", shard_size=12, progress=False, residual_quality=5, rung_bytes=(("preview", 90),),
                                                       layers=("basic", "middle", "enhanced", "preview", "residual")))

    def settings(root: str, family: str) -> set[str]:
        t = Table(root)
        return {pq.read_schema(t.fs.open(t._p(rel), "rb")).metadata[b"facetier_human_layers"].decode() for rel in family_files(t, family, t.snapshot())}

    (low_setting,), (default,) = settings(low, "residual"), settings(root, "residual")
    assert "preview ≤90 B" in low_setting and "q=5" in low_setting and "preview ≤150 B" in default and "q=60" in default
    assert settings(low, "preview") == {low_setting}
    assert Table(low).family_bytes()["residual"] < Table(root).family_bytes()["residual"]
    assert Table(low).family_bytes()["preview"] < Table(root).family_bytes()["preview"]
    with pytest.raises(ConfigError, match="outside 0-99"):
        run_encode(str(sample_archive), low, EncodeOptions(progress=False, residual_quality=100))
    with pytest.raises(ConfigError, match="byte budgets are for"):
        run_encode(str(sample_archive), low, EncodeOptions(progress=False, rung_bytes=(("residual", 900),)))


def test_base_only_query_reads_only_the_base_and_index(local_table):
    root, _ = local_table
    res = run_query(root, "select count(*) as n, sum(b.nbytes) as bytes from faces f join basic b using (face_id)")
    assert res.table.to_pylist()[0]["n"] == 6
    fam = Table(root).family_bytes()
    # small files: the footer read fetches most of a file, so bound by twice the two families
    assert res.bytes_read <= 2 * (fam["faces"] + fam["basic"])
    assert res.bytes_read < res.table_bytes / 2


def test_decode_each_prefix_and_the_original(local_table, tmp_path, sample_archive):
    root, _ = local_table
    faces = read_family(Table(root), "faces").to_pylist()
    fid = sorted(f["face_id"] for f in faces)[0]
    for upto in ("basic", "middle", "enhanced", "preview", "detail", "residual"):
        files = run_decode(root, [fid], upto, str(tmp_path), device="cpu").files
        assert len(files) == 1 and Path(files[0].path).exists() and files[0].generated
        assert files[0].layers_used[-1] == upto
    orig = run_decode(root, [fid.rsplit("-", 1)[0]], "original", str(tmp_path)).files
    src = next(f for f in faces if f["face_id"] == fid)["source_uri"]
    if "!" not in src:
        assert Path(orig[0].path).read_bytes() == Path(src).read_bytes()


def test_incremental_run_encodes_only_new_files(local_table, sample_archive, tmp_path):
    import shutil

    root, first = local_table
    again = run_encode(str(sample_archive), root, EncodeOptions(engine="local", shard_size=3, progress=False))
    assert again.faces == 0 and again.skipped == again.inputs and again.version == first.version
    grown = tmp_path / "grown"
    shutil.copytree(sample_archive, grown)
    shutil.copy(grown / "generated-000.jpg", grown / "zz-copy-of-000.jpg")  # same content: same photo id
    from PIL import Image

    img = Image.open(grown / "generated-001.jpg")
    img.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(grown / "zz-new.jpg", quality=90)
    root2 = str(tmp_path / "t2")
    run_encode(str(sample_archive), root2, EncodeOptions(engine="local", shard_size=3, progress=False))
    more = run_encode(str(grown), root2, EncodeOptions(engine="local", shard_size=3, progress=False))
    assert more.encoded_inputs == 1 and more.faces == 1
    assert more.inputs == more.encoded_inputs + more.rejected + more.skipped


def test_new_model_reencodes_older_rows(sample_archive, tmp_path, tiny_bundle):
    root = str(tmp_path / "t")
    run_encode(str(sample_archive), root, EncodeOptions(engine="local", shard_size=4, progress=False))
    old_hash = read_family(Table(root), "faces", columns=["weights_hash"]).column("weights_hash")[0].as_py()
    from facetier.codec.model import embedded_weights_path

    # a "new model version": the embedded weights with a refitted entropy stage would do; a tiny
    # model with the embedded alignment is enough to show the re-encode bookkeeping
    newer = tmp_path / "newer.safetensors"
    import shutil

    shutil.copy(embedded_weights_path(), newer)
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(newer), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(newer))
    tensors["latent_avg"] = tensors["latent_avg"] + 0.01
    meta.pop("weights_hash")
    save_file(tensors, str(newer), metadata=meta)
    s = run_encode(str(sample_archive), root, EncodeOptions(engine="local", shard_size=4, progress=False, weights=str(newer)))
    assert s.faces == 6 and s.replaced_older_faces == 6
    t = Table(root)
    hashes = set(read_family(t, "faces", columns=["weights_hash"]).column("weights_hash").to_pylist())
    hashes |= {h for h, p in zip(*(read_family(t, "rejects", columns=[c]).column(c).to_pylist() for c in ("weights_hash", "photo_id"))) if p}
    assert old_hash not in hashes and len(hashes) == 1
    for fam in ("basic", "middle", "enhanced", "residual", "original"):  # one row per face (photo) left in every family
        ids = read_family(t, fam, columns=["photo_id" if fam == "original" else "face_id"]).column(0).to_pylist()
        assert len(ids) == len(set(ids)) and len(ids) == (6 if fam != "original" else len({f.split("-")[0] for f in ids}))


def test_commit_race_has_one_winner(tmp_path):
    t = Table(str(tmp_path / "t"))
    commit(t, 0, [])
    with pytest.raises(ConcurrentCommitError):
        commit(t, 0, [])
    assert t.version() == 1


def test_two_concurrent_runs_leave_a_consistent_table(sample_archive, tmp_path):
    root = str(tmp_path / "race")
    errors, summaries = [], []

    def go() -> None:
        try:
            summaries.append(run_encode(str(sample_archive), root, EncodeOptions(engine="local", shard_size=2, progress=False)))
        except ConcurrentCommitError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=go) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(summaries) >= 1
    faces = read_family(Table(root), "faces").to_pylist()
    assert len(faces) == len({f["face_id"] for f in faces}) == 6


def test_batches_fill_across_shards_and_every_shard_is_written(sample_archive, tmp_path, local_table, monkeypatch):
    from facetier.pipelines.jobs import shard_worker

    faces_per_call: list[int] = []
    real = shard_worker.encode_items

    def counting(codec, items, *args):
        faces_per_call.append(sum(i["kind"] == "face" for i in items))
        return real(codec, items, *args)

    monkeypatch.setattr(shard_worker, "encode_items", counting)
    root = str(tmp_path / "across")
    s = run_encode(str(sample_archive), root, EncodeOptions(engine="local", shard_size=3, batch_size=4, progress=False))
    # 6 faces in 4 shards of 3 inputs: one full batch, then the job's last batch; no batch per shard tail
    assert faces_per_call == [4, 2]
    assert s.shards_run == 4 and s.inputs == s.encoded_inputs + s.rejected + s.skipped
    assert table_snapshot(root) == table_snapshot(local_table[0])


def test_the_model_loads_and_runs_on_the_thread_that_encodes(sample_archive, tmp_path, local_table, monkeypatch):
    """Built on one thread and called on another (as Ray Data does with an actor's UDF), a worker
    loads its codec on the calling thread: torch's parallel operators then keep one OpenMP team."""
    from concurrent.futures import ThreadPoolExecutor

    from facetier.pipelines.jobs import shard_worker

    threads: dict[str, str] = {}
    load, encode, run_many = shard_worker.load_worker_codec, shard_worker.encode_items, shard_worker.ShardWorker.run_many

    def loading(*args):
        threads["load"] = threading.current_thread().name
        return load(*args)

    def encoding(*args):
        threads["encode"] = threading.current_thread().name
        return encode(*args)

    def called_elsewhere(self, shards):
        assert "load" not in threads, "the worker loaded its model where it was built"
        with ThreadPoolExecutor(1, thread_name_prefix="engine-call") as calls:
            yield from calls.submit(lambda: list(run_many(self, shards))).result()

    monkeypatch.setattr(shard_worker, "load_worker_codec", loading)
    monkeypatch.setattr(shard_worker, "encode_items", encoding)
    monkeypatch.setattr(shard_worker.ShardWorker, "run_many", called_elsewhere)
    root = str(tmp_path / "elsewhere")
    run_encode(str(sample_archive), root, EncodeOptions(engine="local", progress=False))
    assert threads["load"].startswith("engine-call") and threads["encode"].startswith("engine-call")
    assert table_snapshot(root) == table_snapshot(local_table[0])


def test_killed_run_resumes_to_the_same_table(sample_archive, tmp_path, local_table):
    ref_root, _ = local_table
    root = str(tmp_path / "killed")
    code = (
        "from facetier.pipelines.jobs.encode import run_encode, EncodeOptions;"
        f"run_encode({str(sample_archive)!r}, {root!r}, EncodeOptions(engine='local', shard_size=3, batch_size=2, progress=False))"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    staging = Path(root) / "_staging"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(staging.glob("*.json"))) < 2:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not Table(root).exists(), "nothing may be visible before the commit"
    s = run_encode(str(sample_archive), root, EncodeOptions(engine="local", shard_size=3, batch_size=2, progress=False))
    assert s.shards_reused >= 1
    assert table_snapshot(root) == table_snapshot(ref_root)


def test_beam_gives_the_same_table(sample_archive, tmp_path, local_table):
    ref_root, _ = local_table
    root = str(tmp_path / "beam")
    s = run_encode(str(sample_archive), root, EncodeOptions(engine="beam", shard_size=3, progress=False))
    assert s.faces == 6 and s.rejected == 6
    assert table_snapshot(root) == table_snapshot(ref_root)


def test_ray_gives_the_same_table(sample_archive, tmp_path, local_table):
    ref_root, _ = local_table
    root = str(tmp_path / "ray")
    s = run_encode(str(sample_archive), root, EncodeOptions(engine="ray", shard_size=3, progress=False))
    assert s.faces == 6 and s.rejected == 6
    assert table_snapshot(root) == table_snapshot(ref_root)
    import ray

    ray.shutdown()


def test_ray_asks_for_gpus_from_the_cluster_not_the_driver():
    from facetier.pipelines.jobs.ray_engine import encoder_gpus

    assert encoder_gpus("auto", cluster_gpus=4) == 1.0  # the driver may be a CPU-only head
    assert encoder_gpus("cuda", cluster_gpus=0) == 0.0
    assert encoder_gpus("auto", cluster_gpus=0) == 0.0
    assert encoder_gpus("cpu", cluster_gpus=4) == 0.0
    assert encoder_gpus("auto", cluster_gpus=4, gpus_per_worker=0.5) == 0.5


def test_workers_sharing_this_machine_split_its_cores(monkeypatch):
    """Beam's local runner and a Ray started here give each encoder worker its share of the cores;
    workers on machines of their own (Dataflow, a Ray cluster) keep torch's default."""
    from facetier.pipelines.jobs import encode, records

    monkeypatch.setattr(records.os, "cpu_count", lambda: 8)
    assert encode._torch_threads(EncodeOptions(engine="beam", workers=2)) == 4
    assert encode._torch_threads(EncodeOptions(engine="ray", workers=1)) == 8  # Ray alone would give its actor one thread
    assert encode._torch_threads(EncodeOptions(engine="ray", workers=16)) == 1
    assert encode._torch_threads(EncodeOptions(engine="beam", workers=2, beam_args=("--runner=DataflowRunner",))) == 0
    assert encode._torch_threads(EncodeOptions(engine="ray", workers=2, ray_address="ray://head:10001")) == 0
    assert encode._torch_threads(EncodeOptions(engine="local")) == 0
