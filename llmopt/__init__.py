"""llmopt: the package behind the course "Tiny Transformers, Mighty Performance".

    import llmopt
    model, tok = llmopt.load()            # the bundled 6.6M-parameter Llama, offline
    llmopt.eval.perplexity(model, tokenizer=tok)
    llmopt.bench.generation(model, batch_size=1)
"""
import os as _os
import sys as _sys

import torch as _torch

# Without CUDA, Triton kernels run in Triton's interpreter, which is chosen when `triton` is first
# imported; torch imports it too (torch._dynamo, when transformers loads a model), so say it here,
# before anything of ours can (see llmopt.kernels.common, which also reports a triton imported first).
_TRITON_IMPORTED_FIRST = "triton" in _sys.modules and "TRITON_INTERPRET" not in _os.environ
if not _torch.cuda.is_available():
    _os.environ.setdefault("TRITON_INTERPRET", "1")

from . import bench, data, eval, models, report  # noqa: E402, F401  (eval shadows the builtin only here)
from .models import DEFAULT_MODEL, load  # noqa: E402, F401
from .report import Report  # noqa: E402, F401

__version__ = "0.1.0"
