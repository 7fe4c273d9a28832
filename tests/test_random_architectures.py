"""Random Llama-family architectures through `kernels.fuse` and the serving engine.

Each seed draws a small random Llama, Mistral or Qwen2 model: head counts with grouped-query
attention from 1 KV head up, head dims that are not the hidden size over the heads, biases on the
attention and the MLP, tied embeddings, rotary scaling (linear, dynamic, llama3, yarn); then W4, W8
or no quantization, and `fuse` plain, merged or with the decode GEMVs. The fused model's logits must
equal the model's, and the engine on the fused model (multi-step decoding or not) must give HF
`generate`'s greedy tokens on the model, up to a near tie of the logits.

From seed 200 the Llama is upcycled into a Mixture of Experts (lesson 07: 2-6 experts, top-1 to all
of them, routers and experts made to differ), so that `fuse` meets quantized experts
(`KernelQuantExperts`, the grouped MoE kernels) and the engine serves routed layers."""
import copy
import random

import pytest
import torch
import transformers as tf

pytest.importorskip("triton")
from llmopt import kernels  # noqa: E402  (sets TRITON_INTERPRET=1 on a machine without CUDA)
from llmopt.quant import QuantConfig, quantize  # noqa: E402
from llmopt.serving import LLMEngine, SamplingParams  # noqa: E402

ROPE = {"linear": {"rope_type": "linear", "factor": 2.0}, "dynamic": {"rope_type": "dynamic", "factor": 2.0},
        "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 64},
        "yarn": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 128}}


def random_model(rng, family=None):
    family = family or rng.choice(["llama", "mistral", "qwen2"])
    heads = rng.choice([2, 4, 6, 8])
    head_dim = rng.choice([8, 16, 24, 32])
    kw = dict(vocab_size=rng.choice([97, 256, 300]), intermediate_size=rng.choice([40, 64, 104, 136]),
              num_hidden_layers=rng.choice([1, 2, 3]), num_attention_heads=heads,
              num_key_value_heads=rng.choice([k for k in (1, 2, 3, 4, 6, 8) if heads % k == 0]),
              hidden_size=heads * (rng.choice([4, 8, 12]) if rng.random() < 0.3 else head_dim),
              max_position_embeddings=256, rms_norm_eps=rng.choice([1e-5, 1e-6]),
              tie_word_embeddings=rng.random() < 0.5, rope_theta=rng.choice([10000.0, 500000.0]))
    if family == "qwen2":   # q/k/v with biases, head_dim = hidden / heads
        kw["hidden_size"] = heads * head_dim
        cfg, cls = tf.Qwen2Config(**kw), tf.Qwen2ForCausalLM
    elif family == "mistral":
        cfg = tf.MistralConfig(head_dim=head_dim, sliding_window=rng.choice([None, 4096]), **kw)
        cls = tf.MistralForCausalLM
    else:
        rope = rng.choice([None, None, "linear", "dynamic", "llama3", "yarn"])
        biases = family == "llama" and rng.random() < 0.3, family == "llama" and rng.random() < 0.2
        cfg = tf.LlamaConfig(head_dim=head_dim, attention_bias=biases[0], mlp_bias=biases[1],
                             rope_scaling=ROPE.get(rope), **kw)
        cls = tf.LlamaForCausalLM
    torch.manual_seed(rng.randrange(1000))
    return cls(cfg).eval()


def random_moe_model(rng):
    """A random Llama without biases, upcycled into a Mixtral whose routers and experts differ."""
    from llmopt import moe

    E = rng.randint(2, 6)
    model = moe.upcycle(random_model(rng, family="llama-moe"), num_experts=E, top_k=rng.randint(1, E),
                        seed=rng.randrange(100))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "experts" in name or name.endswith("mlp.gate.weight"):
                p.add_(torch.randn_like(p) * p.std())
    return model.eval()


def greedy_agrees(model, prompt, got, want):
    """`got` equals `want`, or first differs where the two tokens' logits are within 1e-4."""
    if got == want:
        return True
    k = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
    with torch.no_grad():
        row = model(torch.tensor([prompt + want[:k]])).logits[0, -1]
    return (row[want[k]] - row[got[k]]).item() <= 1e-4


@pytest.mark.parametrize("seed", [*range(24), 102, 103, *range(200, 224), 304])
def test_random_architecture_fused_and_served(seed):
    """Seeds from 100 run the Triton kernels (interpreted); from 200 an MoE model, from 300 with the kernels."""
    rng = random.Random(seed)
    model = random_moe_model(rng) if seed >= 200 else random_model(rng)
    mode = rng.choice(["plain", "merge", "gemv"])
    quant = rng.choice([None, None, QuantConfig(bits=4, group_size=8), QuantConfig(bits=8)])
    if seed >= 200:   # mostly quantized: the experts' kernels are what is new here
        quant = rng.choice([None, QuantConfig(bits=4, group_size=8), QuantConfig(bits=4, group_size=8, symmetric=False),
                            QuantConfig(bits=8), QuantConfig(bits=8, group_size=8, symmetric=False)])
    backend = "triton" if seed >= 300 or 100 <= seed < 200 else "torch"
    base = quantize(copy.deepcopy(model), quant) if quant else model
    fused = kernels.fuse(copy.deepcopy(base), backend=backend, merge=mode == "merge", gemv=mode == "gemv")
    vocab = model.config.vocab_size
    n = rng.randint(1, 20)
    ids = torch.tensor([[rng.randrange(vocab) for _ in range(n)] for _ in range(2)])
    with torch.no_grad():
        torch.testing.assert_close(fused(ids).logits, base(ids).logits, rtol=1e-4, atol=1e-4)
    engine = LLMEngine(fused, None, block_size=rng.choice([2, 4, 16]), num_kv_blocks=128, max_num_seqs=4,
                       backend=backend, num_scheduler_steps=rng.choice([1, 4]))
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(1, 30))] for _ in range(3)]
    rids = [engine.add_request(p, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)) for p in prompts]
    final = engine.run()
    for p, rid in zip(prompts, rids):
        with torch.no_grad():
            want = base.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                 max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)[0, len(p):]
        assert greedy_agrees(base, p, final[rid].outputs[0].token_ids, want.tolist()), (seed, p)
