"""The engine against its oracles: transformers for single models, lmarith.reference for
formulas; batch invariance under preemption; user errors; no leaked pages."""
from __future__ import annotations

import pytest
import torch

import lmarith as la
from lmarith import reference
from builders import assert_all_pages_free, check_kv_invariants, make_model, make_tokenizer

PROMPTS = ["The cat sat on", "Tell me about dragons and magic.", "Paris", "Once upon a time there was"]
GREEDY = la.SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def llm():
    return la.LLM(kv_cache_bytes=4 << 20, max_num_seqs=32)


def _transformers_greedy(directory, prompt, max_tokens):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    ids = AutoTokenizer.from_pretrained(directory)(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gpt2"])
def test_single_model_greedy_matches_transformers(family, tmp_path):
    directory = make_model(tmp_path, family, seed=3)
    llm = la.LLM(kv_cache_bytes=2 << 20, page_tokens=4)
    outputs = llm.generate(PROMPTS, la.Model(str(directory)), GREEDY)
    for prompt, output in zip(PROMPTS, outputs):
        assert output.token_ids == _transformers_greedy(directory, prompt, 12), prompt
    assert_all_pages_free(llm)


def _formulas(directory):
    model = la.Model(str(directory))
    helpful = model.prompt("You are a helpful assistant.")
    rude = model.prompt("You are rude.")
    magic = model.prompt("You talk about magic.")
    return {
        "linear": helpful - 0.6 * rude,
        "union": helpful + 2 * la.Union(rude, magic),
        "intersection": la.Intersection(helpful, magic) + 0.5 * model,
        "contrastive": helpful - rude,
        "top_k_filter": la.TopPTopK(helpful + magic, top_k=5),
    }


@pytest.mark.parametrize("name", ["linear", "union", "intersection", "contrastive", "top_k_filter"])
def test_formula_greedy_matches_reference_decoder(name, llama_dir, llm):
    formula = _formulas(llama_dir)[name]
    expected = reference.generate(formula, PROMPTS[:2], max_tokens=10, stop_at_eos=False)
    params = la.SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    outputs = llm.generate(PROMPTS[:2], formula, params)
    assert [o.token_ids for o in outputs] == [e.token_ids for e in expected]


def _mixed_requests(directory):
    formulas = list(_formulas(directory).values()) + [la.Model(str(directory))]
    prompts = [PROMPTS[i % 4] * (1 + i % 3) for i in range(16)]
    chosen = [formulas[i % len(formulas)] for i in range(16)]
    return prompts, chosen


def test_batch_invariance_with_preemption(llama_dir):
    prompts, formulas = _mixed_requests(llama_dir)
    params = la.SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    alone = [la.LLM(kv_cache_bytes=1 << 20, page_tokens=4).generate([p], f, params)[0].token_ids
             for p, f in zip(prompts, formulas)]
    tight = la.LLM(kv_cache_bytes=200 * 1024, page_tokens=4, max_num_seqs=16)
    together = tight.generate(prompts, formulas, params)
    assert sum(o.num_preemptions for o in together) > 0, "the pool should have run out"
    assert [o.token_ids for o in together] == alone
    assert tight.stats().preemptions == sum(o.num_preemptions for o in together)
    assert_all_pages_free(tight)
    check_kv_invariants(tight)


def test_seeded_sampling_is_reproducible_regardless_of_batch(llama_dir, llm):
    formula = _formulas(llama_dir)["union"]
    params = la.SamplingParams(temperature=1.0, top_p=0.9, max_tokens=10, seed=1234, ignore_eos=True)
    alone = llm.generate([PROMPTS[0]], formula, params)[0].token_ids
    others = la.SamplingParams(temperature=0.7, max_tokens=6, seed=7)
    batch = llm.generate([PROMPTS[1], PROMPTS[0], PROMPTS[2]], formula, params)
    assert batch[1].token_ids == alone
    assert llm.generate([PROMPTS[3]], formula, others)[0].token_ids != alone
    different = la.SamplingParams(temperature=1.0, top_p=0.9, max_tokens=10, seed=99, ignore_eos=True)
    assert llm.generate([PROMPTS[0]], formula, different)[0].token_ids != alone


def test_prefix_cache_shares_pages_between_requests(llama_dir):
    llm = la.LLM(kv_cache_bytes=1 << 20, page_tokens=4)
    model = la.Model(str(llama_dir))
    prompt = "Once upon a time there was a small robot who loved to read books"
    first = llm.generate([prompt], model, GREEDY)[0]
    assert first.metrics.cached_prompt_tokens == 0
    assert llm.stats().kv_pages_cached >= 2, "the prompt's full pages stay cached when free"
    again = llm.generate([prompt], model, GREEDY)[0]
    assert again.token_ids == first.token_ids
    assert again.metrics.cached_prompt_tokens >= 8
    assert again.metrics.prompt_tokens == first.metrics.prompt_tokens
    assert llm.stats().prefix_cache_hit_tokens >= 8
    assert_all_pages_free(llm)


def test_stop_strings_eos_and_stream(llama_dir, llm):
    model = la.Model(str(llama_dir))
    full = llm.generate([PROMPTS[0]], model, GREEDY)[0]
    chunks = list(llm.stream(PROMPTS[0], model, GREEDY))
    assert "".join(c.text for c in chunks) == full.text
    assert [t for c in chunks for t in c.token_ids] == full.token_ids
    assert chunks[-1].finish_reason == "length"
    stop_text = full.text[3:6]
    if stop_text.strip():
        stopped = llm.generate([PROMPTS[0]], model, la.SamplingParams(
            temperature=0, max_tokens=12, stop=[stop_text], ignore_eos=True))[0]
        assert stopped.finish_reason == "stop" and stop_text not in stopped.text
        streamed = list(llm.stream(PROMPTS[0], model, la.SamplingParams(
            temperature=0, max_tokens=12, stop=[stop_text], ignore_eos=True)))
        assert "".join(c.text for c in streamed) == stopped.text
    eos = full.token_ids[2]
    stopped = llm.generate([PROMPTS[0]], model, la.SamplingParams(
        temperature=0, max_tokens=12, stop_token_ids=[eos]))[0]
    assert stopped.finish_reason == "stop" and stopped.token_ids == full.token_ids[:3]


def test_user_errors_are_specific_and_leave_the_engine_usable(llama_dir, tmp_path, llm):
    model = la.Model(str(llama_dir))
    with pytest.raises(la.PromptError, match="empty"):
        llm.generate([""], model, GREEDY)
    with pytest.raises(la.PromptError, match="window"):
        llm.generate(["cat " * 400], model, GREEDY)
    with pytest.raises(la.SamplingParamsError, match="top_p"):
        la.SamplingParams(top_p=0)
    with pytest.raises(la.SamplingParamsError, match="temperature"):
        la.SamplingParams(temperature=-1)
    other_tokenizer = make_tokenizer(vocab_size=280, extra_text="zebra quokka")
    other = la.Model(str(make_model(tmp_path / "other", "llama", tokenizer=other_tokenizer)))
    with pytest.raises(la.FormulaError, match="different vocabularies"):
        llm.generate(["hi"], model + other, GREEDY)
    with pytest.raises(la.CacheExhaustedError, match="kv_cache_bytes"):
        la.LLM(kv_cache_bytes=8 * 1024, page_tokens=4).generate(
            ["cat " * 30], model, la.SamplingParams(max_tokens=64))
    assert llm.generate([PROMPTS[0]], model, GREEDY)[0].token_ids
    assert_all_pages_free(llm)


def test_two_models_share_one_pool(llama_dir, wide_dir):
    """Terms on different models (same tokenizer) in one request, one pool for both."""
    second = la.Model(str(wide_dir))
    formula = la.Model(str(llama_dir)) + 0.5 * la.Union(second, la.Model(str(llama_dir)).prompt("Magic."))
    expected = reference.generate(formula, PROMPTS[:2], max_tokens=8, stop_at_eos=False)
    llm = la.LLM(kv_cache_bytes=1 << 20, page_tokens=4)
    outputs = llm.generate(PROMPTS[:2], formula, la.SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert [o.token_ids for o in outputs] == [e.token_ids for e in expected]
    stats = llm.stats()
    assert len(stats.forward_calls) == 2
    assert set(stats.kv_page_tokens.values()) == {4, 8}, "the smaller KV footprint stores more tokens per page"


def test_chunked_prefill_gives_the_same_tokens(llama_dir):
    """A tiny token budget forces every prompt through several prefill chunks."""
    formula = _formulas(llama_dir)["union"]
    prompts = [PROMPTS[3] * 3, PROMPTS[1]]
    params = la.SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    whole = la.LLM(kv_cache_bytes=1 << 20).generate(prompts, formula, params)
    chunked_llm = la.LLM(kv_cache_bytes=1 << 20, max_num_batched_tokens=7)
    chunked = chunked_llm.generate(prompts, formula, params)
    assert [o.token_ids for o in chunked] == [o.token_ids for o in whole]
    assert_all_pages_free(chunked_llm)


def test_kv_budget_from_a_fraction_of_free_memory(llama_dir):
    llm = la.LLM(kv_cache_bytes=None, kv_cache_fraction=0.01)
    assert 0 < llm.config.kv_cache_bytes
    assert llm.generate([PROMPTS[0]], la.Model(str(llama_dir)), GREEDY)[0].token_ids
    with pytest.raises(ValueError, match="kv_cache_fraction"):
        la.LLM(kv_cache_bytes=None, kv_cache_fraction=2.0)
