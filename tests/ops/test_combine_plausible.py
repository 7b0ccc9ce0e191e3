"""combine's plausibility mask (a Plausible formula: mask_weights [B, T], mask_log_alpha [B])
through every face against kernels/reference.py, on odd shapes, batches mixing masked and
unmasked rows, alpha = 1 (only ties with the argmax survive), and -inf in the reference.

Tolerances. Plans are quarter plans (multiples of 1/4, top-level norm >= 1, as in
test_combine.py): finite values to 1e-4 abs + 1e-5 rel. The faces compute the reference
score in different (exact in real arithmetic) ways, so a token whose score lies within float
noise of the threshold, or of the row maximum, may be kept by one face and dropped by
another: those tokens (and the lse of their rows) are left out; exact ties are kept.
"""
from __future__ import annotations

import math

import pytest
import torch

from lmarith.bindings import ops
from lmarith.kernels import reference

OP = "combine"
INF = float("inf")
ATOL, RTOL = 1e-4, 1e-5
NEAR = 1e-4   # |score - threshold| (or - max) below NEAR * (1 + |threshold|) and nonzero: left out

pytestmark = [pytest.mark.filterwarnings("ignore::RuntimeWarning"),  # interpreter's -inf math
              pytest.mark.filterwarnings("ignore:Conversion of an array:DeprecationWarning")]


def quarter_plan(batch: int, num_terms: int, num_groups: int, gen: torch.Generator):
    """Weights and coefficients in quarters, a top-level const making every norm >= 1."""
    steps = torch.tensor([-0.5, -0.25, 0.25, 0.5, 1.0, 1.5])
    blocks = 1 + 2 * num_groups
    weights = steps[torch.randint(len(steps), (batch, blocks, num_terms), generator=gen)]
    weights = weights * (torch.rand(batch, blocks, num_terms, generator=gen) < 0.7)
    consts = torch.zeros(batch, blocks)
    coefs = torch.tensor([0.5, 1.0, -0.5])[torch.randint(3, (batch, num_groups), generator=gen)]
    kinds = torch.where(torch.rand(batch, num_groups, generator=gen) < 0.5, 1, -1).to(torch.int32)
    norms = weights.sum(-1)
    worst = (coefs.abs() * torch.maximum(norms[:, 1::2].abs(), norms[:, 2::2].abs())).sum(-1)
    consts[:, 0] = 1.0 + worst - weights[:, 0].sum(-1)
    return weights, consts, coefs, kinds


def reference_rows(batch: int, num_terms: int, gen: torch.Generator) -> torch.Tensor:
    """Mask weights: one term alone, an average of two, or 1.5 a - 0.5 b (all norm 1)."""
    mask = torch.zeros(batch, num_terms)
    for row in range(batch):
        first = int(torch.randint(num_terms, (), generator=gen))
        other = (first + 1) % num_terms
        shape = row % 3 if num_terms > 1 else 0
        mask[row, first] = (1.0, 0.5, 1.5)[shape]
        if shape:
            mask[row, other] += (0.0, 0.5, -0.5)[shape]
    return mask


