"""infra/: manifests parse, pins agree with the project, the Dataflow graph builds, and the RayJob
entrypoint runs for real through `ray job submit` against a local head on 127.0.0.1."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"


def _yaml(rel: str) -> dict:
    return yaml.safe_load((INFRA / rel).read_text())


def _locked(package: str, python: str = "3.11") -> str:
    """The version requirements/lock.txt pins for ``package`` on the images' Python."""
    from packaging.markers import Marker

    env = {"python_full_version": f"{python}.0", "python_version": python, "sys_platform": "linux", "platform_system": "Linux",
           "platform_machine": "x86_64", "implementation_name": "cpython"}
    for line in (ROOT / "requirements" / "lock.txt").read_text().splitlines():
        spec, _, marker = line.partition(";")
        name, sep, version = spec.strip().partition("==")
        if sep and name.lower() == package and (not marker.strip() or Marker(marker.strip()).evaluate(env)):
            return version.strip()
    raise AssertionError(f"{package} is not pinned in requirements/lock.txt for Python {python}")


def test_images_install_from_the_lock():
    """The images take every package from requirements/lock.txt (the pins CI tests), not from
    whatever an index serves on the day they are built; the harness and cluster match its pins."""
    beam, ray_version, torch_version = _locked("apache-beam"), _locked("ray"), _locked("torch")
    torch_pin = (ROOT / "requirements" / "torch.txt").read_text()
    assert f"torch=={torch_version}" in torch_pin.splitlines()
    for name in ("Dockerfile.gpu", "Dockerfile.cpu"):
        text = (INFRA / "docker" / name).read_text()
        installs = [line for line in text.splitlines() if line.startswith("RUN pip install")]
        assert installs and all("-c requirements/lock.txt" in line for line in installs), name
        assert any(f"torch=={torch_version}" in line for line in installs), name
        assert any("'.[worker]'" in line for line in installs), name
        assert "COPY requirements ./requirements" in text
        assert f"apache/beam_python3.11_sdk:{beam}" in text, name
        assert "/opt/apache/beam/boot" in text
    for job in ("ray/rayjob.yaml", "ray/rayjob-decode.yaml"):
        assert _yaml(job)["spec"]["rayClusterSpec"]["rayVersion"] == ray_version, job


def test_ci_and_the_readme_install_from_the_lock():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = "pip install -c requirements/lock.txt torch==2.13.0 && pip install -c requirements/lock.txt -e '.[test]' && python -m pytest -q"
    assert command in readme and command in ci
    assert "pip install -c requirements/lock.txt torch==2.13.0 && pip install -c requirements/lock.txt -e . && facetier demo" in readme


def test_the_installed_engines_are_the_locked_ones():
    """What this test run imports is what the lock pins (CI installs from it)."""
    import apache_beam
    import ray

    assert apache_beam.__version__ == _locked("apache-beam", f"{sys.version_info.major}.{sys.version_info.minor}")
    assert ray.__version__ == _locked("ray", f"{sys.version_info.major}.{sys.version_info.minor}")


def test_rayjob_and_cronjob_run_the_same_cli_entrypoint():
    from facetier.cli import build_parser

    job = _yaml("ray/rayjob.yaml")
    cron = _yaml("k8s/cronjob.yaml")
    entry = job["spec"]["entrypoint"]
    cmd = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert cmd[cmd.index("--") + 1 :] == shlex.split(entry)
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]
    cron_env = json.loads(next(c for c in cmd if c.startswith("--runtime-env-json=")).split("=", 1)[1])["env_vars"]
    assert cron_env == env
    args = shlex.split(entry)
    assert args[0] == "facetier"
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # SRC and TABLE come from the job's runtime env
    try:
        parsed = build_parser().parse_args(args[1:])
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    assert parsed.command == "encode" and parsed.engine == "ray" and parsed.ray_address == "auto"
    assert parsed.src == env["FACETIER_SOURCE"] and parsed.table == env["FACETIER_TABLE"]


