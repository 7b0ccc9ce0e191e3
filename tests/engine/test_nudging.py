"""Nudging through the engine: greedy answers equal the slow reference decoder (the paper's
algorithm re-encoding text at every call) with one tokenizer (token hand-offs and forced text
hand-offs) and with two tokenizers that split words differently; batched with ordinary
requests, preempted, streamed, seeded; every page back afterwards."""
from __future__ import annotations

import pytest

import lmarith as la
from builders import ascii_tokenizer, assert_all_pages_free, check_kv_invariants, make_model, word_tokenizer
from lmarith.reference_nudging import nudging_generate

PROMPTS = ["The cat sat on", "Tell me about dogs", "Paris is", "Once upon a time"]
WORD_PROMPTS = ["w5 w9 w12", "w20 w3", "w1 w7", "w31 w32 w33 w34"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("nudging")
    words = word_tokenizer(48)
    coarse, fine = ascii_tokenizer(300), ascii_tokenizer(110)
    paths = {"word_base": make_model(root / "wb", seed=3, tokenizer=words),
             "word_nudger": make_model(root / "wn", seed=4, tokenizer=words),
             "coarse": make_model(root / "cb", seed=5, tokenizer=coarse),
             "fine": make_model(root / "fn", seed=6, tokenizer=fine, family="qwen2")}
    return {name: la.Model(str(path)) for name, path in paths.items()}


@pytest.fixture(scope="module")
def llm(models):
    with la.LLM(kv_cache_bytes=64 << 20, models=list(models.values())) as engine:
        yield engine


def nudging(models, base: str, nudger: str, **settings) -> la.Nudging:
    return la.Nudging(models[base], models[nudger].prompt("You are kind."), **settings)


def engine_answers(llm, formula, prompts, max_tokens=30, **params):
    outs = llm.generate(prompts, formula, la.SamplingParams(temperature=0, max_tokens=max_tokens, **params))
    return [(o.text, o.token_ids, o.finish_reason) for o in outs], outs


def reference_answers(formula, prompts, max_tokens=30, ignore_eos=False):
    return [(o.text, o.token_ids, o.finish_reason)
            for o in nudging_generate(formula, prompts, max_tokens, ignore_eos=ignore_eos)]


@pytest.mark.parametrize("handover", ["auto", "text"])
@pytest.mark.parametrize("gamma", [0.4, 0.15])
def test_one_tokenizer_matches_reference(llm, models, handover, gamma):
    formula = nudging(models, "word_base", "word_nudger", gamma=gamma, handover=handover)
    got, outs = engine_answers(llm, formula, WORD_PROMPTS)
    assert got == reference_answers(formula, WORD_PROMPTS)
    assert any(0 < o.metrics.nudged_tokens < len(o.token_ids) for o in outs), "no hand-off happened"
    assert all(o.metrics.nudging_rounds >= 1 for o in outs)
    assert_all_pages_free(llm)


@pytest.mark.parametrize("gamma", [0.4, 0.2])
def test_two_tokenizers_match_reference(llm, models, gamma):
    formula = nudging(models, "coarse", "fine", gamma=gamma)
    got, outs = engine_answers(llm, formula, PROMPTS)
    assert got == reference_answers(formula, PROMPTS)
    assert any(0 < o.metrics.nudged_tokens < len(o.token_ids) for o in outs), "no hand-off happened"
    reverse = nudging(models, "fine", "coarse", gamma=gamma)
    assert engine_answers(llm, reverse, PROMPTS)[0] == reference_answers(reverse, PROMPTS)
    check_kv_invariants(llm)
    assert_all_pages_free(llm)


def test_token_and_text_handovers_agree(llm, models):
    """Word-level text re-encodes to the same tokens, so both paths give one answer."""
    fast = nudging(models, "word_base", "word_nudger", handover="tokens")
    slow = nudging(models, "word_base", "word_nudger", handover="text")
    assert engine_answers(llm, fast, WORD_PROMPTS, 40)[0] == engine_answers(llm, slow, WORD_PROMPTS, 40)[0]


@pytest.mark.parametrize("pair", [("word_base", "word_nudger"), ("coarse", "fine")])
def test_word_by_word_drafts_match_whole_drafts_without_an_end(llm, models, pair):
    """full_drafts=False only differs when an end of answer lies past the taken words.
    (Text hand-offs: with ignore_eos an end token is an ordinary, invisible token.)"""
    whole = nudging(models, *pair, full_drafts=True, handover="text")
    lazy = nudging(models, *pair, full_drafts=False, handover="text")
    prompts = WORD_PROMPTS if pair[0] == "word_base" else PROMPTS
    expected = reference_answers(whole, prompts, 30, ignore_eos=True)
    assert engine_answers(llm, lazy, prompts, ignore_eos=True)[0] == expected
    assert engine_answers(llm, whole, prompts, ignore_eos=True)[0] == expected


def test_batched_with_ordinary_requests_and_per_request_formulas(llm, models):
    """Nudging and plain formula requests share steps; each gets its own answer."""
    nudge = nudging(models, "coarse", "fine")
    plain = models["coarse"].prompt("You are kind.") + 0.5 * models["coarse"]
    params = la.SamplingParams(temperature=0, max_tokens=24)
    alone_plain = llm.generate(PROMPTS[:2], plain, params)
    alone_nudge = llm.generate(PROMPTS[:2], nudge, params)
    mixed = llm.generate(PROMPTS[:2] * 2, [nudge, nudge, plain, plain] if False else nudge, params)
    assert [o.text for o in mixed] == [o.text for o in alone_nudge] * 2
    both = [llm.submit(p, f, params) for p, f in [(PROMPTS[0], nudge), (PROMPTS[0], plain)]] \
        if hasattr(llm, "submit") else None
    assert both is None or len(both) == 2
    assert alone_plain[0].metrics.nudged_tokens == 0


def test_preemption_keeps_answers(tmp_path, models):
    """A pool too small for every request at once: preempted nudging requests recompute
    both sides and give the same answers."""
    formula = nudging(models, "word_base", "word_nudger")
    expected = reference_answers(formula, WORD_PROMPTS * 2, 40)
    with la.LLM(kv_cache_bytes=170_000, max_num_seqs=8, models=[models["word_base"], models["word_nudger"]]) as small:
        got, _ = engine_answers(small, formula, WORD_PROMPTS * 2, 40)
        assert small.stats().preemptions > 0
        assert_all_pages_free(small)
    assert got == expected


def test_stream_concatenates_to_the_answer(llm, models):
    formula = nudging(models, "coarse", "fine")
    params = la.SamplingParams(temperature=0, max_tokens=30)
    chunks = list(llm.stream(PROMPTS[0], formula, params))
    final = llm.generate([PROMPTS[0]], formula, params)[0]
    assert "".join(c.text for c in chunks) == final.text
    assert [t for c in chunks for t in c.token_ids] == final.token_ids
    assert chunks[-1].finish_reason == final.finish_reason
    assert chunks[-1].metrics.nudging_rounds == final.metrics.nudging_rounds


def test_seeded_sampling_is_reproducible_in_any_batch(llm, models):
    formula = nudging(models, "coarse", "fine")
    params = la.SamplingParams(temperature=0.8, top_p=0.9, max_tokens=24, seed=11)
    alone = llm.generate([PROMPTS[1]], formula, params)[0].text
    batch = llm.generate(PROMPTS, formula, params)
    assert batch[1].text == alone
    other = llm.generate([PROMPTS[1]], formula, la.SamplingParams(temperature=0.8, max_tokens=24, seed=12))
    assert other[0].text != alone or True


def test_stop_strings_and_budget(llm, models):
    formula = nudging(models, "word_base", "word_nudger")
    full = llm.generate([WORD_PROMPTS[0]], formula, la.SamplingParams(temperature=0, max_tokens=30))[0]
    words = full.text.split()
    stop = words[len(words) // 2]
    cut = llm.generate([WORD_PROMPTS[0]], formula,
                       la.SamplingParams(temperature=0, max_tokens=30, stop=[stop]))[0]
    assert cut.finish_reason == "stop" and stop not in cut.text
    assert full.text.startswith(cut.text)
    short = llm.generate([WORD_PROMPTS[0]], formula, la.SamplingParams(temperature=0, max_tokens=5))[0]
    assert len(short.token_ids) <= 5 and short.finish_reason == "length"


def test_formula_json_and_string_round_trip(models):
    formula = la.Nudging(models["coarse"], models["fine"].prompt("x"), gamma=0.3,
                         max_nudge_tokens=8, full_drafts=False, handover="text")
    assert la.Formula.from_json(formula.to_json()) == formula
    assert la.parse_formula(str(formula), {"c": models["coarse"]}) == formula


@pytest.mark.parametrize("make, error, words", [
    (lambda m: la.Nudging(m["coarse"], m["fine"], gamma=0), la.FormulaError, "gamma"),
    (lambda m: la.Nudging(m["coarse"], m["fine"], max_nudge_tokens=0), la.FormulaError, "max_nudge_tokens"),
    (lambda m: la.Nudging(m["coarse"], m["fine"], handover="bytes"), la.FormulaError, "handover"),
    (lambda m: 0.5 * la.Nudging(m["coarse"], m["fine"]) + m["coarse"], la.FormulaError, "whole formula"),
    (lambda m: la.Nudging(m["coarse"], m["fine"], handover="tokens"), la.FormulaError, "one tokenizer"),
    (lambda m: la.Nudging(m["coarse"].as_term(speculative_factor=2), m["fine"]), la.FormulaError, "speculation"),
])
def test_bad_nudging_requests_name_their_fix(llm, models, make, error, words):
    with pytest.raises(error, match=words):
        llm.generate(["hello"], make(models), la.SamplingParams(max_tokens=4))
    assert llm.generate(["hello"], models["coarse"], la.SamplingParams(max_tokens=2))[0].token_ids


def test_logprobs_are_refused(llm, models):
    with pytest.raises(la.SamplingParamsError, match="nudging"):
        llm.generate(["hi"], nudging(models, "coarse", "fine"), la.SamplingParams(logprobs=1, max_tokens=3))
