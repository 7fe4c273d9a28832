#!/usr/bin/env bash
# The GPU checks, in one run (for a lent GPU machine: no package index there, so nothing is
# installed; the machine's own torch and transformers are used). Results go to $OUT (or ./gpu_out).
# Each part has its own time limit so that one slow part cannot take the others' results with it, and
# the whole run stays inside BUDGET seconds (default 540: one 600 s device command, with margin): a
# part's limit is cut to what is left, and a part with under 20 s left is skipped.
#   bash scripts/gpu_check.sh            # parts decode kernels tests: 280 + 140 + 120 s at most
#   PARTS="decode kernels" bash scripts/gpu_check.sh
# Parts: decode kernels tests (the default), and profile pdl quant moe serve. Each part's limit is
# <PART>_TIMEOUT (DECODE_TIMEOUT=280 ...); VARIANTS, PDL_VARIANTS, BATCHES, STEPS, CONFIG_ROWS,
# MOE_TOKENS and TESTS override what the parts run.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
PARTS=${PARTS:-"decode kernels tests"}
BUDGET=${BUDGET:-540}
for part in $PARTS; do   # a typo would skip a part silently and spend the lent minutes on the rest
  case $part in
  decode|pdl|profile|kernels|quant|moe|tests|serve) ;;
  *) echo "unknown part '$part' in PARTS; the parts: decode kernels tests profile pdl quant moe serve" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
limit() {   # a part's own limit, cut to what is left of BUDGET
  local left=$((BUDGET - SECONDS))
  echo $((left < $1 ? left : $1))
}
for part in $PARTS; do
  if (( BUDGET - SECONDS < 20 )); then
    echo "skipping part $part: $((BUDGET - SECONDS)) s left of BUDGET=$BUDGET s" >&2
    continue
  fi
  case $part in
  decode)  # lessons 09-10 and 08 end to end: TinyLlama-1.1B-shaped, random init, bf16; batch 1 and 32:
           # HF generate, the engine with CUDA graphs / torch.compile / fused kernels (merged, gemv, multistep,
           # PDL) / W4 + fused, vs the floor
    timeout "$(limit "${DECODE_TIMEOUT:-280}")" $PY -m llmopt.cli bench decode --model tinyllama-1.1b-random \
        --batch-sizes ${BATCHES:-1 32} \
        --variants ${VARIANTS:-hf graphs compiled fused merged multistep gemv gemv-multistep gemv-pdl gemv-multistep-pdl w4-merged w4-multistep} \
        --scheduler-steps ${STEPS:-8} --json "$OUT/decode.json" 2>&1 | grep --line-buffered -v Warning | tee "$OUT/decode.txt" ;;
  pdl)  # the same, batch 1, every kernel launched by programmatic dependent launch (LLMOPT_PDL=1), in a process of its
        # own (its block configs timed again); part decode's gemv-pdl variants do it in the same process
    LLMOPT_PDL=1 timeout "$(limit "${PDL_TIMEOUT:-240}")" $PY -m llmopt.cli bench decode --model tinyllama-1.1b-random \
        --batch-sizes 1 --variants ${PDL_VARIANTS:-gemv gemv-multistep} --scheduler-steps ${STEPS:-8} \
        --json "$OUT/decode_pdl.json" 2>&1 | grep --line-buffered -v Warning | tee "$OUT/decode_pdl.txt" ;;
  profile)  # lessons 08-10: where a batch-1 decode step's time goes (engine step, graph replay, kernel by kernel)
    timeout "$(limit "${PROFILE_TIMEOUT:-240}")" $PY scripts/decode_profile.py --model tinyllama-1.1b-random \
        --json "$OUT/profile.json" 2>&1 | grep --line-buffered -v Warning | tee "$OUT/profile.txt" ;;
  kernels)  # lesson 08: every kernel vs eager and torch.compile at 7B sizes, and the W4A16/W8A16 GEMV/GEMM vs bf16
    timeout "$(limit "${KERNELS_TIMEOUT:-140}")" $PY -m llmopt.cli bench kernels --repeats 50 \
        --json "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.txt" ;;
  quant)  # lesson 08's quantized matmuls and the decode GEMVs only, and every W4A16 GEMV candidate config, timed one by one
    timeout "$(limit "${QUANT_TIMEOUT:-300}")" $PY -m llmopt.cli bench kernels --only w4a16 w8a16 gemv --configs \
        --config-rows ${CONFIG_ROWS:-1 8} --repeats 50 --json "$OUT/quant.json" 2>&1 | tee "$OUT/quant.txt" ;;
  moe)  # lesson 07-08: one Mixtral-8x7B-shaped MoE layer's experts at decode, float vs W4, the grouped W4 MoE kernels
    timeout "$(limit "${MOE_TIMEOUT:-240}")" $PY scripts/bench_moe.py kernels --tokens ${MOE_TOKENS:-1 4 16} --repeats 20 \
        --json "$OUT/moe.json" 2>&1 | grep --line-buffered -v Warning | tee "$OUT/moe.txt" ;;
  tests)  # the GPU-marked tests (CUDA graphs vs eager vs HF, the kernels in bf16 on the GPU, ...)
    timeout "$(limit "${TESTS_TIMEOUT:-120}")" $PY -m pytest -q -m gpu -p no:cacheprovider --tb=short -rfE \
        --continue-on-collection-errors ${TESTS:-tests} 2>&1 \
        | tee "$OUT/pytest_full.txt" | tail -n 25 | tee "$OUT/pytest.txt" ;;   # the full file keeps the tracebacks
  serve)  # the engine against HF generate on a chat workload (long: HF one request at a time)
    timeout "$(limit "${SERVE_TIMEOUT:-300}")" $PY -m llmopt.cli bench serve --model tinyllama-1.1b-random \
        --batch-size 32 --requests 64 --systems static engine --json "$OUT/serve.json" 2>&1 | tee "$OUT/serve.txt" ;;
  esac
done