def masked_inputs(num_terms: int, batch: int, vocab: int, num_groups: int, alpha: float,
                  seed: int, top: float | None = None):
    """Logits with -inf holes and tokens exactly tied with token 0 (raised to `top` + U(0,1)
    in every term when given, so that it is every reference's maximum), a quarter plan, and
    a mask on every row but row 1 (log_alpha -inf)."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_terms, batch, vocab, generator=gen) * 3.0
    if top is not None:
        logits[:, :, 0] = top + torch.rand(num_terms, batch, generator=gen)
    logits[:, :, 3::11] = logits[:, :, :1]
    holes = torch.rand(num_terms, batch, vocab, generator=gen) < 0.05
    holes[:, :, 0] = False
    logits[holes] = -INF
    plan = quarter_plan(batch, num_terms, num_groups, gen)
    log_alpha = torch.full((batch,), math.log(alpha))
    if batch > 1:
        log_alpha[1] = -INF
    return (logits, *plan, reference_rows(batch, num_terms, gen), log_alpha)


def unsure_tokens(logits, mask_weights, mask_log_alpha) -> torch.Tensor:
    """Tokens of masked rows within float noise of the threshold or of the row maximum."""
    scores, _ = reference._row_blocks(reference._term_log_probs(logits.float()),
                                      mask_weights[:, None, :], torch.zeros(len(mask_weights), 1))
    scores = scores[:, 0]
    top = scores.max(-1, keepdim=True).values
    unsure = torch.zeros_like(scores, dtype=torch.bool)
    for level in (top + mask_log_alpha[:, None], top):
        gap = (scores - level).abs()
        unsure |= (gap <= NEAR * (1.0 + level.abs())) & (gap != 0)
    return unsure & (mask_log_alpha > -INF)[:, None]


def assert_matches(run_face, inputs, **knobs):
    """The face against the reference: the same -inf/NaN pattern and finite values, unsure
    tokens excepted; returns the face's result."""
    got, got_lse = run_face(*inputs, **knobs)
    want, want_lse = reference.combine(*inputs)
    unsure = unsure_tokens(inputs[0], *inputs[5:])
    sure_rows = ~unsure.any(-1)
    for pattern in (torch.isnan, torch.isneginf, torch.isposinf):
        assert torch.equal(pattern(got)[sure_rows], pattern(want)[sure_rows]), pattern.__name__
    checked = torch.isfinite(want) & ~unsure & sure_rows[:, None]
    torch.testing.assert_close(got[checked], want[checked], atol=ATOL, rtol=RTOL)
    rows = sure_rows & torch.isfinite(want_lse)
    torch.testing.assert_close(got_lse[rows], want_lse[rows], atol=ATOL, rtol=RTOL)
    assert torch.equal(torch.isfinite(got_lse)[sure_rows], torch.isfinite(want_lse)[sure_rows])
    return got, got_lse


SHAPES = [(t, b, v) for t in (1, 2, 3, 4) for b in (1, 3) for v in (1, 7, 4099)]


@pytest.mark.parametrize("num_terms,batch,vocab", SHAPES)
def test_masked_combine_matches_reference(run_face, num_terms, batch, vocab) -> None:
    """Every face on odd shapes, 0 to 2 groups, alpha 0.1 / 0.5 / 1, row 1 unmasked."""
    alpha = (0.1, 0.5, 1.0)[(num_terms + vocab) % 3]
    inputs = masked_inputs(num_terms, batch, vocab, (num_terms + batch) % 3, alpha,
                           seed=100 * num_terms + 10 * batch + vocab)
    got, _ = assert_matches(run_face, inputs)
    if batch > 1:  # the unmasked row is what combine gives without a mask
        plain, _ = reference.combine(*inputs[:5])
        assert torch.equal(got[1].nan_to_num(), run_face(*inputs[:5])[0][1].nan_to_num())
        assert torch.equal(torch.isinf(got[1]), torch.isinf(plain[1]))


def test_alpha_one_keeps_only_the_argmax_ties(run_face) -> None:
    """alpha = 1: exactly the tokens tied with the reference's maximum survive (the ties are
    bit-equal logits, so every face must keep all of them and nothing else)."""
    inputs = list(masked_inputs(3, 3, 300, 1, 1.0, seed=4, top=40.0))
    inputs[6] = torch.zeros(3)                      # every row masked, log(1) = 0
    got, lse = assert_matches(run_face, inputs)
    logits, mask_weights = inputs[0], inputs[5]
    for row in range(3):
        read = mask_weights[row] != 0
        tied = (logits[read, row] == logits[read, row, :1]).all(0)
        plan_finite = torch.isfinite(reference.combine(*inputs[:5])[0][row])
        assert torch.equal(torch.isfinite(got[row]), tied & plan_finite)
    assert torch.isfinite(lse).all()


