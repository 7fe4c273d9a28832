#!/usr/bin/env bash
# The GPU checks, in one run (for a lent GPU machine: no package index there, so nothing is
# installed; the machine's own torch and transformers are used). Results go to $OUT (or ./gpu_out).
#   bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
# the GPU-marked tests and the CPU suite's fast part, on this machine's stack
$PY -m pytest -q -m "gpu or not slow" -p no:cacheprovider tests 2>&1 | tail -n 25 | tee "$OUT/pytest.txt"
# the baseline of the bundled model, and of a TinyLlama-1.1B-shaped random model (timing only)
$PY -m llmopt.cli tour --out "$OUT/tour_tinypy" 2>/dev/null | tee "$OUT/tour_tinypy.txt"
$PY -m llmopt.cli tour --model tinyllama-1.1b-random --out "$OUT/tour_tinyllama" 2>/dev/null | tee "$OUT/tour_tinyllama.txt"
# lesson 07: the MoE dispatch paths (Triton included) and stock MoE models, bf16
$PY scripts/bench_moe.py dispatch 2>&1 | tee "$OUT/moe_dispatch.txt"
$PY scripts/bench_moe.py models 2>&1 | tee "$OUT/moe_models.txt"
# lesson 08: every kernel vs eager and torch.compile at 7B sizes, then fused / W4-fused decode of a
# TinyLlama-1.1B-shaped random model vs the model as loaded (bf16)
$PY -m llmopt.cli bench kernels --e2e --model tinyllama-1.1b-random --json "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.txt"
# lessons 09-10: the engine against HF generate on a TinyLlama-shaped model, batch 32 (the tour above
# also has the engine's batch-1 row against the bandwidth floor)
$PY -m llmopt.cli bench serve --model tinyllama-1.1b-random --batch-size 32 --requests 128 --json "$OUT/serve.json" \
    --plot "$OUT/serve.png" 2>&1 | tee "$OUT/serve.txt"
