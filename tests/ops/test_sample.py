"""sample through every face against kernels/reference.py: the identical token for the same
(seed, step), whatever the batch; draws that follow the filtered, renormalised softmax."""
from __future__ import annotations

import math

import pytest
import torch
import triton
import triton.language as tl

from lmarith.bindings import ops
from lmarith.kernels import reference
from lmarith.kernels.sample import _row_key, _uniform

OP = "sample"
INF = float("inf")
# Frequencies must lie within this many standard errors of the target probabilities.
FREQUENCY_SIGMAS = 5.0

pytestmark = [pytest.mark.filterwarnings("ignore::RuntimeWarning"),  # interpreter's -inf math
              pytest.mark.filterwarnings("ignore:Conversion of an array:DeprecationWarning")]

# (temperature, top_k, top_p, min_p) cycled over rows: greedy, plain, each filter, combos,
# and degenerate controls (top_k off by <= 0 or >= V, top_p 0, min_p above 1); top_k 7
# stands for V - 1.
ROW_CONTROLS = [
    (0.0, 0, 1.0, 0.0), (1.0, 0, 1.0, 0.0), (0.7, 0, 1.0, 0.0), (1.3, 5, 1.0, 0.0),
    (1.0, 1, 1.0, 0.0), (0.8, 0, 0.9, 0.0), (1.0, 0, 0.5, 0.0), (1.0, 0, 0.999, 0.0),
    (1.0, 0, 1.0, 0.05), (0.6, 0, 1.0, 0.3), (0.9, 50, 0.95, 0.0), (1.1, 20, 0.8, 0.02),
    (0.8, 0, 0.9, 0.1), (1.0, 3, 0.3, 0.5), (-1.0, 7, 0.5, 0.1), (1.0, -4, 1.0, 0.0),
    (1.0, 1 << 30, 0.97, 0.0), (1.0, 0, 0.0, 0.0), (1.0, 0, 1.0, 1.5), (2.0, 0, 0.99, 1e-4),
]
# Seven rows per launch: greedy, plain, each filter, and combinations.
MIXED_ROWS = [(0.0, 5, 0.5, 0.1), (1.0, 0, 1.0, 0.0), (0.7, 20, 1.0, 0.0), (1.3, 0, 0.8, 0.0),
              (1.0, 0, 1.0, 0.05), (0.5, 40, 0.9, 0.02), (2.0, 3, 0.6, 0.3)]
COMPILED = pytest.mark.compiled_faces  # shapes too large for the Triton interpreter


def row_controls(batch: int, vocab: int, offset: int = 0):
    """(temperature, top_k, top_p, min_p) per row, cycling ROW_CONTROLS from offset."""
    rows = [ROW_CONTROLS[(row + offset) % len(ROW_CONTROLS)] for row in range(batch)]
    temperature = torch.tensor([r[0] for r in rows])
    top_k = torch.tensor([r[1] if r[1] != 7 else vocab - 1 for r in rows], dtype=torch.int32)
    top_p, min_p = torch.tensor([r[2] for r in rows]), torch.tensor([r[3] for r in rows])
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


def tied_log_probs(gen: torch.Generator, rows: int, vocab: int) -> torch.Tensor:
    """Row log-probs with -inf entries and exact ties (every fifth token ties token 1)."""
    logits = 2.0 * torch.randn(rows, vocab, generator=gen)
    logits[torch.rand(rows, vocab, generator=gen) < 0.1] = -INF
    logits[:, 2::5] = logits[:, 1:2]
    logits[:, 0] = 1.0
    return torch.log_softmax(logits, dim=-1)


def assert_sample_matches(run_face, *args, **knobs) -> torch.Tensor:
    """The face's tokens are int64 and identical to the reference's."""
    got = run_face(*args, **knobs)
    want = reference.sample(*args)
    assert got.dtype == torch.int64
    assert torch.equal(got, want), f"rows differ: {(got != want).nonzero().flatten().tolist()}"
    return got


@pytest.mark.parametrize("batch,vocab", [
    (33, 111), (7, 2), (1, 111), pytest.param(33, 32000, marks=COMPILED),
    pytest.param(33, 49152, marks=COMPILED), pytest.param(1, 49152, marks=COMPILED)])
def test_sample_matches_reference(run_face, interpreted, batch: int, vocab: int) -> None:
    """Cycled controls over several steps, 64-bit seeds and steps past 2**32."""
    log_probs = sample_log_probs(batch, vocab, seed=vocab + batch)
    for step in range(2 if vocab > 1000 or interpreted else 6):
        controls = row_controls(batch, vocab, offset=step)
        seed = torch.arange(batch, dtype=torch.int64) * 7919 - 3 + (step << 33)
        steps = torch.full((batch,), step + 2 ** 32 - 1, dtype=torch.int64)
        assert_sample_matches(run_face, log_probs, *controls, seed, steps)


