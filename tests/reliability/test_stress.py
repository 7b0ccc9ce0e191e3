"""Random traffic on one LLM with a small KV pool, from several threads: valid requests
(generate and streams, some abandoned), invalid ones, preemption. Afterwards every page is
free, only the expected error types were raised, and every valid request got the tokens a
large-pool LLM gives it."""
from __future__ import annotations

import random
import threading
import time

import lmarith as la
from builders import assert_all_pages_free, check_kv_invariants

SECONDS = 20
MAX_CALLS_PER_THREAD = 150
THREADS = 3
PROMPTS = ["The cat sat on", "Paris", "Tell me about dragons and magic.", "Once upon a time there was",
           "You are a helpful assistant. You are rude."]
EXPECTED = (la.FormulaError, la.PromptError, la.SamplingParamsError, la.ModelLoadError, la.ConfigError,
            la.CacheExhaustedError)


def _formulas(model: la.Model, wide: la.Model) -> list[la.Formula]:
    helpful, rude = model.prompt("You are helpful."), model.prompt("You are rude.")
    return [model, helpful - 0.5 * rude, model + la.Union(helpful, rude), model + 0.5 * wide,
            la.TopPTopK(helpful + rude, top_k=5)]


def _bad_call(rng: random.Random, llm: la.LLM, model: la.Model) -> None:
    """One invalid call, chosen at random; it must raise one of EXPECTED."""
    choice = rng.randrange(8)
    greedy = la.SamplingParams(temperature=0, max_tokens=4)
    if choice == 0:
        llm.generate([""], model, greedy)
    elif choice == 1:
        llm.generate(["hi"], model - model, greedy)
    elif choice == 2:
        llm.generate(["hi"], model, la.SamplingParams(top_p=rng.choice([0, 2, -1])))
    elif choice == 3:
        llm.generate(["cat " * 400], model, greedy)
    elif choice == 4:
        llm.generate(["hi"], la.Model("/no/such/model"), greedy)
    elif choice == 5:
        llm.generate(["fine", b"bytes"], model, greedy)
    elif choice == 6:
        la.Formula.from_json(rng.choice(["[1]", '{"op": "x"}', '{"op": "constant", "value": NaN}']))
    else:
        llm.generate(["hi " * 60], model + model.prompt("a") + model.prompt("b"),
                     la.SamplingParams(max_tokens=150))


def _valid_call(rng: random.Random, llm: la.LLM, formulas: list, done: list) -> None:
    """One valid request (generate, full stream, or a stream abandoned early); records what it
    got so it can be compared with a large-pool LLM."""
    prompt = rng.choice(PROMPTS)
    index = rng.randrange(len(formulas))
    if rng.random() < 0.5:
        params = la.SamplingParams(temperature=0, max_tokens=rng.randint(1, 12), ignore_eos=True)
    else:
        params = la.SamplingParams(temperature=0.8, top_p=0.9, seed=rng.randrange(1000),
                                   max_tokens=rng.randint(1, 12), ignore_eos=True)
    mode = rng.randrange(3)
    if mode == 0:
        done.append((prompt, index, params, llm.generate([prompt], formulas[index], params)[0].token_ids))
        return
    stream = llm.stream(prompt, formulas[index], params)
    if mode == 1:
        done.append((prompt, index, params, [t for c in stream for t in c.token_ids]))
        return
    next(stream)
    stream.close()


def _traffic(seed: int, llm: la.LLM, model: la.Model, formulas: list, deadline: float,
             done: list, unexpected: list, counts: dict) -> None:
    rng = random.Random(seed)
    for _ in range(MAX_CALLS_PER_THREAD):
        if time.monotonic() > deadline:
            return
        try:
            if rng.random() < 0.3:
                _bad_call(rng, llm, model)
                unexpected.append("an invalid call raised nothing")
            else:
                _valid_call(rng, llm, formulas, done)
            counts["ok"] = counts.get("ok", 0) + 1
        except EXPECTED as error:
            counts[type(error).__name__] = counts.get(type(error).__name__, 0) + 1
        except BaseException as error:  # anything else is a defect
            unexpected.append(repr(error))


def test_random_valid_and_invalid_calls_leave_the_engine_exact_and_empty(llama_dir, wide_dir):
    model, wide = la.Model(str(llama_dir)), la.Model(str(wide_dir))
    llm = la.LLM(kv_cache_bytes=96 * 1024, page_tokens=4, max_num_seqs=6, models=[model, wide])
    formulas = _formulas(model, wide)
    done: list = []
    unexpected: list = []
    counts: dict = {}
    deadline = time.monotonic() + SECONDS
    threads = [threading.Thread(target=_traffic, args=(seed, llm, model, formulas, deadline, done,
                                                       unexpected, counts)) for seed in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(SECONDS + 120)
    assert not unexpected, unexpected[:5]
    assert counts.get("ok", 0) >= 30 and sum(counts.values()) >= 60, counts
    assert_all_pages_free(llm)
    check_kv_invariants(llm)
    assert llm.stats().preemptions > 0, "the small pool should have forced preemptions"
    large = la.LLM(kv_cache_bytes=16 << 20, page_tokens=4)
    for prompt, index, params, tokens in done:
        assert large.generate([prompt], formulas[index], params)[0].token_ids == tokens, (prompt, index, params)
