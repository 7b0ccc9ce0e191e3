"""Triton kernels (`lmarith.kernels.combine` / `.sample`) against the plain-torch reference.

Runs under TRITON_INTERPRET=1 (set by conftest.py) on CPU tensors. The interpreter pays per op
and per program, so shapes are small and batches mix many configurations per launch.
"""
from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from lmarith.kernels import reference as ref
from lmarith.kernels.combine import combine
from lmarith.kernels.sample import _row_key, _uniform, sample

NEG_INF = float("-inf")

# Interpreter noise: numpy warns on the -inf/inf arithmetic the kernels rely on, and on the
# interpreter's own conversion of one-element arrays used as loop bounds.
pytestmark = [pytest.mark.filterwarnings("ignore::RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:Conversion of an array:DeprecationWarning")]


def _random_plan(gen: torch.Generator, rows: int, terms: int, groups: int):
    """A random plan: sparse signed weights, small consts, signed or zero coefs, mixed kinds."""
    blocks = 1 + 2 * groups
    weights = torch.randn(rows, blocks, terms, generator=gen)
    weights[torch.rand(rows, blocks, terms, generator=gen) < 0.3] = 0.0
    consts = 0.2 * torch.randn(rows, blocks, generator=gen)
    coefs = torch.randn(rows, groups, generator=gen)
    coefs[torch.rand(rows, groups, generator=gen) < 0.2] = 0.0
    kinds = torch.where(torch.rand(rows, groups, generator=gen) < 0.5, 1, -1).to(torch.int32)
    return weights, consts, coefs, kinds


def _random_logits(gen: torch.Generator, terms: int, rows: int, vocab: int) -> torch.Tensor:
    """Logits with -inf entries and exact ties (also across terms), so row-blocks tie too."""
    logits = 3.0 * torch.randn(terms, rows, vocab, generator=gen)
    logits[torch.rand(terms, rows, vocab, generator=gen) < 0.05] = NEG_INF
    logits[:, :, 1::9] = logits[:, :, :1]
    if terms > 1:
        logits[1, :, :vocab // 4] = logits[0, :, :vocab // 4]
    return logits


def _assert_combine_matches(logits, weights, consts, coefs, kinds, **knobs) -> None:
    got, got_lse = combine(logits, weights, consts, coefs, kinds, **knobs)
    want, want_lse = ref.combine(logits, weights, consts, coefs, kinds)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.equal(torch.isneginf(got), torch.isneginf(want))
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5, equal_nan=True)
    torch.testing.assert_close(got_lse, want_lse, rtol=2e-5, atol=2e-5, equal_nan=True)


@pytest.mark.parametrize("terms,rows,vocab,groups,dtype,knobs", [
    (1, 1, 111, 0, torch.float32, {}),
    (2, 7, 1000, 1, torch.float32, {}),
    (3, 7, 111, 2, torch.float16, {}),
    (4, 7, 1000, 1, torch.bfloat16, {}),
    (2, 33, 111, 1, torch.float32, {}),
    (3, 2, 1000, 2, torch.float32, {"splits": 3, "block_v": 128}),
])
def test_combine_matches_reference(terms, rows, vocab, groups, dtype, knobs):
    gen = torch.Generator().manual_seed(1000 * terms + 10 * rows + groups)
    logits = _random_logits(gen, terms, rows, vocab).to(dtype)
    _assert_combine_matches(logits, *_random_plan(gen, rows, terms, groups), **knobs)


def test_combine_zero_norm_padding_and_strides():
    """Zero-norm rows (a - b), padded rows whose unused term is garbage, permuted logits."""
    gen = torch.Generator().manual_seed(7)
    rows, vocab = 4, 111
    logits = _random_logits(gen, 3, rows, vocab)
    weights, consts, coefs, kinds = _random_plan(gen, rows, 3, 1)
    weights[0] = torch.tensor([[1.0, -1.0, 0.0]] * 3)
    consts[0] = 0.0
    weights[1:3, :, 2] = 0.0
    logits[2, 1] = float("nan")
    logits[2, 2] = float("inf")
    strided = logits.permute(1, 0, 2).contiguous().permute(1, 0, 2)
    _assert_combine_matches(strided, weights, consts, coefs, kinds)


def test_combine_group_ties_take_the_documented_norm():
    """Equal sides with different norms: max keeps the left norm, min the right one.

    Logits 0 and very negative values make the log-probs exact (the sum-exp is exactly 1), so
    left = L_a (norm 1) and right = 2 * L_b (norm 2) tie exactly on tokens 0 and 1.
    """
    left = torch.tensor([0.0, -200.0, -300.0, -400.0, -500.0, -600.0])
    right = torch.tensor([0.0, -100.0, -160.0, -190.0, -240.0, -280.0])
    logits = torch.stack([left, right])[:, None, :].expand(2, 2, -1).contiguous()
    weights = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]]).expand(2, 3, 2).contiguous()
    consts = torch.zeros(2, 3)
    coefs = torch.ones(2, 1)
    kinds = torch.tensor([[1], [-1]], dtype=torch.int32)
    _assert_combine_matches(logits, weights, consts, coefs, kinds)


