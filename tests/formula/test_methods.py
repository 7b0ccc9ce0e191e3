"""la.methods: each named method's formula against its paper's equation on random logits,
and through the engine against the reference decoder."""
from __future__ import annotations

import pytest
import torch

import lmarith as la
from lmarith import reference
from lmarith.methods import (classifier_free_guidance, dexperts, emulated_fine_tuning,
                             proxy_tuning, self_debiasing)

VOCAB = 50
M = la.Model("/models/m")
A, B, C = M.prompt("a"), M.prompt("b"), M.prompt("c")


def _law(formula, logits: dict) -> torch.Tensor:
    stacked = torch.stack([logits[term] for term in formula.terms])[:, None, :]
    return formula.log_probs(stacked)[0]


@pytest.fixture
def logits():
    generator = torch.Generator().manual_seed(7)
    return {term: 2.5 * torch.randn(VOCAB, generator=generator)
            for term in (A.canonical(), B.canonical(), C.canonical(), M.canonical())}


def _l(logits, term):
    return torch.log_softmax(logits[term.canonical()], -1)


def test_classifier_free_guidance(logits):
    got = _law(classifier_free_guidance(A, B, guidance_scale=1.7), logits)
    want = torch.log_softmax(_l(logits, B) + 1.7 * (_l(logits, A) - _l(logits, B)), -1)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("method", [proxy_tuning, emulated_fine_tuning])
def test_proxy_tuning_and_eft(method, logits):
    got = _law(method(A, B, C, 0.8), logits)
    want = torch.log_softmax(_l(logits, A) + 0.8 * (_l(logits, B) - _l(logits, C)), -1)
    torch.testing.assert_close(got, want)


def test_dexperts_filters_the_base_nucleus_first(logits):
    got = _law(dexperts(A, B, C, alpha=2.0, top_p=0.9), logits)
    base = _l(logits, A)
    probs, order = torch.sort(base.exp(), descending=True)
    keep_sorted = (torch.cumsum(probs, 0) - probs) <= 0.9     # mass of likelier tokens
    keep = torch.zeros(VOCAB, dtype=torch.bool)
    keep[order[keep_sorted]] = True
    scores = torch.where(keep, base + 2.0 * (_l(logits, B) - _l(logits, C)), float("-inf"))
    want = torch.log_softmax(scores, -1)
    assert torch.equal(torch.isinf(got), ~keep) and 1 < int(keep.sum()) < VOCAB
    torch.testing.assert_close(got[keep], want[keep])


def test_self_debiasing(logits):
    got = _law(self_debiasing(M, [B, C], strength=30.0), logits)
    plain = _l(logits, M)
    biased = torch.maximum(_l(logits, B), _l(logits, C)).exp()
    want = torch.log_softmax(plain + 30.0 * torch.clamp(plain.exp() - biased, max=0), -1)
    torch.testing.assert_close(got, want)
    with pytest.raises(la.FormulaError, match="at least one"):
        self_debiasing(M, [])


def test_methods_run_in_the_engine_as_the_reference_decodes(llama_dir, wide_dir):
    base, other = la.Model(str(llama_dir)), la.Model(str(wide_dir))
    formulas = [proxy_tuning(base, other.prompt("You are kind."), other),
                dexperts(base, base.prompt("You are kind."), base.prompt("You are rude.")),
                classifier_free_guidance(base.prompt("Talk about cats."), base),
                la.methods.contrastive_decoding(base, other, alpha=0.1)]
    llm = la.LLM(kv_cache_bytes=4 << 20)
    params = la.SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    for formula in formulas:
        got = llm.generate(["The cat sat"], formula, params)[0].token_ids
        assert got == reference.generate(formula, ["The cat sat"], 6, stop_at_eos=False)[0].token_ids
    llm.close()


def test_contrastive_decoding(logits):
    from lmarith.methods import contrastive_decoding
    formula = contrastive_decoding(A, B, alpha=0.1)
    got = _law(formula, logits)
    expert, amateur = _l(logits, A), _l(logits, B)
    plausible = expert.exp() >= 0.1 * expert.exp().max()
    want = torch.log_softmax(torch.where(plausible, expert - amateur, float("-inf")), -1)
    assert torch.equal(torch.isinf(got), ~plausible) and 1 < int(plausible.sum()) < VOCAB
    torch.testing.assert_close(got[plausible], want[plausible])
    assert la.parse_formula(str(formula)) == formula
    assert la.Formula.from_json(formula.to_json()) == formula
    with pytest.raises(la.FormulaError, match="alpha"):
        contrastive_decoding(A, B, alpha=0)


def test_fudge_adds_the_classifier_log_ratio_on_the_top_k(logits):
    generator = torch.Generator().manual_seed(3)
    table = torch.randn(VOCAB, generator=generator) - 1.0     # log P(a | prefix + t), per token t
    prefix = -0.7                                              # log P(a | prefix)
    seen = []

    def scores(node, candidates):
        seen.append((node.classifier, node.k))
        return table[candidates] - prefix

    formula = la.methods.fudge(A, la.ClassifierSpec("/classifiers/c", label=0), k=5, strength=1.5)
    stacked = torch.stack([logits[term] for term in formula.terms])[:, None, :]
    got = formula.log_probs(stacked, classifier_scores=scores)[0]
    base = _l(logits, A)
    top = torch.topk(base, 5).indices
    bonus = torch.zeros(VOCAB).scatter(-1, top, table[top] - prefix)
    torch.testing.assert_close(got, torch.log_softmax(base + 1.5 * bonus, -1))
    assert seen == [(la.ClassifierSpec("/classifiers/c", label=0), 5)]
    assert la.methods.fudge(A, "/c") == A + la.Classifier(A, la.ClassifierSpec("/c"), k=200)
    with pytest.raises(la.FormulaError, match="strength"):
        la.methods.fudge(A, "/c", strength=float("nan"))
    assert "fudge" in la.methods.__all__
