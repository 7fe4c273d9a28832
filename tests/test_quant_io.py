import copy
import json

import pytest
import torch

from llmopt.quant import QuantConfig, quantize
from llmopt.quant.io import load_quantized, save_quantized

CONFIGS = [
    QuantConfig(bits=8),
    QuantConfig(bits=4, group_size=32, symmetric=False),
    QuantConfig(bits=2, group_size=32, skip=()),
    QuantConfig(bits=4, group_size=32, method="gptq"),
    QuantConfig(bits=4, group_size=32, method="awq", symmetric=False),
    QuantConfig(bits=4, method="nf4", double_quant=True),
    QuantConfig(bits=8, method="smoothquant"),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.method}-w{c.bits}-g{c.group_size}")
def test_save_load_gives_the_same_logits(tiny, tmp_path, cfg):
    model, tok = tiny
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    try:
        q = quantize(copy.deepcopy(model), cfg, ids)
    except ImportError as e:  # a method whose module has not landed in this checkout
        pytest.skip(str(e))
    save_quantized(q, tok, tmp_path / "q")
    meta = json.loads((tmp_path / "q" / "quant_config.json").read_text())
    assert meta["modules"] and all(m["cfg"]["method"] == cfg.method for m in meta["modules"].values())
    loaded, tok2 = load_quantized(tmp_path / "q", device="cpu")
    assert tok2("def f(x):").input_ids == tok("def f(x):").input_ids
    with torch.no_grad():
        assert torch.equal(q(ids).logits, loaded(ids).logits)
    disk = (tmp_path / "q" / "model.safetensors").stat().st_size
    float_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert disk < float_bytes  # the codes are saved packed, not dequantized


def test_save_load_errors(tiny, tmp_path):
    model, tok = tiny
    with pytest.raises(ValueError, match="no llmopt quantized modules"):
        save_quantized(model, tok, tmp_path / "float")
    with pytest.raises(FileNotFoundError, match="quant_config.json"):
        load_quantized(tmp_path)
    q = quantize(copy.deepcopy(model), QuantConfig(bits=8))
    out = save_quantized(q, None, tmp_path / "q")
    meta = json.loads((out / "quant_config.json").read_text())
    meta["version"] = 99
    (out / "quant_config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="v99"):
        load_quantized(out)


def test_models_load_opens_a_saved_quantized_folder(tiny, tmp_path):
    """`llmopt.models.load` (and so `llmopt serve --model FOLDER`) gives the quantized model back."""
    from llmopt import models
    from llmopt.quant import QuantLinear

    model, tok = tiny
    q = quantize(copy.deepcopy(model), QuantConfig(bits=4, group_size=32))
    save_quantized(q, tok, tmp_path / "q")
    loaded, tok2 = models.load(str(tmp_path / "q"), device="cpu")
    assert any(isinstance(m, QuantLinear) for m in loaded.modules())
    ids = torch.tensor([tok("def f(x):").input_ids])
    with torch.no_grad():
        assert torch.equal(q(ids).logits, loaded(ids).logits)
    save_quantized(q, None, tmp_path / "no_tok")
    with pytest.raises(ValueError, match="no tokenizer"):
        models.load(str(tmp_path / "no_tok"))