def test_reference_with_neg_inf_logits(run_face) -> None:
    """-inf in the reference drops the token (also when the plan does not read that term); a
    reference that is -inf everywhere, or whose logits hold a NaN, keeps no token at all."""
    gen = torch.Generator().manual_seed(9)
    logits = torch.randn(2, 4, 64, generator=gen)
    logits[1, :, ::3] = -INF                        # term 1 is the reference only
    logits[1, 2] = -INF
    logits[1, 3, 5] = float("nan")
    weights = torch.zeros(4, 1, 2)
    weights[:, 0, 0] = 1.0
    mask_weights = torch.tensor([[0.0, 1.0]] * 4)
    log_alpha = torch.tensor([math.log(0.01), math.log(1e-30), math.log(0.5), math.log(0.5)])
    empty = torch.zeros(4, 0)
    inputs = (logits, weights, torch.zeros(4, 1), empty, empty.to(torch.int32), mask_weights,
              log_alpha)
    got, lse = assert_matches(run_face, inputs)
    assert torch.isneginf(got[:2, ::3]).all() and torch.isfinite(got[1, 1::3]).all()
    assert not torch.isfinite(got[2:]).any() and torch.isneginf(lse[2:]).all()


def test_mixed_batch_rows_are_independent(run_face) -> None:
    """Each row of a batch mixing masked and unmasked rows equals that row run alone (an
    unmasked row alone runs without mask inputs at all)."""
    inputs = masked_inputs(3, 3, 500, 1, 0.2, seed=21)
    rows, _ = run_face(*inputs)
    for row in range(3):
        alone = [tensor[:, row: row + 1] if i == 0 else tensor[row: row + 1]
                 for i, tensor in enumerate(inputs)]
        if row == 1:
            alone = alone[:5]
        single, _ = run_face(*alone)
        assert torch.equal(rows[row: row + 1].nan_to_num(), single.nan_to_num())


@pytest.mark.faces("triton")
def test_masked_combine_triton_tiling_knobs(run_face) -> None:
    """Several vocabulary splits per row and a small tile: the reference's maximum is merged
    across chunks."""
    inputs = masked_inputs(2, 3, 1000, 1, 0.3, seed=5)
    assert_matches(run_face, inputs, splits=3, block_v=128)


def test_masked_combine_low_precision_logits(run_face) -> None:
    """float16 and bfloat16 logits: converted like the plan's, same mask."""
    logits, *rest = masked_inputs(2, 3, 333, 1, 0.1, seed=8)
    for dtype in (torch.float16, torch.bfloat16):
        assert_matches(run_face, (logits.to(dtype), *rest))


def test_mask_inputs_are_checked(face: str) -> None:
    """Both mask inputs or neither, with shapes [B, T] and [B], floating-point."""
    logits, *plan, mask_weights, log_alpha = masked_inputs(2, 3, 7, 1, 0.1, seed=1)
    with pytest.raises(ValueError, match="go together"):
        ops.run(OP, face, logits, *plan, mask_weights, None)
    with pytest.raises(ValueError, match="go together"):
        ops.run(OP, face, logits, *plan, None, log_alpha)
    with pytest.raises(ValueError, match="mask_weights must have shape"):
        ops.run(OP, face, logits, *plan, mask_weights[:, :1], log_alpha)
    with pytest.raises(ValueError, match="mask_log_alpha must have shape"):
        ops.run(OP, face, logits, *plan, mask_weights, log_alpha[:1])
    with pytest.raises(ValueError, match="mask_log_alpha must be a floating-point"):
        ops.run(OP, face, logits, *plan, mask_weights, log_alpha.to(torch.int64))


def test_dispatch_passes_the_mask() -> None:
    """ops.combine hands the mask to the face of the device."""
    inputs = masked_inputs(2, 3, 50, 0, 0.1, seed=2)
    got, _ = ops.combine(*inputs)
    face = ops.face_for(OP, torch.device("cpu"))
    assert torch.equal(got.nan_to_num(), ops.run(OP, face, *inputs)[0].nan_to_num())
    assert not torch.equal(torch.isinf(got), torch.isinf(ops.combine(*inputs[:5])[0]))
