"""Contrastive decoding (a Plausible formula) through LLM.generate runs its plausibility mask
inside the fused combine kernel, and decodes exactly what the plan-less path (Formula.log_probs,
the specification) decodes: greedy, seeded sampling, and under prompt-lookup speculation."""
from __future__ import annotations

import pytest

import lmarith as la
from lmarith.core import request_builder
from lmarith.decoding import composer

PROMPTS = ["The cat sat", "Once upon a time"]


def _tokens(llm, formula, params):
    return [output.token_ids for output in llm.generate(PROMPTS, formula, params)]


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the combine calls that carried a plausibility mask."""
    calls = []
    real = composer.combine

    def spy(*args):
        calls.append(len(args) > 5 and args[5] is not None)
        return real(*args)
    monkeypatch.setattr(composer, "combine", spy)
    return calls


def test_contrastive_decoding_fused_equals_the_general_evaluator(llama_dir, wide_dir,
                                                                  fused_calls, monkeypatch):
    expert, amateur = la.Model(str(llama_dir)), la.Model(str(wide_dir))
    formulas = [la.methods.contrastive_decoding(expert, amateur, alpha=0.1),
                la.Plausible(expert + 0.5 * la.Union(amateur, expert.prompt("Be kind.")),
                             0.5 * expert + 0.5 * amateur, alpha=0.3)]
    params = [la.SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
              la.SamplingParams(temperature=0.9, seed=7, max_tokens=6, ignore_eos=True)]
    llm = la.LLM(kv_cache_bytes=8 << 20)
    try:
        fused = [_tokens(llm, f, p) for f in formulas for p in params]
        assert fused_calls and all(fused_calls)
        calls = len(fused_calls)
        monkeypatch.setattr(request_builder, "compile_plan", lambda formula: None)
        general = [_tokens(llm, f, p) for f in formulas for p in params]
        assert len(fused_calls) == calls      # no plan: Formula.log_probs, no combine
    finally:
        llm.close()
    assert fused == general


def test_contrastive_decoding_under_speculation(llama_dir, wide_dir):
    """Speculative(contrastive, NgramDraft) keeps the law (greedy tokens equal); a Plausible
    formula with speculative_factor > 1 is refused when the request is made."""
    expert, amateur = la.Model(str(llama_dir)), la.Model(str(wide_dir))
    target = la.methods.contrastive_decoding(expert, amateur)
    params = la.SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    llm = la.LLM(kv_cache_bytes=8 << 20)
    try:
        plain = _tokens(llm, target, params)
        assert _tokens(llm, la.Speculative(target, la.NgramDraft(), k=3), params) == plain
        slow = la.methods.contrastive_decoding(expert, amateur.as_term(speculative_factor=2))
        with pytest.raises(la.FormulaError, match="Plausible"):
            llm.generate(PROMPTS, slow, params)
    finally:
        llm.close()