def assert_mixed_rows_match(run_face, vocab: int, **knobs) -> None:
    """MIXED_ROWS with random 64-bit seeds and 40-bit steps, twice."""
    gen = torch.Generator().manual_seed(vocab)
    temperature, top_k, top_p, min_p = (torch.tensor(c) for c in zip(*MIXED_ROWS))
    rows = len(MIXED_ROWS)
    for _ in range(2):
        seed = torch.randint(-2**62, 2**62, (rows,), generator=gen)
        step = torch.randint(0, 2**40, (rows,), generator=gen)
        assert_sample_matches(run_face, tied_log_probs(gen, rows, vocab), temperature,
                              top_k.to(torch.int64), top_p, min_p, seed, step, **knobs)


@pytest.mark.parametrize("vocab", [111, 1000])
def test_sample_matches_reference_mixed_rows(run_face, vocab: int) -> None:
    """Seven differently filtered rows in one launch, on tied log-probs."""
    assert_mixed_rows_match(run_face, vocab)


@pytest.mark.faces("triton")
def test_sample_triton_tiling_knobs(run_face) -> None:
    """A vocabulary in two tiles and a 4-bit radix for the top-k threshold search."""
    assert_mixed_rows_match(run_face, 1000, block_v=512, radix_bits=4)


def test_sample_edge_rows(run_face) -> None:
    """Ties at the top-k threshold, top_k out of range, top_p = 0, min_p = 1, lone token, and
    an all -inf row (whose token must still match the reference's)."""
    gen = torch.Generator().manual_seed(3)
    rows, vocab = 8, 111
    log_probs = torch.log_softmax(torch.randint(0, 6, (rows, vocab), generator=gen).float(), -1)
    log_probs[6] = -INF
    log_probs[6, 57] = 0.0
    log_probs[7] = -INF
    temperature = torch.tensor([1.0, 0.8, 1.0, 1.0, 1.0, 1.5, 1.0, 1.0])
    top_k = torch.tensor([3, 1, 500, -1, 0, 30, 4, 0])
    top_p = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.3, 0.7, 0.5, 0.9])
    min_p = torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.5, 0.0])
    seed, step = torch.arange(rows) * 7919, torch.full((rows,), 3)
    got = assert_sample_matches(run_face, log_probs, temperature, top_k, top_p, min_p, seed, step)
    assert got[2] == 0 and got[6] == 57


@pytest.mark.parametrize("batch,vocab", [(7, 111), pytest.param(33, 32000, marks=COMPILED)])
def test_sample_on_combined_log_probs(run_face, batch: int, vocab: int) -> None:
    """The engine's path: combine's output (forbidden tokens, NaN rows as -inf) fed to sample."""
    gen = torch.Generator().manual_seed(9)
    logits = 3.0 * torch.randn(3, batch, vocab, generator=gen)
    logits[torch.rand(3, batch, vocab, generator=gen) < 0.05] = -INF
    weights = torch.randint(-2, 3, (batch, 3, 3), generator=gen).float() / 2
    kinds = torch.where(torch.rand(batch, 1, generator=gen) < 0.5, 1, -1).to(torch.int32)
    log_probs, _ = reference.combine(logits, weights, torch.ones(batch, 3), torch.ones(batch, 1),
                                     kinds)
    log_probs = log_probs.nan_to_num(nan=-INF)
    assert (log_probs == -INF).any()
    seed, step = torch.arange(batch, dtype=torch.int64), torch.full((batch,), 5, dtype=torch.int64)
    assert_sample_matches(run_face, log_probs, *row_controls(batch, vocab), seed, step)


def filtered_distribution(log_probs: torch.Tensor, temperature: float, top_k: int,
                          top_p: float, min_p: float) -> torch.Tensor:
    """The target law of one row in float64: softmax(log_probs / T) after the filters."""
    scaled = log_probs.double() / temperature
    if 0 < top_k < scaled.numel():
        kth = torch.sort(scaled, descending=True).values[top_k - 1]
        scaled = scaled.masked_fill(scaled < kth, -INF)
    target_probs = torch.softmax(scaled, dim=-1)
    mass_greater = torch.stack([target_probs[target_probs > prob].sum() for prob in target_probs])
    keep = (mass_greater < top_p) | (top_p >= 1.0)
    keep &= target_probs >= min_p * target_probs.max()
    kept = target_probs * keep
    return kept / kept.sum()


@COMPILED  # 200k rows: far too many programs for the interpreter
@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [
    (1.0, 0, 1.0, 0.0), (0.7, 5, 0.9, 0.02), (1.4, 0, 0.75, 0.0), (1.0, 6, 1.0, 0.12)])
