import torch

from llmopt import exercises


def gptq_column(W, U, i, scale, bits, divide=True, spread=True, clamp=True):
    qmax = 2 ** (bits - 1) - 1
    q = torch.round(W[:, i] / scale)
    if clamp:
        q = torch.clamp(q, -qmax, qmax)
    e = (W[:, i] - q * scale) / (U[i, i] if divide else 1)
    W = W.clone()
    if spread:
        W[:, i + 1 :] -= e[:, None] * U[i, i + 1 :][None, :]
    return q, W


def test_check_gptq_column(capsys):
    assert exercises.check_gptq_column(gptq_column)
    assert not exercises.check_gptq_column(lambda *a: gptq_column(*a, spread=False))
    assert not exercises.check_gptq_column(lambda *a: gptq_column(*a, divide=False))
    assert not exercises.check_gptq_column(lambda *a: gptq_column(*a, clamp=False))
    assert not exercises.check_gptq_column(lambda W, U, i, s, b: (torch.trunc(W[:, i] / s), W))  # truncates
    capsys.readouterr()

    def stub(*a):
        raise NotImplementedError
    assert not exercises.check_gptq_column(stub)
    assert "not attempted yet" in capsys.readouterr().out
