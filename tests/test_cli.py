import json
import subprocess
import sys

import pytest

from llmopt import cli


def llmopt(*args, **kw):
    return subprocess.run([sys.executable, "-m", "llmopt.cli", *args], capture_output=True, text=True,
                          timeout=600, **kw)


def test_tour_smoke_writes_table_json_and_plot(tmp_path):
    r = llmopt("tour", "--smoke", "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    assert "perplexity" in r.stdout and "tok/s b=1" in r.stdout and "machine:" in r.stdout
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    row = res["rows"][0]
    methods = [r["method"] for r in res["rows"]]
    assert methods[:3] == ["baseline float32", "rtn w8 per-channel", "rtn w4 g128 symmetric"]
    w4 = {f"{m} w4 g128 {f}" for m in ("rtn", "gptq", "awq") for f in ("symmetric", "zero-point")}
    assert w4 | {"nf4 double-quant", "smoothquant w8a8"} <= set(methods)
    pruned = {"magnitude 50%", "wanda 50%", "sparsegpt 50%", "sparsegpt 2:4", "ffn -25%", "ffn -25% + 2-step recovery"}
    assert pruned <= set(methods)
    later = {"low-rank whitened 50%", "student, half the layers + 2-step distillation",
             "moe 8x top-2 upcycled + 2 steps", "llmopt engine (paged KV, continuous batching)"}
    assert later <= set(methods)
    by = {r["method"]: r for r in res["rows"]}
    served = by["llmopt engine (paged KV, continuous batching)"]   # the float model, served by the engine
    assert served["perplexity"] == row["perplexity"] and served["size_mb"] == row["size_mb"]
    assert served["tok_s_b4"] > 0 and served["tok_s_b1"] > 0
    assert by["ffn -25%"]["size_mb"] < 0.9 * row["size_mb"] and by["sparsegpt 50%"]["size_mb"] == row["size_mb"]
    # every method kept the model usable; the student has had 2 steps (of 200 in a full tour) to learn
    assert all(r["perplexity"] < 1.2 * row["perplexity"] for r in res["rows"] if not r["method"].startswith("student"))
    assert by["moe 8x top-2 upcycled + 2 steps"]["size_mb"] > 3 * row["size_mb"]
    assert res["rows"][2]["size_mb"] < res["rows"][1]["size_mb"] < row["size_mb"]
    # lesson 08's rows: bfloat16, then W8 / W4 in bfloat16 on the fused kernels (PyTorch's weight-only ones
    # here): the same codes as the float32 RTN rows, so the same perplexity within bfloat16's rounding
    bf16, w8, w4 = (by[m] for m in ("bfloat16", "bfloat16 + rtn w8 per-channel, fused",
                                    "bfloat16 + rtn w4 g128 symmetric, fused"))
    assert abs(bf16["perplexity"] / row["perplexity"] - 1) < 0.01 and bf16["size_mb"] < 0.55 * row["size_mb"]
    assert abs(w8["perplexity"] / by["rtn w8 per-channel"]["perplexity"] - 1) < 0.01
    assert abs(w4["perplexity"] / by["rtn w4 g128 symmetric"]["perplexity"] - 1) < 0.01
    assert w8["size_mb"] < bf16["size_mb"] and w4["size_mb"] < bf16["size_mb"]
    for key in ("size_mb", "perplexity", "tok_s_b1", "ttft_ms", "tpot_ms", "peak_mem_mb", "roofline_pct"):
        assert row[key] > 0, key
    assert 10 < row["size_mb"] < 60  # 6.6M params in fp32
    details = res["details"]["baseline float32"]
    runs = details["batch_1"]["total"]["runs"]
    assert len(runs) == 1 and min(runs) <= details["batch_1"]["total_s"] <= max(runs)  # smoke: 1 repeat
    assert details["roofline"]["floor_tokens_per_s"] > 0
    assert (tmp_path / "out" / "roofline.png").stat().st_size > 1000


@pytest.mark.parametrize("args, needle", [
    (["tour", "--model", "./no/such/dir"], "does not exist"),
    (["tour", "--model", "nonsense"], "unknown model"),
    (["tour", "--bogus"], "unrecognized arguments"),
    (["fly"], "invalid choice"),
])
def test_bad_arguments_give_one_line(args, needle):
    r = llmopt(*args)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_parser_has_the_commands():
    p = cli.build_parser()
    assert p.parse_args(["tour"]).command == "tour"
    assert p.parse_args(["train", "--out", "x", "--steps", "3"]).steps == 3


def test_bench_serve_small_workload(tmp_path):
    out = tmp_path / "serve.json"
    r = llmopt("bench", "serve", "--requests", "6", "--batch-size", "3", "--json", str(out), "--plot",
               str(tmp_path / "serve.png"))
    assert r.returncode == 0, r.stderr
    assert "llmopt engine" in r.stdout and "static batches of 3" in r.stdout
    res = json.loads(out.read_text())
    systems = [x["system"] for x in res["results"]]
    assert len(systems) == 3 and all(x["generated_tokens"] == sum(res["workload"]["output_tokens"])
                                     for x in res["results"])
    engine = res["results"][2]
    assert 0 <= engine["kv_waste"] < 0.5 and engine["tokens_per_s"] > 0 and engine["ttft_s"]["p50"] > 0
    assert (tmp_path / "serve.png").stat().st_size > 1000


def test_bench_serve_fp8_cache_in_a_small_memory(tmp_path):
    """`--systems engine engine-fp8 --kv-cache-mb 3`: in the same bytes the FP8 engine has 4x the
    blocks of the float32 one (the bundled model runs in float32 on a CPU) and serves every request.
    (3 MB: 64 float32 blocks, room for the longest single request of the workload.)"""
    out = tmp_path / "serve.json"
    r = llmopt("bench", "serve", "--requests", "6", "--systems", "engine", "engine-fp8", "--kv-cache-mb", "3",
               "--json", str(out))
    assert r.returncode == 0, r.stderr
    plain, fp8 = json.loads(out.read_text())["results"]
    assert fp8["system"].endswith("FP8 KV cache") and fp8["kv_blocks"] >= 4 * plain["kv_blocks"] > 0
    assert plain["kv_cache_MB"] <= 3.3 and fp8["kv_cache_MB"] <= 3.3
    assert plain["generated_tokens"] == fp8["generated_tokens"] > 0
    assert llmopt("bench", "serve", "--kv-cache-mb", "0").returncode != 0



def test_bench_decode_rows_and_floor(tmp_path):
    out = tmp_path / "decode.json"
    r = llmopt("bench", "decode", "--batch-sizes", "1", "2", "--new-tokens", "4", "--repeats", "1",
               "--variants", "hf", "eager", "w4-fused", "gemv", "--json", str(out))
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    rows = {(x["system"], x["batch"]): x for x in res["rows"]}
    assert set(rows) == {(s, b) for s in ("HF generate", "llmopt engine, eager", "llmopt engine, W4 + fused kernels",
                                          "llmopt engine, fused kernels, norm + SwiGLU in the GEMVs") for b in (1, 2)}
    b1 = rows[("llmopt engine, eager", 1)]
    assert 0 < b1["fraction_of_floor"] < 1 and b1["floor_tok_s"] > b1["tok_s"] > 0
    w4 = rows[("llmopt engine, W4 + fused kernels", 1)]
    assert w4["weight_MB"] < 0.5 * b1["weight_MB"]          # 4-bit codes and group scales
    assert "x HF generate" in r.stdout


def test_bench_decode_takes_a_dtype(tmp_path):
    out = tmp_path / "decode.json"
    r = llmopt("bench", "decode", "--dtype", "bfloat16", "--batch-sizes", "1", "--new-tokens", "4", "--repeats", "1",
               "--variants", "eager", "w4-fused", "--json", str(out))
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["dtype"] == "torch.bfloat16" and "(torch.bfloat16)" in r.stdout
    rows = {x["system"]: x for x in res["rows"]}
    assert rows["llmopt engine, eager"]["weight_MB"] < 12   # 2 bytes a weight: the bundled model's 22 MB halved


def test_serve_passes_the_engine_flags(monkeypatch):
    """`llmopt serve --kv-cache-dtype fp8 --num-scheduler-steps 4`: the flags reach the engine's
    arguments (the server itself is not started)."""
    from llmopt.serving import server

    got = {}
    monkeypatch.setattr(server, "serve", lambda model, **kw: got.update(kw, model=model))
    assert cli.main(["serve", "--model", "tinypy", "--kv-cache-dtype", "fp8", "--num-scheduler-steps", "4"]) == 0
    assert got["model"] == "tinypy" and got["kv_cache_dtype"] == "fp8" and got["num_scheduler_steps"] == 4
    with pytest.raises(SystemExit):                                       # not a choice: a one-line error
        cli.main(["serve", "--kv-cache-dtype", "int4"])
    assert got["speculative_config"] is None
    spec = '{"model": "tiny-random", "num_speculative_tokens": 3}'
    assert cli.main(["serve", "--speculative-config", spec]) == 0 and got["speculative_config"] == {
        "model": "tiny-random", "num_speculative_tokens": 3}
    assert cli.main(["serve", "--speculative-config", "{model: x}"]) == 2                    # not JSON
    assert cli.main(["serve", "--speculative-config", '{"method": "eagle"}']) == 2            # not a method we have
    assert cli.main(["serve", "--speculative-config", '{"draft": "tinypy"}']) == 2            # not a key we have
    assert got["compilation_config"] is None
    assert cli.main(["serve", "-O", "3"]) == 0 and got["compilation_config"] == 3
    assert cli.main(["serve", "--compilation-config", '{"level": 2}']) == 0
    assert got["compilation_config"] == {"level": 2}
    for bad in ("5", "max", '{"cudagraph_mode": 2}'):
        assert cli.main(["serve", "--compilation-config", bad]) == 2
