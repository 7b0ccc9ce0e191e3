"""Classifier formula terms (FUDGE) in the engine: greedy and seeded sampling equal the
reference decoder for a batch of requests in one call, one batched classifier forward per
classifier per step for the whole batch, a bad classifier fails only its own call, and
speculation with a Classifier is refused when the request is made."""
from __future__ import annotations

import pytest

import lmarith as la
from builders import assert_all_pages_free, make_classifier
from lmarith import reference
from lmarith.decoding.classifier import classifier_prompt_text

PROMPTS = ["The cat sat on", "Tell me about dragons and magic.", "Paris", "Once upon a time there was"]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    return make_classifier(tmp_path_factory.mktemp("classifier"), seed=3)


@pytest.fixture(scope="module")
def base(llama_dir):
    return la.Model(str(llama_dir))


@pytest.fixture(scope="module")
def specs(classifier_dir):
    return la.ClassifierSpec(str(classifier_dir)), la.ClassifierSpec(str(classifier_dir), label=0,
                                                                      template="Review: {input}")


@pytest.fixture
def llm():
    engine = la.LLM(kv_cache_bytes=8 << 20, max_num_seqs=16)
    yield engine
    engine.close()


def _formulas(base, specs):
    positive, negative = specs
    return [base + la.Classifier(base, positive, k=3),
            la.methods.fudge(base, positive, k=3, strength=4.0),
            base.prompt("You are kind.") + 2.0 * la.Classifier(base, negative, k=5)]


def _reference(formula, prompts, **sampling):
    return [out.token_ids for out in reference.generate(formula, prompts, MAX_TOKENS, stop_at_eos=False,
                                                         **sampling)]


@pytest.mark.parametrize("which", range(3))
def test_greedy_batch_equals_the_reference(which, base, specs, llm):
    formula = _formulas(base, specs)[which]
    params = la.SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    got = [out.token_ids for out in llm.generate(PROMPTS, formula, params)]
    assert got == _reference(formula, PROMPTS)
    assert_all_pages_free(llm)


def test_the_classifier_changes_the_output(base, specs, llm):
    params = la.SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    plain = _reference(base, PROMPTS)
    guided = [out.token_ids for out in llm.generate(PROMPTS, _formulas(base, specs)[1], params)]
    assert plain != guided


def test_seeded_sampling_equals_the_reference(base, specs, llm):
    formula = la.methods.fudge(base, specs[0], k=4, strength=2.0)
    params = [la.SamplingParams(temperature=1.0, seed=seed, max_tokens=MAX_TOKENS, ignore_eos=True)
              for seed in (3, 11)]
    got = [out.token_ids for out in llm.generate(PROMPTS[:2], formula, params)]
    want = [_reference(formula, [prompt], temperature=1.0, seed=seed)[0]
            for prompt, seed in zip(PROMPTS[:2], (3, 11))]
    assert got == want


def test_one_classifier_forward_per_spec_per_step_for_the_batch(base, specs, llm):
    formulas = _formulas(base, specs)        # two share the first spec, one uses the second
    prompts = [prompt for prompt in PROMPTS for _ in formulas]
    params = la.SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outputs = llm.generate(prompts, formulas * len(PROMPTS), params)
    calls = llm.engine.builder.classifiers.calls
    assert calls[specs[0]] == MAX_TOKENS and calls[specs[1]] == MAX_TOKENS, calls
    for out, formula, prompt in zip(outputs, formulas * len(PROMPTS), prompts):
        assert out.token_ids == _reference(formula, [prompt])[0]


def test_a_bad_classifier_fails_its_call_only(base, specs, llm, tmp_path):
    params = la.SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    good = la.Classifier(base, specs[0], k=3)
    with pytest.raises(la.ModelLoadError, match="absent"):
        llm.generate(PROMPTS[:1], base + la.Classifier(base, str(tmp_path / "absent")), params)
    with pytest.raises(la.ModelLoadError, match="cannot load classifier"):
        (tmp_path / "empty").mkdir()
        llm.generate(PROMPTS[:1], base + la.Classifier(base, str(tmp_path / "empty")), params)
    with pytest.raises(la.FormulaError, match="label in 0..1"):
        llm.generate(PROMPTS[:1], base + la.Classifier(base, la.ClassifierSpec(specs[0].path, label=2)),
                     params)
    got = llm.generate(PROMPTS[:1], base + good, params)[0].token_ids
    assert got == reference.generate(base + good, PROMPTS[:1], 4, stop_at_eos=False)[0].token_ids
    assert_all_pages_free(llm)


def test_speculation_with_a_classifier_is_refused(base, specs, llm):
    params = la.SamplingParams(temperature=0, max_tokens=4)
    guided = la.Classifier(base, specs[0], k=3)
    for formula in (base + 0.5 * base.prompt("Be kind.", speculative_factor=2) + guided,
                    la.Speculative(base + guided, draft=la.NgramDraft(n=2), k=2)):
        with pytest.raises(la.FormulaError, match="speculation"):
            llm.generate(PROMPTS[:1], formula, params)


def test_classifier_prompt_text_of_a_conversation():
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Cats?"}]
    assert classifier_prompt_text(conversation) == "Cats?"
    assert classifier_prompt_text([{"role": "system", "content": "x"}]) == ""
    assert classifier_prompt_text("plain") == "plain"


def test_text_beyond_the_classifier_window_fails_that_request(base, llm, tmp_path):
    short = la.ClassifierSpec(str(make_classifier(tmp_path / "short", seed=4, max_position_embeddings=12)))
    formula = base + la.Classifier(base, short, k=2)
    params = la.SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    with pytest.raises(la.PromptError, match="reads at most 12 tokens"):
        llm.generate(["Once upon a time there was a small robot"], formula, params)
    got = llm.generate(["Paris"], formula, la.SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert got[0].token_ids == reference.generate(formula, ["Paris"], 3, stop_at_eos=False)[0].token_ids
    assert_all_pages_free(llm)


def test_a_classifier_inside_another_classifiers_base_is_exact(base, specs, llm):
    inner = base + la.Classifier(base, specs[1], k=4)
    formula = base + 3.0 * la.Classifier(inner, specs[0], k=3)
    params = la.SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    got = [out.token_ids for out in llm.generate(PROMPTS[:2], formula, params)]
    assert got == _reference(formula, PROMPTS[:2])