def test_combine_forbidden_token_under_negative_norm():
    """A forbidden token divided by a negative norm becomes +inf in the reference; match it."""
    logits = torch.tensor([[[0.0, NEG_INF, 1.0, 2.0]], [[1.0, 0.5, NEG_INF, 0.0]]])
    weights = torch.tensor([[[-1.0, 0.0]]])
    consts = torch.zeros(1, 1)
    empty = torch.zeros(1, 0)
    _assert_combine_matches(logits, weights, consts, empty, empty.to(torch.int32))


@triton.jit
def _uniform_kernel(seed_ptr, step_ptr, out_ptr, V, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    key = _row_key(tl.load(seed_ptr + row), tl.load(step_ptr + row))
    cols = tl.arange(0, BLOCK_V)
    tl.store(out_ptr + row * V + cols, _uniform(key, cols), mask=cols < V)


def test_uniform_is_bit_exact():
    """The in-kernel uint32 hash reproduces the reference uniforms bit for bit."""
    seed = torch.tensor([0, 1, -1, 2**62 + 12345, -(2**40) - 7, 0x9E3779B9], dtype=torch.int64)
    step = torch.tensor([0, 5, 2**31 + 3, 7, 2**33 + 1, 123456789], dtype=torch.int64)
    vocab = 2048
    out = torch.empty(len(seed), vocab)
    _uniform_kernel[(len(seed),)](seed, step, out, vocab, BLOCK_V=vocab)
    assert torch.equal(out, ref.uniform(seed, step, vocab))


def _log_probs(gen: torch.Generator, rows: int, vocab: int) -> torch.Tensor:
    """Row log-probs with -inf entries and exact ties."""
    logits = 2.0 * torch.randn(rows, vocab, generator=gen)
    logits[torch.rand(rows, vocab, generator=gen) < 0.1] = NEG_INF
    logits[:, 2::5] = logits[:, 1:2]
    logits[:, 0] = 1.0
    return torch.log_softmax(logits, dim=-1)


def _assert_sample_matches(log_probs, temperature, top_k, top_p, min_p, seed, step, **knobs):
    args = (log_probs, temperature, top_k, top_p, min_p, seed, step)
    got = sample(*args, **knobs)
    assert got.dtype == torch.int64
    assert torch.equal(got, ref.sample(*args))
    return got


# temperature, top_k, top_p, min_p per row: greedy, plain, each filter, and combinations.
MIXED_ROWS = [
    (0.0, 5, 0.5, 0.1),
    (1.0, 0, 1.0, 0.0),
    (0.7, 20, 1.0, 0.0),
    (1.3, 0, 0.8, 0.0),
    (1.0, 0, 1.0, 0.05),
    (0.5, 40, 0.9, 0.02),
    (2.0, 3, 0.6, 0.3),
]


@pytest.mark.parametrize("vocab,knobs", [(111, {}), (1000, {}),
                                         (1000, {"block_v": 512, "radix_bits": 4})])
def test_sample_matches_reference_mixed_rows(vocab, knobs):
    gen = torch.Generator().manual_seed(vocab)
    temperature, top_k, top_p, min_p = (torch.tensor(c) for c in zip(*MIXED_ROWS))
    top_k = top_k.to(torch.int64)
    rows = len(MIXED_ROWS)
    for _ in range(2):
        seed = torch.randint(-2**62, 2**62, (rows,), generator=gen)
        step = torch.randint(0, 2**40, (rows,), generator=gen)
        _assert_sample_matches(_log_probs(gen, rows, vocab), temperature, top_k, top_p, min_p,
                               seed, step, **knobs)


def test_sample_edge_rows():
    """Ties at the top-k threshold, top_k out of range, top_p = 0, min_p = 1, lone token."""
    gen = torch.Generator().manual_seed(3)
    rows, vocab = 7, 111
    levels = torch.randint(0, 6, (rows, vocab), generator=gen).float()
    log_probs = torch.log_softmax(levels, dim=-1)
    log_probs[6] = NEG_INF
    log_probs[6, 57] = 0.0
    temperature = torch.tensor([1.0, 0.8, 1.0, 1.0, 1.0, 1.5, 1.0])
    top_k = torch.tensor([3, 1, 500, -1, 0, 30, 4])
    top_p = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.3, 0.7, 0.5])
    min_p = torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.5])
    seed = torch.arange(rows) * 7919
    step = torch.full((rows,), 3)
    got = _assert_sample_matches(log_probs, temperature, top_k, top_p, min_p, seed, step)
    assert got[2] == 0 and got[6] == 57


def test_sample_is_reproducible_and_per_row():
    """Same (seed, step) gives the same token whatever the row's batch position; steps vary."""
    gen = torch.Generator().manual_seed(11)
    rows, vocab = 6, 111
    log_probs = _log_probs(gen, rows, vocab)
    ones, zeros = torch.ones(rows), torch.zeros(rows)
    top_k = torch.zeros(rows, dtype=torch.int64)
    seed = torch.full((rows,), 1234, dtype=torch.int64)
    step = torch.arange(rows)
    first = sample(log_probs, ones, top_k, ones, zeros, seed, step)
    perm = torch.randperm(rows, generator=gen)
    again = sample(log_probs[perm], ones, top_k, ones, zeros, seed[perm], step[perm])
    assert torch.equal(again, first[perm])
    same_row = log_probs[:1].expand(rows, -1)
    spread = sample(same_row, ones, top_k, ones, zeros, seed, step)
    assert torch.equal(spread, ref.sample(same_row, ones, top_k, ones, zeros, seed, step))
    assert len(set(spread.tolist())) > 1