def test_decode_rayjob_and_dataflow_launcher_run_the_decode_cli():
    from facetier.cli import build_parser

    job = _yaml("ray/rayjob-decode.yaml")
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]
    old = os.environ.get("FACETIER_TABLE")
    os.environ["FACETIER_TABLE"] = env["FACETIER_TABLE"]
    try:
        parsed = build_parser().parse_args(shlex.split(job["spec"]["entrypoint"])[1:])
    finally:
        os.environ.pop("FACETIER_TABLE") if old is None else os.environ.__setitem__("FACETIER_TABLE", old)
    assert parsed.command == "decode" and parsed.engine == "ray" and parsed.ray_address == "auto" and parsed.table == env["FACETIER_TABLE"]
    assert parsed.where == "gender = 'female' AND age > 60" and parsed.paste_back and parsed.gallery and parsed.out.startswith("gs://")
    assert job["spec"]["rayClusterSpec"] == _yaml("ray/rayjob.yaml")["spec"]["rayClusterSpec"]  # the encode's cluster shape
    launch = (INFRA / "dataflow" / "launch_decode.sh").read_text()
    assert "facetier.pipelines.jobs.dataflow" in launch and "facetier decode" in launch and "--engine beam" in launch


def test_resources_and_gpus_are_requested():
    job = _yaml("ray/rayjob.yaml")["spec"]["rayClusterSpec"]
    head = job["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]
    assert head["requests"]["cpu"] and head["limits"]["memory"]
    gpu_group = next(g for g in job["workerGroupSpecs"] if g["groupName"] == "gpu")
    res = gpu_group["template"]["spec"]["containers"][0]["resources"]
    assert res["limits"]["nvidia.com/gpu"] == 1 and gpu_group["rayStartParams"]["num-gpus"] == "1"
    cron = _yaml("k8s/cronjob.yaml")["spec"]
    assert cron["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]


def test_cronjob_forbids_concurrent_runs():
    assert _yaml("k8s/cronjob.yaml")["spec"]["concurrencyPolicy"] == "Forbid"


def test_dataflow_graph_builds_from_the_documented_options(tiny_bundle):
    import apache_beam as beam
    from apache_beam.options.pipeline_options import (
        GoogleCloudOptions,
        PipelineOptions,
        WorkerOptions,
    )
    from facetier.codec.align import AlignmentConfig
    from facetier.pipelines.jobs.beam_engine import build_pipeline
    from facetier.pipelines.jobs.dataflow import dataflow_pipeline_args, read_env
    from facetier.pipelines.jobs.records import JobContext, ShardSpec

    env = read_env(INFRA / "dataflow" / "encode.env")
    args = dataflow_pipeline_args(env)
    opts = PipelineOptions(args)
    gcp = opts.view_as(GoogleCloudOptions)
    assert gcp.project == env["PROJECT"] and gcp.region == env["REGION"]
    assert any(o.startswith("worker_accelerator=type:nvidia-l4") for o in gcp.dataflow_service_options)
    assert opts.view_as(WorkerOptions).sdk_container_image == env["IMAGE"]
    assert opts.view_as(WorkerOptions).max_num_workers == int(env["MAX_WORKERS"])
    ctx = JobContext(env["TABLE"], str(tiny_bundle), "c", "h" * 32, AlignmentConfig(), ("basic",))
    p = beam.Pipeline(options=opts)  # built, never run: no submission
    build_pipeline(p, ctx, [ShardSpec("s00000-x", ("gs://b/a.jpg",))])
    proto = p.to_runner_api()
    names = {t.unique_name for t in proto.components.transforms.values()}
    assert any("Encode" in n for n in names)
    assert not any("GroupByKey" in n and not n.startswith("Spread") for n in names), "shards are written by the encoding DoFn, not after a group-by"
    launch = (INFRA / "dataflow" / "launch.sh").read_text()
    assert "facetier.pipelines.jobs.dataflow" in launch and "--engine beam" in launch


def test_warehouse_ddl_names_the_delta_tables_of_index_and_base(tmp_path, sample_archive):
    from facetier.io.table import Table
    from facetier.pipelines.jobs.encode import EncodeOptions, run_encode
    from deltalake import DeltaTable
    from facetier.pipelines.jobs.warehouse import bigquery_ddl

    root = str(tmp_path / "t")
    run_encode(str(sample_archive), root, EncodeOptions(shard_size=4, progress=False))
    (tmp_path / "t" / "basic" / "uncommitted.parquet").write_bytes(b"junk from a failed run")
    ddl = bigquery_ddl(root, "analytics")
    for fam in ("basic", "faces"):
        assert f"uris = ['{root}/{fam}']" in ddl and f"analytics.facetier_{fam}" in ddl
        assert DeltaTable(Table(root).delta_uri(fam)).version() >= 0  # what BigLake follows
    assert "DELTA_LAKE" in ddl and "uncommitted" not in ddl and "WITH CONNECTION" in ddl


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(shutil.which("ray") is None and not (Path(sys.executable).parent / "ray").exists(), reason="ray CLI not installed")
def test_ray_job_submit_runs_the_rayjob_entrypoint(tmp_path, sample_archive):
    """The RayJob's entrypoint on a head that declares a GPU: the driver sees no CUDA, the encoder actors still ask for it."""
    pytest.importorskip("ray.dashboard", reason="ray job submit needs ray[default] (in the test extras)")
    ray_cli = str(Path(sys.executable).parent / "ray")
    job = _yaml("ray/rayjob.yaml")
    entry = job["spec"]["entrypoint"]
    gcs_port, dash_port = _free_port(), _free_port()
    import secrets
    import tempfile

    # token auth, with a token of the test's own, whatever ~/.ray holds on this machine
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"  # the image has facetier on PATH; so must the local head

    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # Ray's socket paths must stay under 107 characters
    subprocess.run([ray_cli, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs_port}", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dash_port}", "--num-cpus=2", "--num-gpus=1", "--object-store-memory=300000000", "--include-dashboard=true",
                    f"--temp-dir={temp}", "--disable-usage-stats"], check=True, env=env, capture_output=True, timeout=180)
    try:
        table = tmp_path / "table"
        runtime_env = {"env_vars": {"FACETIER_SOURCE": str(sample_archive), "FACETIER_TABLE": str(table)}}
        submit = [ray_cli, "job", "submit", f"--address=http://127.0.0.1:{dash_port}", f"--runtime-env-json={json.dumps(runtime_env)}",
                  "--", *shlex.split(entry)]
        deadline = time.time() + 180
        while True:
            proc = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=600)
            # a head under load can answer before its job agent is up (Ray's own message says to try again),
            # or drop the connection while its dashboard starts
            transient = ("No available agent", "Connection aborted", "Connection refused", "RemoteDisconnected")
            if proc.returncode == 0 or not any(t in proc.stderr + proc.stdout for t in transient) or time.time() > deadline:
                break
            time.sleep(3)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "inputs 12 = encoded 6 + rejected 6" in proc.stdout
        from facetier.io.table import Table

        assert Table(str(table)).version() == 1
        listing = subprocess.run([ray_cli, "list", "actors", f"--address=http://127.0.0.1:{dash_port}", "--detail", "--format=json", "--limit=1000"],
                                 env=env, capture_output=True, text=True, timeout=120)
        actors = json.loads(listing.stdout)
        encoders = [x for x in actors if "EncoderActor" in json.dumps(x.get("class_name", "")) + json.dumps(x.get("repr_name", ""))]
        assert encoders, [x.get("class_name") for x in actors]
        assert all(x["required_resources"].get("GPU") == 1 for x in encoders), [x["required_resources"] for x in encoders]
        # the decode RayJob's entrypoint on the same head, into a local folder instead of the bucket
        args = shlex.split(_yaml("ray/rayjob-decode.yaml")["spec"]["entrypoint"])
        out = tmp_path / "review"
        args[args.index("--out") + 1] = str(out)
        args[args.index("--where") + 1] = "true"
        proc = subprocess.run([ray_cli, "job", "submit", f"--address=http://127.0.0.1:{dash_port}", f"--runtime-env-json={json.dumps(runtime_env)}",
                               "--", *[shlex.quote(a) for a in args]], env=env, capture_output=True, text=True, timeout=600, check=False)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "6 selected: 6 written, 0 already there, 0 failed (balanced)" in proc.stdout
        assert len(list(out.glob("*_residual_in_photo.png"))) == 6 and (out / "gallery.html").exists()
    finally:
        subprocess.run([ray_cli, "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)
