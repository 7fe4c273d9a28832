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


# ---------------------------------------------------------------- bad input: one line, before any heavy work

def _no_benchmark(monkeypatch):
    """The benchmarks behind `llmopt bench` replaced by a stub that fails the test if it is reached:
    a bad argument must be refused before it (and an old build that ran them fails fast)."""
    from llmopt.serving import bench as serve_bench
    from llmopt.serving import http_bench

    got = {}

    def stub(*args, **kw):
        got.update(kw)
        raise AssertionError("the benchmark ran")
    for module, name in ((serve_bench, "main"), (serve_bench, "decode_main"), (http_bench, "main")):
        monkeypatch.setattr(module, name, stub)
    return got


@pytest.mark.parametrize("args, needle", [
    (["bench", "serve", "--systems"], "--systems"),
    (["bench", "decode", "--variants"], "--variants"),
    (["bench", "decode", "--batch-sizes"], "--batch-sizes"),
    (["bench", "kernels", "--config-rows"], "--config-rows"),
])
def test_empty_option_lists_are_refused_by_name(args, needle, monkeypatch, capsys):
    from llmopt.kernels import bench as kernels_bench

    _no_benchmark(monkeypatch)
    monkeypatch.setattr(kernels_bench, "main", lambda *a, **kw: pytest.fail("the benchmark ran"))
    with pytest.raises(SystemExit) as e:
        cli.main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and needle in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("args, needle", [
    (["bench", "serve", "--block-size", "0"], "--block-size"),
    (["bench", "serve", "--shared-prefix", "-5"], "--shared-prefix"),
    (["bench", "http", "--time-limit", "0"], "--time-limit"),
    (["bench", "http", "--time-limit", "-1"], "--time-limit"),
    (["bench", "decode", "--device", "gpu"], "device must be"),
    (["bench", "serve", "--device", "gpu"], "device must be"),
    (["bench", "kernels", "--device", "gpu"], "device must be"),
    (["bench", "http", "--device", "cpu"], "--device"),
    (["bench", "weight-only", "--device", "cpu"], "--device"),
    (["bench", "weight-only", "--rows", "-1"], "rows"),
    (["bench", "kernels", "--only", "nosuchkernel"], "nosuchkernel"),
    (["bench", "decode", "--json", "/no/such/dir/decode.json"], "does not exist"),
    (["bench", "serve", "--plot", "/no/such/dir/serve.png"], "does not exist"),
])
def test_bad_bench_arguments_fail_before_the_benchmark(args, needle, monkeypatch, capsys):
    _no_benchmark(monkeypatch)
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1, err