def test_sample_frequencies_follow_filtered_softmax(run_face, temperature, top_k, top_p, min_p):
    """200k independent draws (distinct seeds) per setting; each token's frequency lies
    within FREQUENCY_SIGMAS standard errors of its target probability, and filtered tokens
    never appear."""
    draws, vocab = 200_000, 7
    log_probs = torch.log_softmax(torch.tensor([2.0, 1.2, 1.0, 0.3, -0.4, -1.5, -3.0]), -1)
    rows = log_probs.expand(draws, vocab).contiguous()
    full = lambda value, dtype=torch.float32: torch.full((draws,), value, dtype=dtype)  # noqa: E731
    seed = torch.arange(draws, dtype=torch.int64) * 2654435761 + 12345
    tokens = run_face(rows, full(temperature), full(top_k, torch.int32), full(top_p),
                      full(min_p), seed, full(17, torch.int64))
    freq = torch.bincount(tokens, minlength=vocab).double() / draws
    target = filtered_distribution(log_probs, temperature, top_k, top_p, min_p)
    assert torch.all(freq[target == 0] == 0), f"filtered tokens drawn: {freq.tolist()}"
    bound = FREQUENCY_SIGMAS * torch.sqrt(target * (1 - target) / draws) + 1e-6
    assert torch.all((freq - target).abs() <= bound), f"{freq.tolist()} vs {target.tolist()}"


@pytest.mark.parametrize("batch,vocab", [(16, 111), pytest.param(64, 4096, marks=COMPILED)])
def test_sample_is_reproducible_and_seed_sensitive(run_face, batch: int, vocab: int) -> None:
    """Same (seed, step): same tokens; another seed or step: many rows change."""
    log_probs = sample_log_probs(batch, vocab, seed=4)
    controls = (torch.full((batch,), 1.0), torch.zeros(batch, dtype=torch.int32),
                torch.full((batch,), 0.95), torch.zeros(batch))
    seed, step = torch.arange(batch, dtype=torch.int64), torch.zeros(batch, dtype=torch.int64)
    first = run_face(log_probs, *controls, seed, step)
    assert torch.equal(first, run_face(log_probs, *controls, seed, step))
    assert (first != run_face(log_probs, *controls, seed + 1000, step)).sum() > batch // 4
    assert (first != run_face(log_probs, *controls, seed, step + 1)).sum() > batch // 4


@pytest.mark.parametrize("batch,vocab", [(7, 111), pytest.param(33, 32000, marks=COMPILED)])
def test_sample_rows_are_independent_of_batching(run_face, batch: int, vocab: int) -> None:
    """A row's token depends only on that row, whatever the batch and thread split."""
    log_probs = sample_log_probs(batch, vocab, seed=8)
    controls = row_controls(batch, vocab)
    seed = torch.arange(batch, dtype=torch.int64) + 99
    step = torch.full((batch,), 4, dtype=torch.int64)
    together = run_face(log_probs, *controls, seed, step)
    alone = [run_face(log_probs[i:i + 1], *(c[i:i + 1] for c in controls), seed[i:i + 1],
                      step[i:i + 1]) for i in range(batch)]
    assert torch.equal(together, torch.cat(alone))


def test_sample_is_reproducible_and_per_row(run_face) -> None:
    """Same (seed, step) gives the same token whatever the row's batch position; steps vary."""
    gen = torch.Generator().manual_seed(11)
    rows = 6
    log_probs = tied_log_probs(gen, rows, 111)
    ones, zeros, top_k = torch.ones(rows), torch.zeros(rows), torch.zeros(rows, dtype=torch.int64)
    seed, step = torch.full((rows,), 1234, dtype=torch.int64), torch.arange(rows)
    first = run_face(log_probs, ones, top_k, ones, zeros, seed, step)
    perm = torch.randperm(rows, generator=gen)
    again = run_face(log_probs[perm], ones, top_k, ones, zeros, seed[perm], step[perm])
    assert torch.equal(again, first[perm])
    same_row = log_probs[:1].expand(rows, -1)
    spread = assert_sample_matches(run_face, same_row, ones, top_k, ones, zeros, seed, step)
    assert len(set(spread.tolist())) > 1


def test_sample_rejects_bad_inputs(face: str, run_face) -> None:
    """Every face is behind the same checks (bindings/checks.py); good inputs run."""
    log_probs = torch.log_softmax(torch.randn(3, 10), -1)
    good = (torch.ones(3), torch.zeros(3, dtype=torch.int32), torch.ones(3), torch.zeros(3),
            torch.zeros(3, dtype=torch.int64), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="temperature must have shape"):
        ops.run(OP, face, log_probs, torch.ones(4), *good[1:])
    with pytest.raises(ValueError, match="seed must be an integer"):
        ops.run(OP, face, log_probs, *good[:4], torch.zeros(3), good[5])
    with pytest.raises(ValueError, match="one device"):
        ops.run(OP, face, log_probs, *good[:5], torch.zeros(3, dtype=torch.int64, device="meta"))
    assert math.isfinite(float(run_face(log_probs, *good)[0]))


