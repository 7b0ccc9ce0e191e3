"""Speculative decoding through LLM.generate and LLM.stream: greedy output identical to
decoding without speculation for all three kinds, mixed into batches with plain requests,
under preemption and with stops; seeds reproducible whatever the batch; forward counts and
acceptance metrics; the formula errors a user can make. Exactness of sampling is in
test_speculative_exactness.py."""
from __future__ import annotations

import shutil

import pytest

import lmarith as la
from lmarith import FormulaError
from builders import assert_all_pages_free, check_kv_invariants

PROMPTS = ["The cat sat on", "Tell me about dragons and magic.", "Paris", "Once upon a time there was"]
GREEDY = la.SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
RUDE = "You are rude."


@pytest.fixture(scope="module")
def models(llama_dir, wide_dir):
    return la.Model(str(llama_dir)), la.Model(str(wide_dir))


@pytest.fixture(scope="module")
def twin(llama_dir, tmp_path_factory):
    """The same weights under another path: a draft that always agrees with its target."""
    copy = tmp_path_factory.mktemp("twin") / "model"
    shutil.copytree(llama_dir, copy)
    return la.Model(str(copy))


@pytest.fixture(scope="module")
def llm():
    engine = la.LLM(kv_cache_bytes=8 << 20, max_num_seqs=16, page_tokens=4)
    yield engine
    engine.close()


def _kinds(big, small):
    """(speculative formula, the same law without speculation) per kind."""
    target = big + 0.5 * small.prompt(RUDE)
    return {
        "across terms": (big + 0.5 * small.prompt(RUDE, speculative_factor=4), target),
        "three terms": (big + 0.3 * small.as_term(speculative_factor=3)
                        - 0.2 * big.prompt(RUDE, speculative_factor=2),
                        big + 0.3 * small - 0.2 * big.prompt(RUDE)),
        "auto factor": (big + 0.5 * small.prompt(RUDE, speculative_factor="auto"), target),
        "draft model": (la.Speculative(target, small, k=3), target),
        "n-gram": (la.Speculative(target, la.NgramDraft(n=3), k=4), target),
    }


@pytest.mark.parametrize("kind", ["across terms", "three terms", "auto factor", "draft model",
                                  "n-gram"])
def test_greedy_speculation_gives_the_tokens_of_plain_decoding(kind, models, llm):
    speculative, plain = _kinds(*models)[kind]
    expected = llm.generate(PROMPTS, plain, GREEDY)
    got = llm.generate(PROMPTS, speculative, GREEDY)
    assert [o.token_ids for o in got] == [o.token_ids for o in expected]
    assert [o.text for o in got] == [o.text for o in expected]
    check_kv_invariants(llm)
    assert_all_pages_free(llm)


def test_stream_matches_generate_with_speculation(models, llm):
    speculative, plain = _kinds(*models)["across terms"]
    chunks = list(llm.stream(PROMPTS[0], speculative, GREEDY))
    expected = llm.generate(PROMPTS[0], plain, GREEDY)[0]
    assert [t for c in chunks for t in c.token_ids] == expected.token_ids
    assert "".join(c.text for c in chunks) == expected.text
    assert chunks[-1].finish_reason == "length"


