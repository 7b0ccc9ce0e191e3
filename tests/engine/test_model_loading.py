"""Loading models into a running engine: all of a request's models load or none does, a
model whose KV fits a page joins the pool at once, and one that needs bigger pages waits
until the running requests finish, so no running request ever loses its cache."""
from __future__ import annotations

import pytest

import lmarith as la
from builders import assert_all_pages_free, call_alongside

PROMPT = "Once upon a time there was"
GREEDY = la.SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
LONG = la.SamplingParams(temperature=0, max_tokens=120, ignore_eos=True)


def _tokens(chunks) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def test_a_model_that_fits_joins_while_a_request_runs(llama_dir, wide_dir):
    small, wide = la.Model(str(llama_dir)), la.Model(str(wide_dir))
    expected_small = la.LLM(kv_cache_bytes=4 << 20).generate([PROMPT], small, LONG)[0].token_ids
    expected_wide = la.LLM(kv_cache_bytes=4 << 20).generate([PROMPT], wide, GREEDY)[0].token_ids
    llm = la.LLM(kv_cache_bytes=4 << 20)
    stream = llm.stream(PROMPT, small, LONG)
    first = next(stream)
    outputs, error = call_alongside(llm, lambda: llm.generate([PROMPT], wide, GREEDY))
    assert error is None and outputs[0].token_ids == expected_wide
    assert _tokens([first, *stream]) == expected_small
    assert llm.stats().kv_page_tokens == {small.spec: 16, wide.spec: 8}
    assert_all_pages_free(llm)


def test_a_model_needing_bigger_pages_waits_for_the_running_requests(llama_dir, huge_kv_dir):
    small, huge = la.Model(str(llama_dir)), la.Model(str(huge_kv_dir))
    expected_small = la.LLM(kv_cache_bytes=4 << 20, page_tokens=4).generate([PROMPT], small, LONG)[0].token_ids
    expected_huge = la.LLM(kv_cache_bytes=4 << 20, page_tokens=4).generate([PROMPT], huge, GREEDY)[0].token_ids
    llm = la.LLM(kv_cache_bytes=4 << 20, page_tokens=4)
    stream = llm.stream(PROMPT, small, LONG)
    first = next(stream)
    outputs, error = call_alongside(llm, lambda: llm.generate([PROMPT], huge, GREEDY))
    assert error is None and outputs[0].token_ids == expected_huge
    assert _tokens([first, *stream]) == expected_small
    stats = llm.stats()
    assert stats.kv_page_tokens == {small.spec: 32, huge.spec: 4}, "pages resized for both"
    assert stats.tokens_generated == len(expected_small) + len(expected_huge), "totals survive the rebuild"
    assert_all_pages_free(llm)


def test_models_declared_up_front_size_the_pages(llama_dir, huge_kv_dir):
    small, huge = la.Model(str(llama_dir)), la.Model(str(huge_kv_dir))
    llm = la.LLM(kv_cache_bytes=4 << 20, page_tokens=4, models=[small, huge.spec])
    assert llm.stats().kv_page_tokens == {small.spec: 32, huge.spec: 4}
    assert llm.generate([PROMPT], small + 0.5 * huge, GREEDY)[0].token_ids


def test_a_failed_load_registers_none_of_the_request_models(llama_dir, tmp_path):
    good = la.Model(str(llama_dir))
    llm = la.LLM(kv_cache_bytes=4 << 20)
    with pytest.raises(la.ModelLoadError, match="does not exist"):
        llm.generate([PROMPT], good + la.Model(str(tmp_path / "missing")), GREEDY)
    assert llm.stats().forward_calls == {}
    expected = la.LLM(kv_cache_bytes=4 << 20).generate([PROMPT], good, GREEDY)[0].token_ids
    assert llm.generate([PROMPT], good, GREEDY)[0].token_ids == expected
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(la.ModelLoadError, match="config.json is not valid JSON"):
        llm.generate([PROMPT], la.Model(str(tmp_path / "broken")), GREEDY)
    assert llm.generate([PROMPT], good, GREEDY)[0].token_ids == expected
    assert_all_pages_free(llm)
