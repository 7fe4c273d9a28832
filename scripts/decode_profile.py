"""Where a batch-1 decode step's time goes, for the next GPU run (`serving.bench.decode_profile`):
the engine's whole step, the CUDA graph replay alone, and the kernels one step launches, for the
model as loaded, with lesson 08's fused kernels, fused and merged, and W4 + fused + merged.

    python scripts/decode_profile.py --model tinyllama-1.1b-random --json out.json
"""
import argparse
import copy
import json

import torch

from llmopt import models
from llmopt.kernels.fuse import fuse
from llmopt.quant import QuantConfig, quantize
from llmopt.serving.bench import decode_profile, format_decode_profile

VARIANTS = {
    "as loaded": lambda m: m,
    "fused": lambda m: fuse(copy.deepcopy(m)),
    "fused + merged": lambda m: fuse(copy.deepcopy(m), merge=True),
    "fused + norm/SwiGLU in the GEMVs": lambda m: fuse(copy.deepcopy(m), gemv=True),
    "W4 + fused + merged": lambda m: fuse(quantize(copy.deepcopy(m), QuantConfig(bits=4, group_size=128)), merge=True),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: the bundled model")
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=96)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    model, tok = models.load(args.model)
    model.eval()
    out = {"model": args.model or models.default_model(), "torch": torch.__version__, "rows": {}}
    if torch.cuda.is_available():
        out["device"] = torch.cuda.get_device_name()
    for name in args.variants:
        r = decode_profile(VARIANTS[name](model), tok, batch=args.batch, context=args.context, steps=args.steps)
        out["rows"][name] = r
        print(format_decode_profile(name, r), flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
