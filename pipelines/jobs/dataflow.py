"""Dataflow launch options, from the same ``infra/dataflow/encode.env`` the launch script reads.

``python -m facetier.pipelines.jobs.dataflow ENV_FILE`` prints one ``--beam-arg=...`` per line for
``facetier encode``; the infra tests build the Beam graph from the same function.
"""
from __future__ import annotations

import shlex
import sys
from pathlib import Path


def read_env(path: str | Path) -> dict[str, str]:
    env = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            env[key.strip()] = shlex.split(value)[0] if value.strip() else ""
    return env


def dataflow_pipeline_args(env: dict[str, str]) -> list[str]:
    """Beam options for GPU workers running the facetier container on Dataflow."""
    return [
        "--runner=DataflowRunner",
        f"--project={env['PROJECT']}",
        f"--region={env['REGION']}",
        f"--temp_location={env['TEMP']}",
        f"--sdk_container_image={env['IMAGE']}",
        "--sdk_location=container",
        f"--machine_type={env['MACHINE_TYPE']}",
        f"--dataflow_service_options=worker_accelerator={env['ACCELERATOR']}",
        "--experiments=use_runner_v2",
        "--experiments=no_use_multiple_sdk_containers",  # one process per VM: one model copy per GPU
        # and one harness thread in it: each encode DoFn holds a ShardWorker (the model, and a pool that
        # prepares inputs on all of the VM's cores), so more threads would mean more model copies
        "--number_of_worker_harness_threads=1",
        "--autoscaling_algorithm=THROUGHPUT_BASED",
        f"--max_num_workers={env['MAX_WORKERS']}",
        "--disk_size_gb=50",
    ]


def main(argv: list[str]) -> int:
    for arg in dataflow_pipeline_args(read_env(argv[0])):
        print(f"--beam-arg={arg}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
