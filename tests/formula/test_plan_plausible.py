"""Plausible in the compiled plan: which shapes compile (a top-level Plausible of a plannable
formula with a linear reference of norm >= 0) and which stay with the general evaluator;
the fused combine (every face) against Formula.log_probs, the specification; stack_plans
mixing masked and unmasked rows; speculation's clear refusal."""
from __future__ import annotations

import math

import pytest
import torch

import lmarith as la
from lmarith.bindings import ops
from lmarith.decoding.speculative.laws import speculation_plan
from lmarith.formula.plan import NO_MASK, restrict_plan, stack_plans
from lmarith.kernels import reference as kernel_reference

M = la.Model("/models/m")
A, B, C = M.prompt("a"), M.prompt("b"), M.prompt("c")
TERMS = (A.canonical(), B.canonical(), C.canonical())

pytestmark = [pytest.mark.filterwarnings("ignore::RuntimeWarning"),  # interpreter's -inf math
              pytest.mark.filterwarnings("ignore:Conversion of an array:DeprecationWarning")]


def test_contrastive_decoding_compiles_to_a_masked_plan() -> None:
    plan = la.compile_plan(la.methods.contrastive_decoding(A, B, alpha=0.25))
    assert plan.terms == TERMS[:2] and plan.masked
    assert plan.weights == ((1.0, -1.0),) and plan.consts == (0.0,)
    assert plan.mask_weights == (1.0, 0.0) and plan.mask_log_alpha == math.log(0.25)


def test_plain_plans_carry_no_mask() -> None:
    plan = la.compile_plan(A - 0.5 * la.Union(B, C))
    assert not plan.masked and plan.mask_weights == () and plan.mask_log_alpha == NO_MASK
    assert stack_plans([plan, plan])[4:] == (None, None)


@pytest.mark.parametrize("formula,mask_weights,groups", [
    (la.Plausible(la.Union(A, B) + C, A, alpha=0.5), (1.0, 0.0, 0.0), 1),
    (la.Plausible(A - B, 0.5 * A + 0.5 * C), (0.5, 0.0, 0.5), 0),
    (la.Plausible(A - B, 1.5 * C - 0.5 * B), (0.0, -0.5, 1.5), 0),
    (la.Plausible(A - B, C + 1), (0.0, 0.0, 0.5), 0),          # reference norm 2: divided
    (la.Plausible(A - B, C - A), (-1.0, 0.0, 1.0), 0),         # norm 0: not divided
    (la.Plausible(la.Intersection(A, B) - la.Union(B, C), C), (0.0, 0.0, 1.0), 2),
])
def test_plausible_shapes_that_compile(formula, mask_weights, groups) -> None:
    plan = la.compile_plan(formula)
    assert plan is not None and plan.masked and len(plan.group_coefs) == groups
    padded = mask_weights[: len(plan.terms)]
    assert plan.mask_weights == pytest.approx(padded)


@pytest.mark.parametrize("formula", [
    la.Plausible(A, la.Union(A, B)),                     # reference not linear
    la.Plausible(la.Plausible(A - B, A), B),             # nested Plausible
    A + la.Plausible(A - B, A),                          # not the whole formula
    2 * la.Plausible(A, B),
    la.Union(la.Plausible(A, B), C),
    la.Plausible(la.TopPTopK(A, top_k=3), A),            # its formula has no plan
    la.Plausible(A - B, B - 2 * C),                      # reference norm < 0
    la.Plausible(A, la.Constant(1.0)),                   # reference without a term
])
def test_plausible_shapes_left_to_the_general_evaluator(formula) -> None:
    assert la.compile_plan(formula) is None


FORMULAS = [
    la.methods.contrastive_decoding(A, B, alpha=0.1),
    la.methods.contrastive_decoding(A, B, alpha=1.0),
    la.Plausible(A + 0.5 * la.Union(B, C), 0.5 * A + 0.5 * B, alpha=0.3),
    la.Plausible(la.Intersection(A, C) - 0.5 * B, 1.5 * C - 0.5 * B, alpha=0.05),
    la.Plausible(A - B, C + 1, alpha=0.2),
    la.Plausible(A - B, C - A, alpha=0.5),
]


def _logits(num_terms: int, rows: int, vocab: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    logits = 2.5 * torch.randn(num_terms, rows, vocab, generator=gen)
    logits[torch.rand(num_terms, rows, vocab, generator=gen) < 0.05] = float("-inf")
    return logits


def _assert_same_law(got: torch.Tensor, want: torch.Tensor) -> None:
    assert torch.equal(torch.isneginf(got), torch.isneginf(want))
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite], want[finite], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("index", range(len(FORMULAS)))
def test_fused_plan_equals_the_general_evaluator(index: int) -> None:
    formula = FORMULAS[index]
    logits = _logits(len(formula.terms), 5, 301, seed=index)
    want = formula.log_probs(logits)
    tensors = la.compile_plan(formula).tensors(batch_size=5)
    for face in ops.faces("combine"):
        got, _ = ops.run("combine", face, logits, *tensors)
        _assert_same_law(got, want)
    assert (~torch.isfinite(want)).any(-1).all() and int(torch.isfinite(want).any(-1).sum()) >= 4


def test_a_stacked_batch_mixes_masked_and_unmasked_rows() -> None:
    formulas = [FORMULAS[0], A + 0.5 * B, FORMULAS[3], C]
    plans = [la.compile_plan(f) for f in formulas]
    weights, consts, coefs, kinds, mask_weights, log_alpha = stack_plans(plans)
    assert mask_weights.shape == (4, 3) and log_alpha.shape == (4,)
    assert log_alpha[1] == log_alpha[3] == NO_MASK and not mask_weights[[1, 3]].any()
    assert log_alpha[0] == pytest.approx(math.log(0.1))
    logits = _logits(3, 4, 200, seed=11)
    for face in ops.faces("combine"):
        got, _ = ops.run("combine", face, logits, weights, consts, coefs, kinds, mask_weights,
                         log_alpha)
        for row, formula in enumerate(formulas):
            terms = len(formula.terms)
            _assert_same_law(got[row: row + 1], formula.log_probs(logits[:terms, row: row + 1]))
    fused, _ = kernel_reference.combine(logits, *stack_plans(plans))
    torch.testing.assert_close(fused.nan_to_num(), got.nan_to_num(), atol=1e-4, rtol=1e-5)


def test_speculation_refuses_masked_plans() -> None:
    slow = M.prompt("b", speculative_factor=2)
    with pytest.raises(la.FormulaError, match="Plausible"):
        speculation_plan(la.methods.contrastive_decoding(A, slow))
    with pytest.raises(ValueError, match="plausibility mask"):
        restrict_plan(la.compile_plan(FORMULAS[0]), (True, False))
    target = la.methods.contrastive_decoding(A, B)       # Speculative's target: its own plan
    assert speculation_plan(la.Speculative(target, la.NgramDraft(), k=3)) is not None
