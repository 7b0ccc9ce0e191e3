"""llm.stats() and RequestOutput.metrics report what the engine did, and tests read them
instead of the engine's internals."""
from __future__ import annotations

import lmarith as la
from builders import assert_all_pages_free

PROMPT = "Once upon a time there was a small robot who loved to read books"


def test_stats_of_a_fresh_and_a_worked_engine(llama_dir):
    llm = la.LLM(kv_cache_bytes=1 << 20, page_tokens=4)
    assert llm.stats() == la.EngineStats()
    model = la.Model(str(llama_dir))
    formula = model.prompt("You are helpful.") + 0.5 * model
    params = la.SamplingParams(temperature=0, max_tokens=9, ignore_eos=True)
    outputs = llm.generate([PROMPT, "Paris"], formula, params)
    stats = llm.stats()
    assert stats.kv_pages_total > 0 and stats.kv_pages_free == stats.kv_pages_total
    assert 0 < stats.kv_pages_cached <= stats.kv_pages_total
    assert stats.tokens_generated == 18 and stats.preemptions == 0
    assert stats.forward_calls == {model.spec: 9}, "one forward per step for both requests' terms"
    assert stats.kv_page_tokens == {model.spec: 4}
    for output in outputs:
        metrics = output.metrics
        assert metrics.forward_passes == 9
        assert metrics.prompt_tokens > len(output.prompt.split())
        assert 0 < metrics.time_to_first_token and 0 <= metrics.decode_time
    assert_all_pages_free(llm)


def test_metrics_count_prefix_hits_and_preemptions(llama_dir):
    llm = la.LLM(kv_cache_bytes=48 * 1024, page_tokens=4, max_num_seqs=8)
    model = la.Model(str(llama_dir))
    params = la.SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    outputs = llm.generate([PROMPT + str(i) for i in range(6)], model, params)
    stats = llm.stats()
    assert stats.preemptions == sum(o.num_preemptions for o in outputs) > 0
    assert stats.prefix_cache_hit_tokens > 0
    assert sum(o.metrics.cached_prompt_tokens for o in outputs) > 0, "the shared prompt prefix is reused"
    for output in outputs:
        assert output.metrics.cached_prompt_tokens <= output.metrics.prompt_tokens
    assert_all_pages_free(llm)
