#!/usr/bin/env bash
# The device check for split, offloaded and large-vocabulary sweeps, for a machine with one or more CUDA GPUs.
# About 5-7 minutes on one H100/H200; never run by CI. Writes JSON under ${OUT:-benchmarks/results/gpu}.
#   bash benchmarks/gpu.sh            (PY=python3 by default; the package, SmolLM2 and Gemma 3 installed)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"
# 1. the sweep benchmark in bf16 (official loop vs pyvene vs the engine), N = 512 with the 30 x 30 grid, and N = 2048
"$PY" benchmarks/sweep.py --device cuda --dtype bfloat16 --prompts 512 --baseline-pairs 300 --grid-prompts 8 \
    --max-batch-tokens 1048576 --out "$OUT/sweep_512.json"
"$PY" benchmarks/sweep.py --device cuda --dtype bfloat16 --prompts 2048 --baseline-pairs 300 --grid-prompts 0 \
    --max-batch-tokens 1048576 --skip-pyvene --out "$OUT/sweep_2048.json"
# 2. a two-device device_map (when two GPUs are present) and an offloaded model equal the model on one GPU;
#    peak GPU memory of a streamed sweep
"$PY" benchmarks/gpu_checks.py --out "$OUT/gpu_checks.json"
echo "results in $OUT"
