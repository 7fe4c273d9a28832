"""One W4A16 GEMV config on a 7B-class layer, a few calls: a small program to profile with Nsight Compute.

    ncu --clock-control none -k regex:gemv --launch-skip 2 --launch-count 1 --section SpeedOfLight \
        python3 scripts/gemv_probe.py '{"BLOCK_N": 32, "BLOCK_K": 512, "num_warps": 8, "GROUPED": true}' [N K]
"""
import json
import sys

import torch

from llmopt.kernels import w4a16
from llmopt.kernels.bench import _qlinear

config = json.loads(sys.argv[1])
N, K = (int(a) for a in sys.argv[2:4]) if len(sys.argv) > 3 else (11008, 4096)
ql, _ = _qlinear(N, K, 4, 128, "cuda", torch.bfloat16)
x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
for _ in range(4):
    w4a16.w4a16_gemv(x, ql.qweight, ql.scales, ql.zeros, 128, **config)
torch.cuda.synchronize()
print("ran", config, "on", N, "x", K)