def test_dispatch_picks_the_face_for_the_device() -> None:
    """CUDA -> triton; CPU -> cpp when lmarith._C built, else torch; ops.sample checks its
    inputs and runs that face (as does sample_cpp the cpp one)."""
    cpu_face = "cpp" if ops.cpp_available() else "torch"
    assert ops.face_for(OP, torch.device("cpu")) == cpu_face
    assert ops.face_for(OP, torch.device("cuda")) == "triton"
    log_probs = sample_log_probs(7, 111, seed=2)
    controls = (*row_controls(7, 111), torch.arange(7), torch.full((7,), 3))
    with pytest.raises(ValueError, match="seed must be an integer"):
        ops.sample(log_probs, *controls[:4], torch.zeros(7), controls[5])
    dispatched = ops.sample(log_probs, *controls)
    assert torch.equal(dispatched, ops.run(OP, cpu_face, log_probs, *controls))
    if ops.cpp_available():
        assert torch.equal(ops.sample_cpp(log_probs, *controls), dispatched)


def test_uniforms_stay_strictly_inside_the_unit_interval() -> None:
    """The largest and smallest hashes give u in (0, 1), so the Gumbel key stays finite."""
    hashes = torch.tensor([0, 1, 2**31, 2**32 - 1], dtype=torch.int64)
    u = reference.uniform_from_hash(hashes)
    assert (u > 0).all() and (u < 1).all()
    assert torch.isfinite(-torch.log(-torch.log(u))).all()


@triton.jit
def _uniform_kernel(seed_ptr, step_ptr, out_ptr, V, BLOCK_V: tl.constexpr):
    """Each row's in-kernel uniforms for tokens 0 .. V-1, as the sample kernel draws them."""
    row = tl.program_id(0)
    key = _row_key(tl.load(seed_ptr + row), tl.load(step_ptr + row))
    cols = tl.arange(0, BLOCK_V)
    tl.store(out_ptr + row * V + cols, _uniform(key, cols), mask=cols < V)


@pytest.mark.faces("triton")
def test_uniform_is_bit_exact(device: torch.device) -> None:
    """The in-kernel uint32 hash reproduces the reference uniforms bit for bit."""
    seed = torch.tensor([0, 1, -1, 2**62 + 12345, -(2**40) - 7, 0x9E3779B9], dtype=torch.int64)
    step = torch.tensor([0, 5, 2**31 + 3, 7, 2**33 + 1, 123456789], dtype=torch.int64)
    vocab = 2048
    out = torch.empty(len(seed), vocab, device=device)
    _uniform_kernel[(len(seed),)](seed.to(device), step.to(device), out, vocab, BLOCK_V=vocab)
    assert torch.equal(out.cpu(), reference.uniform(seed, step, vocab))


def test_filtered_log_probs_is_the_law_sample_draws_from() -> None:
    """Speculative verification compares filtered laws: they must be the laws `sample`
    draws from, and the temperature-only shortcut must equal the masked path."""
    log_probs = torch.log_softmax(torch.randn(2, 7, generator=torch.Generator().manual_seed(3)), -1)
    def controls(t: float, k: int, p: float, m: float):
        return (torch.tensor([t, t]), torch.tensor([k, k], dtype=torch.int32),
                torch.tensor([p, p]), torch.tensor([m, m]))

    shortcut = reference.filtered_log_probs(log_probs, *controls(0.7, 0, 1.0, 0.0))
    masked = reference.filtered_log_probs(log_probs, *controls(0.7, 0, 1.0, 1e-30))
    torch.testing.assert_close(shortcut, masked)
    law = reference.filtered_log_probs(log_probs, *controls(0.8, 5, 0.9, 0.05))
    draws = 20000
    seeds = torch.arange(draws, dtype=torch.int64)
    rows = log_probs[:1].expand(draws, -1)
    t, k, p, m = (c[:1].expand(draws) for c in controls(0.8, 5, 0.9, 0.05))
    tokens = reference.sample(rows, t, k, p, m, seeds, torch.zeros(draws, dtype=torch.int64))
    frequencies = torch.bincount(tokens, minlength=7).double() / draws
    expected = law[0].exp().double()
    sigma = (expected * (1 - expected) / draws).sqrt().clamp_min(1e-12)
    assert bool(((frequencies - expected).abs() <= FREQUENCY_SIGMAS * sigma + 1e-12).all())