def test_mixed_batch_of_plain_and_speculative_requests(models, llm):
    kinds = _kinds(*models)
    formulas = [kinds[k][i] for k in kinds for i in (0, 1)]
    prompts = [PROMPTS[(n // 2) % len(PROMPTS)] for n in range(len(formulas))]
    outputs = llm.generate(prompts, formulas, GREEDY)
    for n in range(0, len(outputs), 2):
        assert outputs[n].token_ids == outputs[n + 1].token_ids, formulas[n]
    assert_all_pages_free(llm)


def test_speculation_survives_preemption(models):
    small_pool = la.LLM(kv_cache_bytes=160 << 10, max_num_seqs=8, page_tokens=4)
    plain_pool = la.LLM(kv_cache_bytes=8 << 20, page_tokens=4)
    params = la.SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    for kind, (speculative, plain) in _kinds(*models).items():
        got = small_pool.generate(PROMPTS, speculative, params)
        expected = plain_pool.generate(PROMPTS, plain, params)
        assert [o.token_ids for o in got] == [o.token_ids for o in expected], kind
        check_kv_invariants(small_pool)
        assert_all_pages_free(small_pool)
    assert small_pool.stats().preemptions > 0
    small_pool.close()
    plain_pool.close()


def test_stops_inside_speculated_tokens(models, llm):
    speculative, plain = _kinds(*models)["across terms"]
    reference = llm.generate(PROMPTS, plain, GREEDY)
    stop_id = reference[0].token_ids[5]
    params = la.SamplingParams(temperature=0, max_tokens=16, stop_token_ids=(stop_id,))
    expected = llm.generate(PROMPTS, plain, params)
    got = llm.generate(PROMPTS, speculative, params)
    assert [(o.token_ids, o.finish_reason) for o in got] == \
        [(o.token_ids, o.finish_reason) for o in expected]
    assert got[0].finish_reason == "stop" and len(got[0].token_ids) <= 6
    assert_all_pages_free(llm)


def test_seeded_sampling_is_reproducible_whatever_the_batch(models, llm):
    speculative, _ = _kinds(*models)["draft model"]
    params = la.SamplingParams(temperature=1.0, top_k=20, max_tokens=12, seed=7, ignore_eos=True)
    alone = llm.generate(PROMPTS[1], speculative, params)[0].token_ids
    others = [la.SamplingParams(temperature=1.0, max_tokens=12, seed=s) for s in range(3)]
    batch = llm.generate(PROMPTS, speculative, [others[0], params, others[1], others[2]])
    assert batch[1].token_ids == alone
    assert llm.generate(PROMPTS[1], speculative, params)[0].token_ids == alone


def test_a_draft_that_always_agrees_saves_target_forwards(models, twin, llm):
    big, _ = models
    k, tokens = 3, 16
    output = llm.generate(PROMPTS[0], la.Speculative(big, twin, k=k), GREEDY)[0]
    assert output.token_ids == llm.generate(PROMPTS[0], big, GREEDY)[0].token_ids
    metrics = output.metrics
    assert metrics.accepted_tokens == metrics.proposed_tokens > 0
    target_passes, draft_passes = metrics.term_forward_passes
    assert target_passes <= -(-tokens // (k + 1)) + 1
    assert draft_passes >= tokens - 1


def test_factor_k_term_runs_once_per_k_tokens(models, twin, llm):
    big, _ = models
    formula = big + 0.1 * twin.prompt(RUDE, speculative_factor=4)
    output = llm.generate(PROMPTS[0], formula, GREEDY)[0]
    base_passes, slow_passes = output.metrics.term_forward_passes
    assert base_passes >= 16 and slow_passes < base_passes
    stats = llm.stats()
    assert stats.proposed_tokens >= output.metrics.proposed_tokens > 0


def test_auto_factor_follows_the_acceptance_rate():
    from lmarith.decoding.speculative.auto_factor import choose_factor, expected_tokens
    assert expected_tokens(0.5, 3) == pytest.approx(1.75)
    factors = [choose_factor(rate, 1.0, 8) for rate in (0.2, 0.7, 0.9, 0.99)]
    assert factors == sorted(factors) and factors[0] == 1 and factors[-1] == 8


def test_auto_factor_grows_when_the_slow_term_always_agrees(models, twin, llm):
    big, _ = models
    output = llm.generate(PROMPTS[0], big + 0.1 * twin.as_term(speculative_factor="auto"),
                          la.SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))[0]
    base_passes, auto_passes = output.metrics.term_forward_passes
    assert output.metrics.accepted_tokens == output.metrics.proposed_tokens
    assert auto_passes < base_passes / 3


@pytest.mark.parametrize("make, message", [
    (lambda a, b: a.as_term(speculative_factor=2) + b.as_term(speculative_factor=3), "factor 1"),
    (lambda a, b: a + la.Speculative(a, b, k=2), "whole formula"),
    (lambda a, b: a + 0.5 * la.NgramDraft(), "draft of Speculative"),
    (lambda a, b: la.TopPTopK(a, top_k=5) + b.as_term(speculative_factor=2), "weighted sums"),
    (lambda a, b: a.as_term(speculative_factor=2) - 0.5 * b, "not a distribution"),
    (lambda a, b: la.Speculative(a, b.as_term(speculative_factor=2), k=2), "drop speculative_factor"),
])
def test_formula_errors_name_the_fix(make, message, models, llm):
    with pytest.raises(FormulaError, match=message):
        llm.generate(PROMPTS[0], make(*models), GREEDY)
    assert_all_pages_free(llm)


@pytest.mark.parametrize("make", [
    lambda a: a.as_term(speculative_factor=0), lambda a: a.prompt(RUDE, speculative_factor=1.5),
    lambda a: la.Speculative(a, a, k=0), lambda a: la.NgramDraft(n=2, min_n=3),
    lambda a: la.Speculative(la.NgramDraft(), a), lambda a: la.Speculative(a, "draft"),
])
def test_bad_speculation_arguments_raise_formula_error(make, models):
    with pytest.raises(FormulaError):
        make(models[0])


def test_speculative_formulas_round_trip_through_json(models):
    big, small = models
    for formula in [la.Speculative(big + 0.5 * small, small.chat("hi"), k=5),
                    la.Speculative(big, la.NgramDraft(n=4, min_n=2), k=6),
                    big + 0.2 * small.prompt(RUDE, speculative_factor=3)]:
        assert la.Formula.from_json(formula.to_json()) == formula


def test_speculation_under_a_tight_token_budget(models):
    """Chunked prefill and chunked catch-ups (8 tokens per step for 4 requests) still give
    the plain tokens, and no request stalls (a deadlock would time out here)."""
    import threading
    tight = la.LLM(kv_cache_bytes=8 << 20, max_num_batched_tokens=8, page_tokens=4)
    results: dict = {}

    def work() -> None:
        for kind, (speculative, plain) in _kinds(*models).items():
            results[kind] = (tight.generate(PROMPTS, speculative, GREEDY),
                             tight.generate(PROMPTS, plain, GREEDY))

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive(), "a speculative request stalled under the token budget"
    for kind, (got, expected) in results.items():
        assert [o.token_ids for o in got] == [o.token_ids for o in expected], kind
    assert_all_pages_free(tight)
    tight.close()
