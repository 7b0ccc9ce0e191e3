"""A failure in one request (validation, forward, sampling, bookkeeping) fails that request
alone: its caller gets the exception, every other request (a paused stream included) finishes
with exactly the tokens it gets alone, and no page leaks."""
from __future__ import annotations

import pytest

import lmarith as la
from builders import assert_all_pages_free, call_alongside, check_kv_invariants
from lmarith.core.detokenizer import Detokenizer
from lmarith.core.scheduler import Scheduler
from lmarith.decoding import sampler
from lmarith.worker.model_runner import ModelRunner

PROMPT = "Once upon a time there was"
GREEDY = la.SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
LONG = la.SamplingParams(temperature=0, max_tokens=160, ignore_eos=True)
POISON_SEED = 666
POISON_STOP = "\x00poison"


class InjectedFault(RuntimeError):
    """The failure a test plants."""


@pytest.fixture()
def llm():
    return la.LLM(kv_cache_bytes=4 << 20)


def _alone(llm, prompt, formula, params=LONG) -> list[int]:
    return llm.generate([prompt], formula, params)[0].token_ids


def _paused_stream(llm, prompt, formula, params=LONG):
    stream = llm.stream(prompt, formula, params)
    first = next(stream)
    return stream, first


def _finish(stream, first) -> list[int]:
    chunks = [first] + list(stream)
    assert chunks[-1].finish_reason == "length"
    return [t for c in chunks for t in c.token_ids]


def _fails_alongside(llm, call) -> BaseException:
    """Submit call()'s request while the paused stream's request is still running."""
    _, error = call_alongside(llm, call)
    assert error is not None, "the planted fault did not reach its caller"
    return error


SEED_ARGUMENT = {"sample": 5, "spec_accept": 4}   # where each op takes its seed tensor


def _poisoned(real, name: str):
    """The op `name` raising for rows seeded POISON_SEED."""
    def call(*args):
        if bool((args[SEED_ARGUMENT[name]] == POISON_SEED).any()):
            raise InjectedFault(f"{name} blew up")
        return real(*args)
    return call


def _one_request_fails_alone(llm, monkeypatch, module, name: str, stream_formula, bad_formula):
    """A paused stream keeps its tokens while a poisoned op fails the seeded request."""
    expected = _alone(llm, PROMPT, stream_formula)
    stream, first = _paused_stream(llm, PROMPT, stream_formula)
    monkeypatch.setattr(module, name, _poisoned(getattr(module, name), name))
    poison = la.SamplingParams(temperature=0.7, max_tokens=12, seed=POISON_SEED)
    error = _fails_alongside(llm, lambda: llm.generate(["Paris"], bad_formula, poison))
    assert isinstance(error, InjectedFault) and "blew up" in str(error)
    assert _finish(stream, first) == expected
    assert_all_pages_free(llm)
    check_kv_invariants(llm)
    assert _alone(llm, PROMPT, stream_formula) == expected


def test_sampling_failure_fails_one_request_and_a_paused_stream_finishes(llm, llama_dir, monkeypatch):
    model = la.Model(str(llama_dir))
    formula = model + la.Union(model.prompt("Magic."), model.prompt("Cats."))
    _one_request_fails_alone(llm, monkeypatch, sampler, "sample", formula, model)


def test_forward_failure_fails_only_the_requests_on_that_model(llm, llama_dir, wide_dir, monkeypatch):
    good, bad = la.Model(str(llama_dir)), la.Model(str(wide_dir))
    expected = _alone(llm, PROMPT, good)
    _alone(llm, PROMPT, bad, GREEDY)
    real_execute = ModelRunner.execute

    def broken(self, items, cache):
        if self.spec == bad.spec:
            raise InjectedFault("the forward of the wide model failed")
        return real_execute(self, items, cache)

    stream, first = _paused_stream(llm, PROMPT, good)
    monkeypatch.setattr(ModelRunner, "execute", broken)
    error = _fails_alongside(llm, lambda: llm.generate(["Paris"], good + 0.5 * bad, GREEDY))
    assert isinstance(error, InjectedFault) and "wide model" in str(error)
    assert _finish(stream, first) == expected
    monkeypatch.setattr(ModelRunner, "execute", real_execute)
    assert_all_pages_free(llm)
    check_kv_invariants(llm)
    assert _alone(llm, PROMPT, good) == expected


