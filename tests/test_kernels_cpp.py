"""The C++ faces (lmarith._C through lmarith.bindings.ops) against kernels/reference.py.

combine must match the reference to float tolerance with the identical -inf/NaN pattern;
sample must pick the identical token for the same (seed, step), and its draws must follow
the filtered, renormalised softmax.
"""
from __future__ import annotations

import math

import pytest
import torch

from lmarith.bindings import ops
from lmarith.kernels import reference

pytestmark = pytest.mark.skipif(not ops.cpp_available(), reason="lmarith._C did not build")

INF = float("inf")
# Plan numbers are multiples of 1/4, so every norm is exact in float32 in both faces and
# the norm != 0 test cannot flip between them.
WEIGHT_STEPS = torch.tensor([-1.0, -0.5, -0.25, 0.25, 0.5, 1.0, 1.5])
COEF_STEPS = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0, 2.0])


def pick(steps: torch.Tensor, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    return steps[torch.randint(len(steps), shape, generator=gen)]


def random_plan(batch: int, num_terms: int, num_groups: int, gen: torch.Generator):
    """A plan with mixed union/intersection groups, negative and zero coefficients, and a
    linear block whose const keeps every nonzero total norm >= 1 (for a tight tolerance)."""
    num_blocks = 1 + 2 * num_groups
    weights = pick(WEIGHT_STEPS, (batch, num_blocks, num_terms), gen)
    weights = weights * (torch.rand(batch, num_blocks, num_terms, generator=gen) < 0.7)
    consts = pick(torch.tensor([0.0, 0.0, 0.25, -0.25, 0.5]), (batch, num_blocks), gen)
    coefs = pick(COEF_STEPS, (batch, num_groups), gen)
    kinds = torch.where(torch.rand(batch, num_groups, generator=gen) < 0.5, 1, -1).to(torch.int32)
    norms = weights.sum(-1) + consts
    if num_groups:
        sides = torch.maximum(norms[:, 1::2].abs(), norms[:, 2::2].abs())
        worst = (coefs.abs() * sides).sum(-1)
    else:
        worst = torch.zeros(batch)
    consts[:, 0] = 1.0 + worst - weights[:, 0].sum(-1)
    return weights, consts, coefs, kinds


def make_zero_norm_row(weights, consts, coefs, row: int) -> None:
    """Weights +1/-1 (const 0): every norm is 0, so scores stay unnormalised."""
    num_terms = weights.shape[2]
    weights[row], consts[row], coefs[row] = 0.0, 0.0, 0.0
    if num_terms >= 2:
        weights[row, 0, 0], weights[row, 0, 1] = 1.0, -1.0
        if coefs.shape[1]:
            weights[row, 1, 0], weights[row, 1, 1] = 1.0, -1.0
            weights[row, 2, 1], weights[row, 2, 0] = 1.0, -1.0
            coefs[row, 0] = -0.5
    else:
        weights[row, 0, 0], consts[row, 0] = 1.0, -1.0


def make_padded_row(logits, weights, consts, coefs, row: int, unused_from: int) -> None:
    """Terms >= unused_from get zero weight and garbage logits (NaN, +-inf) in this row."""
    weights[row, :, unused_from:] = 0.0
    garbage = torch.tensor([float("nan"), INF, -INF, 3e38])
    for term in range(unused_from, logits.shape[0]):
        logits[term, row] = garbage[torch.arange(logits.shape[2]) % 4]
    if unused_from == 0:
        consts[row] = 0.0
        coefs[row] = 0.0


def random_inputs(num_terms: int, batch: int, vocab: int, num_groups: int, seed: int):
    """Logits with -inf entries, tied values, identical rows across terms, and a plan with
    random, zero-norm and padded rows."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_terms, batch, vocab, generator=gen) * 3.0
    holes = torch.rand(num_terms, batch, vocab, generator=gen) < 0.02
    holes[:, 0::6] = False  # rows with only finite logits take the kernel's faster path
    logits[holes] = -INF
    logits[:, 2::4] = torch.round(logits[:, 2::4] * 2.0) / 2.0
    if num_terms >= 3:
        logits[2, 1::2] = logits[0, 1::2]
    weights, consts, coefs, kinds = random_plan(batch, num_terms, num_groups, gen)
    for row in range(batch):
        if row % 6 == 3:
            make_zero_norm_row(weights, consts, coefs, row)
        elif row % 6 == 4:
            make_padded_row(logits, weights, consts, coefs, row, unused_from=min(1, num_terms))
        elif row % 6 == 5:
            make_padded_row(logits, weights, consts, coefs, row, unused_from=0)
    if batch > 7:
        logits[0, 7] = -INF
        weights[7, 0, 0] = 1.0
    return logits, weights, consts, coefs, kinds


def near_tie_tokens(logits, weights, consts, coefs) -> torch.Tensor:
    """Tokens where a group's two sides differ by float noise but carry different norms:
    the pick there is a discontinuity of the spec, so the faces may legitimately differ."""
    values, norms = reference._row_blocks(reference._term_log_probs(logits), weights, consts)
    near = torch.zeros(values.shape[0], values.shape[2], dtype=torch.bool)
    for group in range(coefs.shape[1]):
        left, right = values[:, 1 + 2 * group], values[:, 2 + 2 * group]
        close = ((left - right).abs() <= 1e-4 * (1.0 + left.abs())) & (left != right)
        differ = (norms[:, 1 + 2 * group] != norms[:, 2 + 2 * group])[:, None]
        near |= close & differ & (coefs[:, group] != 0)[:, None]
    return near


def assert_same_pattern(got: torch.Tensor, want: torch.Tensor) -> None:
    assert torch.equal(torch.isnan(got), torch.isnan(want)), "NaN pattern differs"
    assert torch.equal(got == -INF, want == -INF), "-inf pattern differs"
    assert torch.equal(got == INF, want == INF), "+inf pattern differs"


def assert_combine_matches(logits, weights, consts, coefs, kinds) -> None:
    got, got_lse = ops.combine_cpp(logits, weights, consts, coefs, kinds)
    want, want_lse = reference.combine(logits, weights, consts, coefs, kinds)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert_same_pattern(got, want)
    assert_same_pattern(got_lse, want_lse)
    checked = torch.isfinite(want) & ~near_tie_tokens(logits.float(), weights, consts, coefs)
    torch.testing.assert_close(got[checked], want[checked], atol=1e-4, rtol=1e-5)
    finite_rows = torch.isfinite(want_lse)
    torch.testing.assert_close(got_lse[finite_rows], want_lse[finite_rows], atol=1e-4, rtol=1e-5)


# Every (T, B) pair on the small vocabulary; a spread of them on the large ones.
COMBINE_SHAPES = [(t, b, 111) for t in range(1, 6) for b in (1, 7, 33)]
COMBINE_SHAPES += [(1, 33, 32000), (2, 7, 32000), (3, 1, 32000), (4, 7, 32000), (5, 1, 32000)]
COMBINE_SHAPES += [(1, 7, 49152), (2, 1, 49152), (3, 33, 49152), (4, 1, 49152), (5, 7, 49152)]


@pytest.mark.parametrize("num_terms,batch,vocab", COMBINE_SHAPES)
def test_combine_matches_reference(num_terms: int, batch: int, vocab: int) -> None:
    num_groups = (num_terms + batch) % 3
    inputs = random_inputs(num_terms, batch, vocab, num_groups, seed=num_terms * 1000 + batch + vocab)
    assert_combine_matches(*inputs)


def test_combine_ties_take_left_norm_for_max_and_right_for_min() -> None:
    """Term 1 is one-hot at token 5 (log-prob 0 there, -inf elsewhere), so at token 5 the
    sides L0 (norm 1) and L0 + L1 (norm 2) tie exactly: max must use the left norm, min
    the right one."""
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 1, 257, generator=gen)
    logits[1] = -INF
    logits[1, 0, 5] = 0.0
    weights = torch.tensor([[[0.5, 0.0], [1.0, 0.0], [1.0, 1.0]]])
    consts = torch.zeros(1, 3)
    scores = {}
    for kind in (1, -1):
        kinds = torch.tensor([[kind]], dtype=torch.int32)
        assert_combine_matches(logits, weights, consts, torch.tensor([[2.0]]), kinds)
        got, lse = ops.combine_cpp(logits, weights, consts, torch.tensor([[2.0]]), kinds)
        scores[kind] = got[0, 5] + lse[0]
    log_prob = torch.log_softmax(logits[0, 0], -1)[5]
    torch.testing.assert_close(scores[1], 2.5 * log_prob / 2.5)
    torch.testing.assert_close(scores[-1], 2.5 * log_prob / 4.5)


def test_combine_forbidden_rules() -> None:
    """-inf in an active term forbids the token; in a zero-weight term it does not; a
    group whose picked side is -inf forbids it only when its coefficient is nonzero."""
    logits = torch.zeros(3, 1, 4)
    logits[0, 0, 0] = -INF
    logits[1, 0, 1] = -INF
    logits[2, 0, 2] = -INF
    weights = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0],
                             [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])
    consts = torch.zeros(1, 5)
    kinds = torch.tensor([[-1, 1]], dtype=torch.int32)
    got, _ = ops.combine_cpp(logits, weights, consts, torch.tensor([[1.0, 0.0]]), kinds)
    want, _ = reference.combine(logits, weights, consts, torch.tensor([[1.0, 0.0]]), kinds)
    assert torch.equal(got == -INF, torch.tensor([[True, True, True, False]]))
    assert_same_pattern(got, want)


def test_combine_bfloat16_logits() -> None:
    logits, weights, consts, coefs, kinds = random_inputs(3, 7, 32000, 1, seed=11)
    assert_combine_matches(logits.to(torch.bfloat16), weights, consts, coefs, kinds)


def test_combine_accepts_other_dtypes_and_layouts() -> None:
    logits, weights, consts, coefs, kinds = random_inputs(2, 5, 111, 1, seed=3)
    strided = logits.transpose(0, 1).contiguous().transpose(0, 1)
    got, _ = ops.combine(strided.double(), weights.double(), consts, coefs, kinds.long())
    want, _ = reference.combine(logits, weights, consts, coefs, kinds)
    assert_same_pattern(got, want)
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite], want[finite], atol=1e-4, rtol=1e-5)


def test_combine_rejects_bad_shapes() -> None:
    logits, weights, consts, coefs, kinds = random_inputs(2, 3, 111, 1, seed=1)
    with pytest.raises(ValueError, match="weights must have shape"):
        ops.combine(logits, weights[:, :, :1], consts, coefs, kinds)
    with pytest.raises(ValueError, match=r"logits must be \[T, B, V\]"):
        ops.combine(logits[0], weights, consts, coefs, kinds)
    with pytest.raises(ValueError, match="group_kinds must be an integer"):
        ops.combine(logits, weights, consts, coefs, kinds.float())


def test_falls_back_to_reference_without_extension(monkeypatch: pytest.MonkeyPatch) -> None:
    logits, weights, consts, coefs, kinds = random_inputs(2, 3, 111, 1, seed=2)
    monkeypatch.setattr(ops, "_C", None)
    got, _ = ops.combine(logits, weights, consts, coefs, kinds)
    want, _ = reference.combine(logits, weights, consts, coefs, kinds)
    assert torch.equal(got.nan_to_num(), want.nan_to_num())
    with pytest.raises(RuntimeError, match="not available"):
        ops.combine_cpp(logits, weights, consts, coefs, kinds)


# ---------------------------------------------------------------- sample

# (temperature, top_k, top_p, min_p) cycled over rows: greedy, plain, each filter, combos,
# and degenerate controls (top_k off by <= 0 or >= V, top_p 0, min_p above 1).
ROW_CONTROLS = [
    (0.0, 0, 1.0, 0.0), (1.0, 0, 1.0, 0.0), (0.7, 0, 1.0, 0.0), (1.3, 5, 1.0, 0.0),
    (1.0, 1, 1.0, 0.0), (0.8, 0, 0.9, 0.0), (1.0, 0, 0.5, 0.0), (1.0, 0, 0.999, 0.0),
    (1.0, 0, 1.0, 0.05), (0.6, 0, 1.0, 0.3), (0.9, 50, 0.95, 0.0), (1.1, 20, 0.8, 0.02),
    (0.8, 0, 0.9, 0.1), (1.0, 3, 0.3, 0.5), (-1.0, 7, 0.5, 0.1), (1.0, -4, 1.0, 0.0),
    (1.0, 1 << 30, 0.97, 0.0), (1.0, 0, 0.0, 0.0), (1.0, 0, 1.0, 1.5), (2.0, 0, 0.99, 1e-4),
]


def row_controls(batch: int, vocab: int, offset: int = 0):
    rows = [ROW_CONTROLS[(row + offset) % len(ROW_CONTROLS)] for row in range(batch)]
    temperature = torch.tensor([r[0] for r in rows])
    top_k = torch.tensor([r[1] if r[1] != 7 else vocab - 1 for r in rows], dtype=torch.int32)
    top_p = torch.tensor([r[2] for r in rows])
    min_p = torch.tensor([r[3] for r in rows])
    return temperature, top_k, top_p, min_p


def sample_log_probs(batch: int, vocab: int, seed: int) -> torch.Tensor:
    """Rows from peaked to nearly flat (so top-p crosses in crowded binades), with -inf
    entries, exact ties, a flat row and a single-survivor row."""
    gen = torch.Generator().manual_seed(seed)
    spread = torch.linspace(0.2, 6.0, batch)[:, None]
    logits = torch.randn(batch, vocab, generator=gen) * spread
    logits[torch.rand(batch, vocab, generator=gen) < 0.05] = -INF
    logits[1::5] = torch.round(logits[1::5])
    if batch > 3:
        logits[3] = 0.0
    if batch > 4:
        logits[4] = -INF
        logits[4, vocab // 2] = 0.0
    return torch.log_softmax(logits, dim=-1)


@pytest.mark.parametrize("batch,vocab", [(33, 111), (33, 32000), (33, 49152), (7, 2), (1, 49152)])
def test_sample_matches_reference(batch: int, vocab: int) -> None:
    log_probs = sample_log_probs(batch, vocab, seed=vocab + batch)
    for step in range(2 if vocab > 1000 else 6):
        controls = row_controls(batch, vocab, offset=step)
        seed = torch.arange(batch, dtype=torch.int64) * 7919 - 3 + (step << 33)
        steps = torch.full((batch,), step + 2 ** 32 - 1, dtype=torch.int64)
        got = ops.sample_cpp(log_probs, *controls, seed, steps)
        want = reference.sample(log_probs, *controls, seed, steps)
        assert got.dtype == torch.int64
        assert torch.equal(got, want), f"rows differ: {(got != want).nonzero().flatten().tolist()}"


def test_sample_on_combined_log_probs() -> None:
    """The engine's path: combine's output (with forbidden tokens) fed to sample."""
    logits, weights, consts, coefs, kinds = random_inputs(3, 33, 32000, 1, seed=9)
    log_probs, _ = reference.combine(logits, weights, consts, coefs, kinds)
    log_probs = log_probs.nan_to_num(nan=-INF)
    controls = row_controls(33, 32000)
    seed, step = torch.arange(33, dtype=torch.int64), torch.full((33,), 5, dtype=torch.int64)
    got = ops.sample(log_probs, *controls, seed, step)
    assert torch.equal(got, reference.sample(log_probs, *controls, seed, step))


def filtered_distribution(log_probs: torch.Tensor, temperature: float, top_k: int,
                          top_p: float, min_p: float) -> torch.Tensor:
    """The target law of one row in float64: softmax(log_probs / T) after the filters."""
    scaled = log_probs.double() / temperature
    if 0 < top_k < scaled.numel():
        scaled = scaled.masked_fill(scaled < torch.sort(scaled, descending=True).values[top_k - 1], -INF)
    probs = torch.softmax(scaled, dim=-1)
    mass_greater = torch.stack([probs[probs > p].sum() for p in probs])
    keep = (mass_greater < top_p) | (top_p >= 1.0)
    keep &= probs >= min_p * probs.max()
    kept = probs * keep
    return kept / kept.sum()


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [
    (1.0, 0, 1.0, 0.0), (0.7, 5, 0.9, 0.02), (1.4, 0, 0.75, 0.0), (1.0, 6, 1.0, 0.12)])
def test_sample_frequencies_follow_filtered_softmax(temperature, top_k, top_p, min_p) -> None:
    """200k independent draws (distinct seeds) per setting; each token's frequency lies
    within 5 standard errors of its target probability, and filtered tokens never appear."""
    draws, vocab = 200_000, 7
    log_probs = torch.log_softmax(torch.tensor([2.0, 1.2, 1.0, 0.3, -0.4, -1.5, -3.0]), -1)
    batch = log_probs.expand(draws, vocab).contiguous()
    full = lambda value, dtype=torch.float32: torch.full((draws,), value, dtype=dtype)  # noqa: E731
    seed = torch.arange(draws, dtype=torch.int64) * 2654435761 + 12345
    tokens = ops.sample_cpp(batch, full(temperature), full(top_k, torch.int32), full(top_p),
                            full(min_p), seed, full(17, torch.int64))
    freq = torch.bincount(tokens, minlength=vocab).double() / draws
    target = filtered_distribution(log_probs, temperature, top_k, top_p, min_p)
    assert torch.all(freq[target == 0] == 0), f"filtered tokens drawn: {freq.tolist()}"
    bound = 5.0 * torch.sqrt(target * (1 - target) / draws) + 1e-6
    assert torch.all((freq - target).abs() <= bound), f"freq {freq.tolist()} target {target.tolist()}"


def test_sample_is_reproducible_and_seed_sensitive() -> None:
    log_probs = sample_log_probs(64, 4096, seed=4)
    controls = (torch.full((64,), 1.0), torch.zeros(64, dtype=torch.int32),
                torch.full((64,), 0.95), torch.zeros(64))
    seed, step = torch.arange(64, dtype=torch.int64), torch.zeros(64, dtype=torch.int64)
    first = ops.sample_cpp(log_probs, *controls, seed, step)
    assert torch.equal(first, ops.sample_cpp(log_probs, *controls, seed, step))
    other_seed = ops.sample_cpp(log_probs, *controls, seed + 1000, step)
    other_step = ops.sample_cpp(log_probs, *controls, seed, step + 1)
    assert (first != other_seed).sum() > 16
    assert (first != other_step).sum() > 16


def test_sample_rows_are_independent_of_batching() -> None:
    """A row's token depends only on that row, whatever the batch and thread split."""
    batch, vocab = 33, 32000
    log_probs = sample_log_probs(batch, vocab, seed=8)
    controls = row_controls(batch, vocab)
    seed, step = torch.arange(batch, dtype=torch.int64) + 99, torch.full((batch,), 4, dtype=torch.int64)
    together = ops.sample_cpp(log_probs, *controls, seed, step)
    alone = [ops.sample_cpp(log_probs[i:i + 1], *(c[i:i + 1] for c in controls),
                            seed[i:i + 1], step[i:i + 1]) for i in range(batch)]
    assert torch.equal(together, torch.cat(alone))
    logits, weights, consts, coefs, kinds = random_inputs(3, 7, 32000, 1, seed=12)
    rows, _ = ops.combine_cpp(logits, weights, consts, coefs, kinds)
    singles = [ops.combine_cpp(logits[:, i:i + 1], weights[i:i + 1], consts[i:i + 1],
                               coefs[i:i + 1], kinds[i:i + 1])[0] for i in range(7)]
    assert torch.equal(rows.nan_to_num(), torch.cat(singles).nan_to_num())


def test_sample_rejects_bad_inputs() -> None:
    log_probs = torch.log_softmax(torch.randn(3, 10), -1)
    good = (torch.ones(3), torch.zeros(3, dtype=torch.int32), torch.ones(3), torch.zeros(3),
            torch.zeros(3, dtype=torch.int64), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="temperature must have shape"):
        ops.sample(log_probs, torch.ones(4), *good[1:])
    with pytest.raises(ValueError, match="seed must be an integer"):
        ops.sample(log_probs, *good[:4], torch.zeros(3), good[5])
    with pytest.raises(ValueError, match="one device"):
        ops.sample(log_probs, *good[:5], torch.zeros(3, dtype=torch.int64, device="meta"))
    assert math.isfinite(float(ops.sample(log_probs, *good)[0]))


def test_uniforms_stay_strictly_inside_the_unit_interval():
    """The largest and smallest hashes give u in (0, 1), so the Gumbel key stays finite."""
    hashes = torch.tensor([0, 1, 2**31, 2**32 - 1], dtype=torch.int64)
    u = reference.uniform_from_hash(hashes)
    assert (u > 0).all() and (u < 1).all()
    assert torch.isfinite(-torch.log(-torch.log(u))).all()
