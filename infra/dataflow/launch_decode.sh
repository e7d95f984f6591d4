#!/usr/bin/env bash
# Launch an on-demand decode on Dataflow with the encode's GPU workers and container (same encode.env).
# Usage: infra/dataflow/launch_decode.sh "SQL condition" UPTO OUT_URI [encode.env]
#   e.g. infra/dataflow/launch_decode.sh "gender = 'female' AND age > 60" residual gs://my-review/women-over-60/
set -euo pipefail
WHERE="$1"; UPTO="$2"; OUT="$3"
ENV_FILE="${4:-$(dirname "$0")/encode.env}"
source "$ENV_FILE"
mapfile -t BEAM_ARGS < <(python3 -m facetier.pipelines.jobs.dataflow "$ENV_FILE")
exec facetier decode "$TABLE" --where "$WHERE" --upto "$UPTO" --out "$OUT" --engine beam --batch-size 64 --paste-back --gallery "${BEAM_ARGS[@]}"
