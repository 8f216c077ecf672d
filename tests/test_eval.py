"""Strided sliding-window evaluation: every target scored exactly once with enough context."""
import math

import numpy as np
import pytest
import torch

from llp_pretrain.evaluate import score_windows, summarize, unigram_eval, window_plan


@pytest.mark.parametrize("L,N,stride,T", [(200, 16, 8, 16), (200, 16, 16, 16), (201, 16, 5, 16), (17, 16, 4, 16),
                                          (100, 16, 3, 4), (97, 32, 7, 8), (50, 8, 1, 8)])
def test_each_target_scored_once_with_context(L, N, stride, T):
    plan = window_plan(L, N, stride, T)
    scored = []
    for k, (b, j0) in enumerate(plan):
        assert 0 <= b and b + N <= L - 1 + 0 and b + N + 1 <= L  # window and its targets are inside
        assert N - T <= j0 <= N
        for j in range(j0, N):
            scored.append(b + j + 1)  # target index
            if k > 0:
                assert j >= N - stride  # at least seq_len - stride tokens of context before the target
    assert sorted(scored) == list(range(N - T + 1, L))  # every target once (all of them when T == N)


def test_bad_stride_and_short_stream():
    with pytest.raises(ValueError, match="stride"):
        window_plan(100, 16, 9, 8)
    with pytest.raises(ValueError, match="at least seq_len"):
        window_plan(16, 16, 4, 16)


class Bigram(torch.nn.Module):
    """Logits depend only on the current token, so each target's NLL is context-free and the strided
    sum must equal the plain sum over all targets; it also counts forward calls."""

    def __init__(self, V, T):
        super().__init__()
        torch.manual_seed(0)
        self.table = torch.randn(V, V)
        self.T = T
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.table[x][:, -self.T:]


@pytest.mark.parametrize("T,stride", [(16, 5), (16, 16), (6, 6), (6, 2)])
def test_score_windows_equals_direct_sum(T, stride):
    V, N, L = 11, 16, 123
    g = torch.Generator().manual_seed(1)
    stream = torch.randint(0, V, (L,), generator=g)
    model = Bigram(V, T)
    plan = window_plan(L, N, stride, T)
    nll, n = score_windows(model, stream, plan, N, T, batch_size=3)
    logp = torch.log_softmax(model.table, -1)
    first = N - T + 1
    direct = -sum(float(logp[stream[t - 1], stream[t]]) for t in range(first, L))
    assert n == L - first
    assert nll == pytest.approx(direct, rel=1e-9, abs=1e-6)
    # padding calls (for ZeRO-3 ranks with fewer windows) do not change the result
    model.calls = 0
    nll2, n2 = score_windows(model, stream, plan, N, T, batch_size=3, pad_to=len(plan))
    assert (nll2, n2) == (nll, n) and model.calls == len(plan)


def test_summary_and_unigram():
    r = summarize(nll_sum=2.0 * 100, tokens=100, bpt=4.0)
    assert r.loss == pytest.approx(2.0) and r.ppl == pytest.approx(math.exp(2.0))
    assert r.bits_per_byte == pytest.approx(2.0 / math.log(2) / 4.0)
    counts = np.array([0, 3, 1])
    u = unigram_eval(counts, np.array([1, 2]))
    p = (counts + 1) / (counts.sum() + 3)
    assert u.loss == pytest.approx(-(math.log(p[1]) + math.log(p[2])) / 2)