def test_bookkeeping_failure_fails_one_request(llm, llama_dir, monkeypatch):
    model = la.Model(str(llama_dir))
    expected = _alone(llm, PROMPT, model)
    real_append = Detokenizer.append

    def fragile(self, token_id):
        if POISON_STOP in self.stop:
            raise InjectedFault("detokenizer failed")
        return real_append(self, token_id)

    stream, first = _paused_stream(llm, PROMPT, model)
    monkeypatch.setattr(Detokenizer, "append", fragile)
    poison = la.SamplingParams(temperature=0, max_tokens=12, stop=[POISON_STOP])
    error = _fails_alongside(llm, lambda: llm.generate(["Paris"], model, poison))
    assert isinstance(error, InjectedFault) and "detokenizer" in str(error)
    assert _finish(stream, first) == expected
    assert_all_pages_free(llm)


def test_validation_error_queues_nothing_of_the_batch(llm, llama_dir):
    model = la.Model(str(llama_dir))
    expected = _alone(llm, PROMPT, model)
    stream, first = _paused_stream(llm, PROMPT, model)
    with pytest.raises(la.PromptError, match="window"):
        llm.generate(["Paris", "cat " * 400], model, GREEDY)
    assert llm.stats().requests_waiting == 0
    assert _finish(stream, first) == expected
    assert_all_pages_free(llm)


def test_an_engine_step_bug_fails_what_is_in_flight_and_the_engine_carries_on(llm, llama_dir, monkeypatch):
    model = la.Model(str(llama_dir))
    expected = _alone(llm, PROMPT, model)
    real_schedule = Scheduler.schedule
    calls = {"count": 0}

    def flaky(self):
        calls["count"] += 1
        if calls["count"] == 3:
            raise InjectedFault("scheduler bug")
        return real_schedule(self)

    monkeypatch.setattr(Scheduler, "schedule", flaky)
    with pytest.raises(la.EngineError, match="scheduler bug") as error:
        llm.generate([PROMPT], model, GREEDY)
    assert isinstance(error.value.__cause__, InjectedFault)
    assert_all_pages_free(llm)
    assert _alone(llm, PROMPT, model) == expected


def test_abandoned_stream_is_cancelled_and_frees_its_pages(llm, llama_dir):
    model = la.Model(str(llama_dir))
    expected = _alone(llm, PROMPT, model)
    stream, first = _paused_stream(llm, PROMPT, model)
    assert first.token_ids
    stream.close()
    assert_all_pages_free(llm)
    assert _alone(llm, PROMPT, model) == expected


def test_closing_the_llm_fails_requests_in_flight_and_later_calls(llama_dir):
    llm = la.LLM(kv_cache_bytes=4 << 20)
    model = la.Model(str(llama_dir))
    stream, first = _paused_stream(llm, PROMPT, model)
    llm._loop.call(lambda: None).result()
    llm.close()
    with pytest.raises(la.RequestAbortedError):
        for _ in stream:
            pass
    with pytest.raises(la.RequestAbortedError, match="closed"):
        llm.generate([PROMPT], model, GREEDY)


def test_verification_failure_fails_one_speculative_request(llm, llama_dir, wide_dir, monkeypatch):
    from lmarith.decoding.speculative import verifier
    formula = la.Speculative(la.Model(str(llama_dir)), la.Model(str(wide_dir)), k=2)
    _one_request_fails_alone(llm, monkeypatch, verifier, "spec_accept", formula, formula)
