"""Stored bytes depend on the photos, never on how a job was cut (batch size, shard size, engine,
workers, threads), and across CPU kernel sets only as the README states (``cross_device``'s bounds)."""
from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from facetier.pipelines.evaluation.cross_device import KERNEL_SET_PIXEL_BOUND
from facetier.pipelines.jobs.encode import EncodeOptions, run_encode

from tables import differing_families, table_snapshot

PROBE = Path(__file__).with_name("kernel_set_probe.py")
AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
# one photo each of 12 people of LFW's evaluation list
REAL_PHOTOS = 12

# (engine, workers, shard size, batch size): each differs from the reference table's cut (local, one
# worker, shards of 3, batches of 16) in its batch size and shard size; Beam x2 also runs each model
# on one thread instead of two
CUTS = [("local", 1, 5, 1), ("local", 1, 2, 3), ("beam", 2, 5, 3), ("ray", 1, 4, 7)]


def _encode(src: Path | str, root: Path, engine: str, workers: int, shard_size: int, batch_size: int) -> dict:
    s = run_encode(str(src), str(root), EncodeOptions(engine=engine, workers=workers, shard_size=shard_size, batch_size=batch_size, progress=False))
    assert s.inputs == s.encoded_inputs + s.rejected + s.skipped
    if engine == "ray":
        import ray

        ray.shutdown()
    return table_snapshot(str(root))


@pytest.mark.parametrize("cut", CUTS, ids=lambda c: f"{c[0]}-x{c[1]}-shard{c[2]}-batch{c[3]}")
def test_the_sample_table_does_not_depend_on_how_the_job_was_cut(sample_archive, tmp_path, cut):
    ref = _encode(sample_archive, tmp_path / "ref", "local", 1, 3, 16)
    assert differing_families(_encode(sample_archive, tmp_path / "cut", *cut), ref) == {}


@pytest.fixture(scope="module")
def real_photos(shared_data: Path, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("lfw12")
    people: set[str] = set()
    for rel in (shared_data / "lfw" / "eval_images.txt").read_text().split():
        person = rel.split("/")[0]
        if person not in people:
            people.add(person)
            shutil.copy(shared_data / "lfw" / "images" / rel, folder / Path(rel).name)
        if len(people) == REAL_PHOTOS:
            return folder
    raise AssertionError("LFW's evaluation list has fewer than 12 people")


@pytest.mark.shared_data
def test_twelve_real_photos_give_the_same_table_whatever_the_cut(real_photos, tmp_path):
    ref = _encode(real_photos, tmp_path / "ref", "local", 1, 3, 16)
    assert len(ref["faces"]) >= REAL_PHOTOS and len(ref["residual"]) == len(ref["faces"])
    for i, cut in enumerate(CUTS):
        assert differing_families(_encode(real_photos, tmp_path / f"cut{i}", *cut), ref) == {}, cut


def _probe(tmp_path: Path, crops: np.ndarray, env: dict[str, str], name: str, streams: Path | None = None) -> dict:
    np.save(tmp_path / "crops.npy", crops)
    out = tmp_path / f"{name}.pkl"
    cmd = [sys.executable, str(PROBE), str(tmp_path / "crops.npy"), str(out)] + ([str(streams)] if streams else [])
    subprocess.run(cmd, env={**os.environ, **env}, check=True, timeout=600)
    with open(out, "rb") as f:
        return pickle.load(f) | {"path": out}


def _kernel_sets_agree(tmp_path: Path, crops: np.ndarray) -> None:
    """Encode under the default kernels and under AVX2; decode each side's streams on the other."""
    default = _probe(tmp_path, crops, {}, "default")
    avx2 = _probe(tmp_path, crops, AVX2, "avx2", streams=default["path"])
    assert avx2["capability"] == "AVX2"
    generative = ("basic", "middle", "enhanced")
    for a, b in zip(default["streams"], avx2["streams"]):  # what the two kernel sets wrote
        assert [p for n, p in a if n in generative] == [p for n, p in b if n in generative]
    # the same stream read under both kernel sets: the same symbols, full decodes within the bound
    mine = _probe(tmp_path, crops, {}, "mine", streams=default["path"])
    for x, y in zip(mine["decoded"]["symbols"], avx2["decoded"]["symbols"]):
        assert np.array_equal(x, y)
    diff = np.abs(mine["decoded"]["residual"].astype(np.int16) - avx2["decoded"]["residual"].astype(np.int16))
    assert diff.max() <= KERNEL_SET_PIXEL_BOUND


def test_avx2_and_the_default_kernels_write_the_same_generative_bytes(generated_faces, tmp_path):
    _kernel_sets_agree(tmp_path, generated_faces)


@pytest.mark.shared_data
def test_avx2_and_the_default_kernels_agree_on_real_faces(real_photos, embedded_codec, tmp_path):
    from facetier.io.images import decode_image

    crops = [f.crop for p in sorted(real_photos.iterdir()) for f in embedded_codec.align(decode_image(p.read_bytes(), draft_size=None).rgb)]
    _kernel_sets_agree(tmp_path, np.stack(crops))
