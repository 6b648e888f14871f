#!/usr/bin/env bash
# The GPU measurements of issue 17 in one call, on a machine with an NVIDIA GPU (not measured yet: no GPU was lent
# to this project's sessions). From the repository root:
#
#     bash benchmarks/gpu.sh            # install, CUDA tests, GPU benchmark, agreement; prints one table
#     NO_INSTALL=1 bash benchmarks/gpu.sh   # the environment is ready (torch with CUDA, the package installed)
#
# Writes benchmarks/results-gpu.json and benchmarks/agreement-gpu.json (or under $OUT when set). Offline machines:
# the sample CT comes from PyPI (totalsegmentator sdist); copy ~/.cache/uniseg-hub/sample-data there beforehand.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=${OUT:-benchmarks}
mkdir -p "$DEST"

if [ -z "${NO_INSTALL:-}" ]; then
    $PY -m pip install -q -e . pytest                                  # keeps the machine's CUDA torch
    $PY -m pip install -q --no-deps dynamic-network-architectures || echo "PlainConvUNet peer: not installed"
fi
$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible to torch')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

echo "== CUDA tests (tests/cuda, speed options)" >&2
$PY -m pytest -q -p no:cacheprovider tests/cuda tests/pipeline/test_speed_options.py 2>&1 | tail -n 3 \
    | tee "$DEST/gpu-tests.txt"

echo "== GPU benchmark: one patch (fp32, fp16 autocast, bf16, torch.compile, CUDA graphs), peers, end to end" >&2
$PY benchmarks/run.py --device cuda --sections peak,forward,peers,e2e --no-baseline \
    --json "$DEST/results-gpu.json" | tee "$DEST/gpu-table.txt"

echo "== agreement on the sample CT: TTA levels, overlaps, fp16 and bf16 against float32 on the GPU" >&2
$PY benchmarks/agreement.py --device cuda --precisions fp16,bf16 --precision-levels 8,1 \
    --json "$DEST/agreement-gpu.json" | tee -a "$DEST/gpu-table.txt"

echo "== pinned memory: the bundle end to end on the sample CT, pin_memory off / on" >&2
$PY - <<'PY' | tee -a "$DEST/gpu-table.txt"
import sys, time
sys.path[:0] = ["benchmarks", "tests"]
from pathlib import Path
from run import full_size_checkpoint
from uniseg_hub.app.predict import bundle_workflow, run_workflow
from uniseg_hub.app.sample_data import fetch_sample
from uniseg_hub.config import FAST_PRESET

_, weights = full_size_checkpoint(Path("/tmp/uniseg-hub-bench"))
ct = str(fetch_sample("ct_torso_1.5mm"))
rows = []
for pin in (False, True, False, True):
    for fast in (False, True):
        overrides = {"input": ct, "task": "liver", "weights": str(weights), "output_dir": "/tmp/uniseg-gpu-out",
                     "overwrite": True, "pin_memory": pin, **(FAST_PRESET if fast else {})}
        workflow = bundle_workflow(overrides)
        start = time.perf_counter()
        run_workflow(workflow)
        rows.append((pin, fast, time.perf_counter() - start))
print("end to end on the GPU, sample CT, liver (seeded weights): pin_memory, preset, seconds (2 rounds)")
for pin, fast, seconds in rows:
    print(f"  pin_memory={pin!s:<5}  {'--fast' if fast else 'default (8 flips)':<18}  {seconds:7.2f} s")
PY
