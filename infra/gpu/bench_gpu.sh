#!/usr/bin/env bash
# The one prepared GPU check (about 15 minutes with start-up on one H200-class GPU):
#   1. a sample archive of 1,200 generated faces (built on the GPU, nothing downloaded);
#   2. steady-state encode of all layers on the local engine at batch sizes 32-256;
#   3. 128 faces encoded on the GPU, decoded and re-coded on the CPU: every stream must re-code to its own
#      bytes and full decodes of the same stream stay within DEVICE_PIXEL_BOUND levels (the script fails otherwise).
# The networks run on fixed micro-batches of 128 faces on a GPU (codec/model.py MICRO_BATCH), whatever the batch size.
# Writes $OUT/bench.json and prints the table. Needs the CUDA build of torch (infra/docker/Dockerfile.gpu).
set -euo pipefail
OUT=${OUT:-gpu-report}
FACES=${FACES:-1200}
mkdir -p "$OUT"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: this script measures the GPU path only')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
# device utilisation while the benchmark runs, one sample a second
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader -l 1 > "$OUT/utilisation.csv" &
SMI=$!
trap 'kill $SMI 2>/dev/null || true' EXIT
facetier sample "$OUT/sample" --faces "$FACES"
facetier bench "$OUT/sample" --engines local --workers 1 --batch-sizes 32,64,128,256 --shard-size 256 \
  --device cuda --cross-device 128 --limit "$FACES" --report "$OUT/bench.json"
kill $SMI 2>/dev/null || true
python - "$OUT/utilisation.csv" <<'PY'
import sys
rows = [l.split(",") for l in open(sys.argv[1]) if l.strip()]
util = [float(r[1].strip().rstrip(" %")) for r in rows if len(r) > 2]
print(f"GPU utilisation over {len(util)} s: mean {sum(util) / max(len(util), 1):.0f} %, max {max(util, default=0):.0f} %")
PY
python - "$OUT/bench.json" <<'PY'
import json, sys
x = json.load(open(sys.argv[1]))["cross_device"]
print(json.dumps(x, indent=1))
sys.exit(0 if x["holds"] else "the cross-device statement does not hold on this GPU (README: Reproducible bytes)")
PY
