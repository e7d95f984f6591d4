#!/usr/bin/env bash
# Launch the encode job on Dataflow with GPU workers and the custom container.
# Usage: infra/dataflow/launch.sh [encode.env]   (the driver plans shards, waits, then commits)
set -euo pipefail
source "${1:-$(dirname "$0")/encode.env}"
ENV_FILE="${1:-$(dirname "$0")/encode.env}"
mapfile -t BEAM_ARGS < <(python3 -m facetier.pipelines.jobs.dataflow "$ENV_FILE")
exec facetier encode "$SOURCE" "$TABLE" --engine beam --shard-size 256 --batch-size 64 "${BEAM_ARGS[@]}"
