"""Formula algebra: the model-arithmetic (value, norm) semantics on random logits,
written out by hand for each case, plus terms-as-values, JSON and user errors."""
import pytest
import torch

import lmarith as la
from lmarith.formula import EvalContext
from lmarith.kernels import reference as kernel_reference

NEG_INF = float("-inf")
MODEL = la.Model("/models/a")
OTHER = la.Model("/models/b")
HELPFUL = MODEL.prompt("You are helpful.")
RUDE = MODEL.prompt("You are rude.")
MAGIC = MODEL.prompt("You talk about magic.")


def _random_logits(num_terms, batch=4, vocab=37, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(num_terms, batch, vocab, generator=generator) * 3


def _term_lp(formula, logits):
    return {t: torch.log_softmax(logits[i], -1) for i, t in enumerate(formula.terms)}


def test_linear_formula_divides_by_its_norm():
    formula = HELPFUL - 0.6 * RUDE
    logits = _random_logits(2)
    lp = _term_lp(formula, logits)
    expected = torch.log_softmax((lp[HELPFUL] - 0.6 * lp[RUDE]) / 0.4, -1)
    torch.testing.assert_close(formula.log_probs(logits), expected)


def test_issue_example_with_union():
    formula = HELPFUL - 0.6 * RUDE + 2 * la.Union(HELPFUL, MAGIC)
    assert formula.terms == (HELPFUL, RUDE, MAGIC)
    logits = _random_logits(3, seed=1)
    lp = _term_lp(formula, logits)
    helpful_wins = lp[HELPFUL] >= lp[MAGIC]
    value = lp[HELPFUL] - 0.6 * lp[RUDE] + 2 * torch.maximum(lp[HELPFUL], lp[MAGIC])
    norm = 0.4 + 2 * torch.where(helpful_wins, 1.0, 1.0)
    torch.testing.assert_close(formula.log_probs(logits), torch.log_softmax(value / norm, -1))


def test_union_norm_comes_from_the_winning_side():
    formula = la.Union(HELPFUL, 0.5 * RUDE + 1.5 * MAGIC) + 0.0 * HELPFUL
    logits = _random_logits(3, seed=2)
    lp = _term_lp(formula, logits)
    right = 0.5 * lp[RUDE] + 1.5 * lp[MAGIC]
    left_wins = lp[HELPFUL] >= right
    value = torch.where(left_wins, lp[HELPFUL], right)
    norm = torch.where(left_wins, 1.0, 2.0)
    torch.testing.assert_close(formula.log_probs(logits), torch.log_softmax(value / norm, -1))


def test_intersection_mirrors_union_and_takes_right_norm_on_ties():
    formula = la.Intersection(HELPFUL, 2 * RUDE)
    logits = _random_logits(2, seed=3)
    lp = _term_lp(formula, logits)
    left_wins = lp[HELPFUL] < 2 * lp[RUDE]
    value = torch.where(left_wins, lp[HELPFUL], 2 * lp[RUDE])
    norm = torch.where(left_wins, 1.0, 2.0)
    torch.testing.assert_close(formula.log_probs(logits), torch.log_softmax(value / norm, -1))
    tie_value, tie_norm = la.Intersection(HELPFUL, 2 * HELPFUL - HELPFUL).evaluate(
        EvalContext(_term_lp(la.Intersection(HELPFUL, HELPFUL), logits[:1])))
    assert torch.all(tie_norm == 1.0)


def test_contrastive_formula_has_zero_norm_and_skips_division():
    formula = MODEL - OTHER
    logits = _random_logits(2, seed=4)
    lp = _term_lp(formula, logits)
    torch.testing.assert_close(formula.log_probs(logits),
                               torch.log_softmax(lp[MODEL.as_term()] - lp[OTHER.as_term()], -1))


def test_constants_have_value_and_norm_c():
    formula = HELPFUL + 2 + 0.5 * la.Constant(4)
    logits = _random_logits(1, seed=5)
    lp = torch.log_softmax(logits[0], -1)
    torch.testing.assert_close(formula.log_probs(logits), torch.log_softmax((lp + 4) / 5, -1))


def test_division_negation_and_right_subtraction():
    formula = (HELPFUL / 2) - (-RUDE) / 4
    logits = _random_logits(2, seed=6)
    lp = _term_lp(formula, logits)
    expected = torch.log_softmax((0.5 * lp[HELPFUL] + 0.25 * lp[RUDE]) / 0.75, -1)
    torch.testing.assert_close(formula.log_probs(logits), expected)
    assert dict((1 - HELPFUL).items)[HELPFUL] == -1.0


def test_negative_total_weight_is_rejected_with_a_reason():
    with pytest.raises(la.FormulaError, match="invert the distribution"):
        (RUDE - 2 * HELPFUL).log_probs(_random_logits(2))
    with pytest.raises(la.FormulaError):
        la.compile_plan(MODEL - 2 * la.Union(HELPFUL, RUDE))


def test_bad_operands_raise_formula_errors():
    with pytest.raises(la.FormulaError, match="products of two formulas"):
        HELPFUL * RUDE
    with pytest.raises(la.FormulaError, match="zero"):
        HELPFUL / 0
    with pytest.raises(la.FormulaError, match="must contain"):
        MODEL.prompt("sys", template="{system} only")
    with pytest.raises(la.FormulaError, match="expected logits for 2 terms"):
        (HELPFUL + RUDE).log_probs(_random_logits(3))


def test_terms_are_values():
    again = la.Model("/models/a").prompt("You are helpful.")
    assert again == HELPFUL and hash(again) == hash(HELPFUL)
    formula = HELPFUL + again + 0.5 * la.Union(HELPFUL, RUDE)
    assert formula.terms == (HELPFUL, RUDE)
    lookup = {term: i for i, term in enumerate(formula.terms)}
    assert lookup[again] == 0
    assert MODEL.as_term() != HELPFUL and (MODEL + MODEL).terms == (MODEL.as_term(),)
    assert dict((HELPFUL + again).items)[HELPFUL] == 2.0


def test_forbidden_tokens_stay_forbidden_under_negative_weights():
    logits = _random_logits(2, seed=7)
    logits[1, 0, 5] = NEG_INF
    result = (HELPFUL - 0.5 * RUDE).log_probs(logits)
    assert torch.isneginf(result[0, 5])
    assert torch.isfinite(result[1:]).all()


def test_top_p_top_k_filters_then_keeps_the_norm():
    inner = HELPFUL - 0.5 * RUDE
    formula = la.TopPTopK(inner, top_k=5, temperature=0.7)
    logits = _random_logits(2, seed=8)
    base = inner.log_probs(logits) / 0.7
    kth = torch.topk(base, 5).values[:, -1:]
    expected = torch.log_softmax(base.masked_fill(base < kth, NEG_INF), -1)
    torch.testing.assert_close(formula.log_probs(logits), expected)
    assert ((formula.log_probs(logits) > NEG_INF).sum(-1) == 5).all()
    mixed = MAGIC + la.TopPTopK(HELPFUL, top_p=0.5)
    assert mixed.norm_bounds() == (2.0, 2.0)


def test_self_debias_matches_its_equation():
    formula = la.SelfDebias(HELPFUL, RUDE, strength=10)
    logits = _random_logits(2, seed=9)
    lp = _term_lp(formula, logits)
    expected = torch.log_softmax(lp[HELPFUL] + 10 * torch.clamp(lp[HELPFUL].exp() - lp[RUDE].exp(), max=0), -1)
    torch.testing.assert_close(formula.log_probs(logits), expected)


def test_indicator_masks_where_formula_is_non_negative():
    formula = HELPFUL + la.Indicator(HELPFUL - RUDE)
    logits = _random_logits(2, seed=10)
    lp = _term_lp(formula, logits)
    mask = (lp[HELPFUL] - lp[RUDE] >= 0).float()
    torch.testing.assert_close(formula.log_probs(logits), torch.log_softmax((lp[HELPFUL] + mask) / (1 + mask), -1))


def test_classifier_biases_top_k_tokens_with_norm_zero():
    classifier = la.Classifier(HELPFUL, "/classifiers/tox", k=3)
    formula = HELPFUL + 0.5 * classifier
    logits = _random_logits(1, seed=11)
    lp = torch.log_softmax(logits[0], -1)
    seen = {}

    def scores(node, candidates):
        seen["candidates"] = candidates
        return torch.full(candidates.shape, -1.0)

    result = formula.log_probs(logits, classifier_scores=scores)
    top3 = torch.topk(lp, 3).indices
    assert torch.equal(seen["candidates"], top3)
    bias = torch.zeros_like(lp).scatter(-1, top3, -0.5)
    torch.testing.assert_close(result, torch.log_softmax(lp + bias, -1))
    with pytest.raises(la.FormulaError, match="classifier_scores"):
        formula.log_probs(logits)


def test_json_round_trip_of_every_node():
    formula = (HELPFUL - 0.6 * RUDE + 2 * la.Union(HELPFUL, MODEL.chat("Be kind."))
               + la.Intersection(MAGIC, 1.5) + la.TopPTopK(OTHER, top_k=3, top_p=0.9, temperature=0.5)
               + la.SelfDebias(MODEL, RUDE, 20) + la.Indicator(HELPFUL - RUDE)
               + 0.3 * la.Classifier(HELPFUL, la.ClassifierSpec("/c", label=0, template="x {input}"), k=7))
    text = formula.to_json()
    restored = la.Formula.from_json(text)
    assert restored == formula and restored.to_json() == text
    with pytest.raises(la.FormulaError, match="unknown formula op"):
        la.Formula.from_json('{"op": "nope"}')


@pytest.mark.parametrize("seed", range(5))
def test_compiled_plan_matches_formula_on_random_inputs(seed):
    generator = torch.Generator().manual_seed(seed)
    weights = (torch.rand(6, generator=generator) * 2).tolist()
    formula = (weights[0] * HELPFUL - 0.3 * weights[1] * RUDE + 1.5
               + weights[2] * la.Union(HELPFUL, MAGIC + 0.5)
               - 0.2 * la.Intersection(RUDE, weights[3] * MAGIC + weights[4] * HELPFUL)
               + weights[5] * MODEL)
    if formula.norm_bounds()[0] < 0:
        formula = formula + 3 * MODEL
    logits = _random_logits(len(formula.terms), batch=5, vocab=111, seed=seed)
    logits[0, 1, 7] = NEG_INF
    plan = la.compile_plan(formula)
    fused, lse = kernel_reference.combine(logits, *plan.tensors(batch_size=5))
    expected = formula.log_probs(logits)
    assert torch.equal(torch.isneginf(fused), torch.isneginf(expected))
    finite = torch.isfinite(expected)
    torch.testing.assert_close(fused[finite], expected[finite], atol=1e-5, rtol=1e-5)
    assert lse.shape == (5,)


def test_formulas_outside_the_plan_shape_have_no_plan():
    assert la.compile_plan(la.TopPTopK(HELPFUL, top_k=2)) is None
    assert la.compile_plan(HELPFUL + la.Union(la.Union(HELPFUL, RUDE), MAGIC)) is None
    assert la.compile_plan(HELPFUL + la.Indicator(RUDE)) is None
