"""Time to the first token of a W4 g128 fused, merged model in bfloat16 with the INT4 CPU kernel taking
prompts of up to `limit` rows, one limit against another (`kernels.cpu.MAX_ROWS`), outputs compared.

    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 \
        python scripts/prefill_rows_ab.py tinyllama-1.1b-random 512 256 none

simulates an AVX2 CPU on a newer one (PyTorch and oneDNN then use only AVX2); a limit "none" is no limit."""
import sys
import time

import torch

from llmopt import bench, kernels, models
from llmopt.kernels import cpu
from llmopt.quant import QuantConfig, quantize

name, prompt, limits = sys.argv[1], int(sys.argv[2]), [None if a == "none" else int(a) for a in sys.argv[3:]]
model, _ = models.load(name, dtype=torch.bfloat16)
q = kernels.fuse(quantize(model, QuantConfig(bits=4, group_size=128)), merge=True)
print(f"# {bench.environment()}, PyTorch's kernels: {torch.backends.cpu.get_cpu_capability()}, "
      f"MAX_ROWS table {cpu.CPU_KIND}", flush=True)
ids = bench.random_prompts(q.config.vocab_size, 1, prompt)
logits = {}
for limit in limits * 2:   # each twice, interleaved
    cpu.MAX_ROWS[cpu.CPU_KIND][4][torch.bfloat16] = limit
    with torch.no_grad():
        t = time.perf_counter()
        logits[limit] = q(ids).logits[0, -1].float()
        t = time.perf_counter() - t
    print(f"{name} W4 g128 fused bf16, {prompt}-token prefill, INT4 kernel up to {limit} rows: {t * 1e3:,.0f} ms",
          flush=True)
a, b = (logits[lim] for lim in limits[:2])
print(f"last token's logits, max |difference| / max |logit|: {((a - b).abs().max() / a.abs().max()).item():.4f}; "
      f"same next token: {a.argmax().item() == b.argmax().item()}")
