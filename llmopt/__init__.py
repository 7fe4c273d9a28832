"""llmopt: the package behind the course "Tiny Transformers, Mighty Performance".

    import llmopt
    model, tok = llmopt.load()            # the bundled 6.6M-parameter Llama, offline
    llmopt.eval.perplexity(model, tokenizer=tok)
    llmopt.bench.generation(model, batch_size=1)
"""
from . import bench, data, eval, models, report  # noqa: F401  (eval shadows the builtin only here)
from .models import DEFAULT_MODEL, load  # noqa: F401
from .report import Report  # noqa: F401

__version__ = "0.1.0"
