"""The Triton MoE kernels against the sorted dispatch reference: in Triton's interpreter on CPU
(small shapes: it is numpy underneath), compiled on a GPU."""
import pytest
import torch

pytest.importorskip("triton")

from llmopt import moe  # noqa: E402
from llmopt.moe import triton_moe  # noqa: E402  (sets TRITON_INTERPRET=1 on a machine without CUDA)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def problem(T, H, inter, E, k, only=None, cap=None, seed=0):
    return moe.random_problem(T, H, inter, E, k, device=DEVICE, seed=seed, only=only, capacity_factor=cap)


@pytest.mark.parametrize("case", [
    dict(T=20, H=32, inter=48, E=4, k=2),                   # I not a multiple of the column tile
    dict(T=9, H=40, inter=32, E=6, k=1, only=[0, 3, 4]),    # top-1, experts without tokens, H not a tile multiple
    dict(T=7, H=32, inter=16, E=3, k=3),                    # top-k = E
    dict(T=24, H=32, inter=32, E=4, k=2, cap=0.5),          # dropped assignments
])
def test_triton_matches_sorted(case):
    args = problem(**case)
    want = moe.sorted_dispatch(*args)
    got = triton_moe.triton_dispatch(*args)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_align_blocks_pads_each_segment():
    experts = torch.tensor([[2, 0], [2, 1], [0, 2], [2, 0]])
    weights = torch.arange(8, dtype=torch.float32).reshape(4, 2)
    token, weight, block_expert = triton_moe.align_blocks(experts, weights, 4, block_m=4)
    # expert 0: tokens 0, 2, 3 (+1 pad); expert 1: token 1 (+3); expert 2: tokens 0, 1, 2, 3; expert 3: none
    assert block_expert.tolist() == [0, 1, 2]
    assert token.tolist() == [0, 2, 3, -1, 1, -1, -1, -1, 0, 1, 2, 3]
    assert weight.tolist() == [1, 4, 7, 0, 3, 0, 0, 0, 0, 2, 5, 6]


def test_triton_is_a_dispatch_path():
    layer = moe.MoEFeedForward(32, 32, 4, 2).to(DEVICE)
    x = torch.randn(10, 32, device=DEVICE)
    with torch.no_grad():
        want = layer(x)
        layer.experts.dispatch = "triton"
        got = layer(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_triton_gpu_speed_and_bf16():
    """On a GPU: bf16 agreement and the kernel timed against the loop path at a fine-grained shape."""
    times = moe.dispatch_times(4096, 1024, 256, 64, 8, paths=("sorted", "loop", "triton"), device="cuda",
                               dtype=torch.bfloat16)
    print({k: f"{v * 1e3:.2f} ms" for k, v in times.items()})
    assert times["triton"] < times["loop"]