def test_bench_cuda_without_a_gpu_is_one_line(monkeypatch, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    _no_benchmark(monkeypatch)
    for what in ("kernels", "decode"):
        assert cli.main(["bench", what, "--device", "cuda"]) == 2
        assert "no CUDA GPU" in capsys.readouterr().err


def test_bench_passes_device_and_repeats_through(monkeypatch):
    """`--device` reaches decode and serve (it was ignored there), and decode's `--repeats` is not cut to 10."""
    got = _no_benchmark(monkeypatch)
    with pytest.raises(AssertionError, match="the benchmark ran"):
        cli.main(["bench", "decode", "--device", "cpu", "--repeats", "30"])
    assert got["device"] == "cpu" and got["repeats"] == 30
    got.clear()
    with pytest.raises(AssertionError, match="the benchmark ran"):
        cli.main(["bench", "serve", "--device", "cpu"])
    assert got["device"] == "cpu"


def test_missing_extras_name_the_one_to_install(monkeypatch, capsys, tmp_path):
    """On a core install (`pip install llmopt`) serve, bench http and export say which extra to add."""
    import sys

    from llmopt.export import onnx as export_onnx
    from llmopt.serving import server

    _no_benchmark(monkeypatch)
    monkeypatch.setattr(server, "serve", lambda *a, **kw: None)
    monkeypatch.setattr(export_onnx, "export_onnx", lambda *a, **kw: pytest.fail("the export ran"))
    monkeypatch.setitem(sys.modules, "uvicorn", None)   # find_spec: not installed
    monkeypatch.setitem(sys.modules, "onnx", None)
    for args, extra in ((["serve"], "serve"), (["bench", "http"], "serve"),
                        (["export", "onnx", "--out", str(tmp_path / "x")], "export")):
        assert cli.main(args) == 2
        err = capsys.readouterr().err
        assert f'pip install "llmopt[{extra}]"' in err and len(err.strip().splitlines()) == 1, err


def test_os_errors_are_one_line(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("")
    assert cli.main(["tour", "--out", str(afile)]) == 2      # FileExistsError: was a traceback
    assert "afile" in capsys.readouterr().err


def test_train_checks_lr_before_writing(tmp_path, capsys, monkeypatch):
    from llmopt import train

    monkeypatch.setattr(train, "build_bundled", lambda *a, **kw: pytest.fail("the training ran"))
    assert cli.main(["train", "--out", str(tmp_path / "m"), "--lr", "0"]) == 2
    assert "lr" in capsys.readouterr().err and not (tmp_path / "m").exists()
    assert cli.main(["train", "--out", str(tmp_path / "m"), "--ppl-tokens", "1"]) == 2
    assert cli.build_parser().parse_args(["train", "--out", "x", "--ppl-tokens", "4096"]).ppl_tokens == 4096


def test_help_lists_every_bench_mode(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "weight-only" in capsys.readouterr().out


class _Child:
    """The engine process's end of the pipe, for an engine run in a thread: the parent's close() of
    its copy must not close the thread's."""

    def __init__(self, conn):
        self.conn = conn

    def close(self):
        pass

    def __getattr__(self, name):
        return getattr(self.conn, name)


class _ThreadContext:
    """multiprocessing's spawn context with the engine process as a thread: the same messages, no new
    interpreter to start (seconds)."""

    def Pipe(self):
        import multiprocessing

        parent, child = multiprocessing.Pipe()
        return parent, _Child(child)

    def Process(self, target, args, name, daemon):
        import threading

        return threading.Thread(target=target, args=args, name=name, daemon=True)


def test_serve_engine_process_start_error_is_one_line(monkeypatch, capsys):
    """An engine argument error raised as the engine process starts is the same one-line error as with
    --engine-thread (it was a RuntimeError traceback)."""
    import multiprocessing

    monkeypatch.setattr(multiprocessing, "get_context", lambda method=None: _ThreadContext())
    spec = '{"method": "ngram", "num_speculative_tokens": 4}'
    assert cli.main(["serve", "--speculative-config", spec, "--num-scheduler-steps", "4"]) == 2
    err = capsys.readouterr().err   # the model's loading bar, then the error
    assert err.strip().splitlines()[-1].startswith("llmopt: error: speculative_config") and "Traceback" not in err


def test_http_report_with_nothing_answered():
    from llmopt.serving.http_bench import format_http

    r = {"model": "tinypy", "requests": 2, "concurrency": 1, "stream": True, "server_threads": 2,
         "engine_thread": False, "answered": 0, "duplicate_ids": 0, "kv_blocks_in_use_after": 0,
         "tokens_per_s": 0.0, "requests_per_s": 0.0, "ttft_s": {}, "latency_s": {}, "repeats": 1,
         "failed": [{"error": "no answer within the run's bound of 0.001 s"}]}
    text = format_http(r)
    assert "no request answered" in text and "0.001 s" in text


def _noisy_generation(monkeypatch):
    """bench.generation with the 1-token run slower than the whole one (one repeat on a busy machine)."""
    from llmopt import bench

    def generation(model, batch_size=1, prompt_len=32, new_tokens=64, **kw):
        return bench.GenerationResult(batch_size, prompt_len, new_tokens, ttft_s=0.07, tpot_s=-0.021, total_s=0.008,
                                      tokens_per_s=batch_size * new_tokens / 0.008, requests_per_s=1.0,
                                      peak_memory_bytes=0, memory_kind="none")
    monkeypatch.setattr(bench, "generation", generation)


def test_decode_and_tour_rows_survive_a_negative_tpot(monkeypatch):
    """TPOT is (whole run - 1-token run) / (tokens - 1): noise can make it negative. The row is printed
    and flagged, not a ValueError from the roofline that ends the run."""
    from llmopt import models, tour
    from llmopt.serving.bench import decode_benchmark, format_decode_row

    _noisy_generation(monkeypatch)
    res = decode_benchmark("tiny-random", batch_sizes=(1,), new_tokens=4, repeats=1, systems=("hf",))
    row = res["rows"][0]
    assert row["tpot_ms"] < 0 and "fraction_of_floor" not in row and "noise" in format_decode_row(row)
    model, tok = models.load("tiny-random")
    cfg = tour.TourConfig.smoke()
    row, details = tour.measure(model, tok, cfg, bandwidth=1e10, progress=False, perplexity=1.0)
    assert row["roofline_pct"] > 0 and details["roofline"].measured_s_per_token == 0.008 / cfg.new_tokens


def test_tour_w4_rows_use_a_group_the_model_allows():
    from llmopt import models, tour

    model, _ = models.load("tiny-random")          # 64-wide layers: groups of 128 do not fit
    assert tour.w4_group_size(model) == 64
    names = [name for name, _ in tour.techniques(None, tour.TourConfig.smoke(), "tiny-random", group_size=64)]
    assert "rtn w4 g64 symmetric" in names and not any("g128" in n for n in names)
    assert not any(n.startswith("bnb") for n in names)    # bitsandbytes loads a checkpoint, which it has not


def test_serve_benchmark_checks_shared_prefix_against_the_context():
    from llmopt.serving.bench import serve_benchmark

    with pytest.raises(ValueError, match="shared_prefix"):
        serve_benchmark("tiny-random", n=1, shared_prefix=300)    # tiny-random's context: 256 tokens
