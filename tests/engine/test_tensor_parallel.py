"""Tensor parallelism on CPU: 2 gloo ranks (spawned processes) give the tokens of one rank
for every family, formulas (drawn on vocabulary shards), seeded sampling, and the paths that
gather whole logits (top-p, logprobs, speculation, nudging, formulas without a plan)."""
from __future__ import annotations

import pytest

import lmarith as la
from builders import assert_all_pages_free, check_kv_invariants, make_model
from lmarith.errors import ConfigError, EngineError

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gpt2"]
PROMPTS = ["The cat sat", "Once upon a time there", "Paris is the", "You are a helpful"]
GREEDY = la.SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    made = {family: make_model(tmp_path_factory.mktemp(family), family, seed=11 + i)
            for i, family in enumerate(FAMILIES)}
    made["second"] = make_model(tmp_path_factory.mktemp("second"), "llama", seed=3)
    return made


@pytest.fixture(scope="module")
def engines(dirs):
    """The same models at tensor parallel size 1 and 2, loaded up front (one pool for all)."""
    models = [str(path) for path in dirs.values()]
    one = la.LLM(kv_cache_bytes=1 << 23, models=models)
    two = la.LLM(kv_cache_bytes=1 << 23, models=models, tensor_parallel_size=2)
    yield one, two
    two.close()
    one.close()


def both(engines, prompts, formula, params):
    one, two = engines
    return [o.token_ids for o in one.generate(prompts, formula, params)], \
        [o.token_ids for o in two.generate(prompts, formula, params)]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_equal_one_rank(engines, dirs, family):
    expected, got = both(engines, PROMPTS, la.Model(str(dirs[family])), GREEDY)
    assert got == expected
    assert len(set(map(tuple, got))) > 1        # different prompts, different answers


def _formulas(dirs):
    model, other = la.Model(str(dirs["llama"])), la.Model(str(dirs["second"]))
    helpful, rude = model.prompt("You are a helpful assistant."), model.prompt("You are rude.")
    return {
        "linear": helpful - 0.6 * rude + 0.3 * other,
        "union": helpful + 2 * la.Union(rude, other),
        "intersection": la.Intersection(helpful, other) + 0.5 * model,
        "contrastive": la.methods.contrastive_decoding(model, other, alpha=0.1),
        "no plan (TopPTopK)": la.TopPTopK(helpful + other, top_k=5),
    }


@pytest.mark.parametrize("name", ["linear", "union", "intersection", "contrastive", "no plan (TopPTopK)"])
def test_formulas_equal_one_rank(engines, dirs, name):
    expected, got = both(engines, PROMPTS, _formulas(dirs)[name], GREEDY)
    assert got == expected


@pytest.mark.parametrize("settings", [dict(), dict(top_k=7), dict(min_p=0.1), dict(top_k=3, min_p=0.05),
                                      dict(top_p=0.8), dict(temperature=0.5)])
def test_seeded_sampling_equals_one_rank(engines, dirs, settings):
    formula = _formulas(dirs)["linear"]
    params = la.SamplingParams(**{"temperature": 1.0, "max_tokens": 12, "seed": 1234,
                                  "ignore_eos": True, **settings})
    worker = engines[1].engine.worker
    before = worker.sharded_draws, worker.gathered_draws
    expected, got = both(engines, PROMPTS, formula, params)
    assert got == expected
    on_shards = worker.sharded_draws - before[0]
    gathered = worker.gathered_draws - before[1]
    assert (on_shards, gathered) == ((0, 48) if "top_p" in settings else (48, 0))
    greedy, _ = both(engines, PROMPTS, formula, GREEDY)
    assert expected != [tokens[:12] for tokens in greedy]   # really sampled


def test_logprobs_are_gathered_and_equal(engines, dirs):
    one, two = engines
    params = la.SamplingParams(temperature=0, max_tokens=6, logprobs=3)
    expected = one.generate(PROMPTS[:2], la.Model(str(dirs["qwen2"])), params)
    got = two.generate(PROMPTS[:2], la.Model(str(dirs["qwen2"])), params)
    for a, b in zip(expected, got):
        assert a.token_ids == b.token_ids
        for x, y in zip(a.logprobs, b.logprobs):
            assert x.token_id == y.token_id and x.logprob == pytest.approx(y.logprob, abs=1e-4)
            assert [t[0] for t in x.top] == [t[0] for t in y.top] and len(x.top) == 3


def test_speculation_and_nudging_equal_one_rank(engines, dirs):
    target, draft = la.Model(str(dirs["llama"])), la.Model(str(dirs["second"]))
    for formula in [la.Speculative(target - 0.3 * draft, draft, k=3),
                    la.Nudging(target, draft.prompt("You are kind."), gamma=0.5)]:
        expected, got = both(engines, PROMPTS[:3], formula, la.SamplingParams(temperature=0, max_tokens=10))
        assert got == expected


def test_batches_mixing_sharded_and_gathered_rows(engines, dirs):
    """One step holds rows drawn on shards, rows gathered for top-p and a plan-less formula."""
    formulas = list(_formulas(dirs).values())
    params = [la.SamplingParams(temperature=0.9, max_tokens=8, seed=i, top_p=0.9 if i % 2 else 1.0,
                                ignore_eos=True) for i in range(len(formulas))]
    one, two = engines
    prompts = PROMPTS[: len(formulas)] + PROMPTS[:1]
    expected = [o.token_ids for o in one.generate(prompts[: len(formulas)], formulas, params)]
    got = [o.token_ids for o in two.generate(prompts[: len(formulas)], formulas, params)]
    assert got == expected
    assert_all_pages_free(two)
    check_kv_invariants(two)


def test_pages_free_after_work_and_stats(engines):
    _, two = engines
    assert_all_pages_free(two)
    # the budget is per rank and each rank holds half the heads: twice the pages
    assert two.stats().kv_pages_total == 2 * engines[0].stats().kv_pages_total


def test_bad_sizes_are_refused_clearly(tmp_path):
    odd = make_model(tmp_path / "odd", "llama", num_attention_heads=4, num_key_value_heads=1)
    with pytest.raises(ConfigError, match="tensor_parallel_size=2 must divide"):
        la.LLM(kv_cache_bytes=1 << 22, models=[str(odd)], tensor_parallel_size=2)
    with pytest.raises(ConfigError, match="tensor_parallel_size"):
        la.LLM(kv_cache_bytes=1 << 22, tensor_parallel_size=0)


def test_a_dead_rank_fails_requests_instead_of_hanging(dirs):
    llm = la.LLM(kv_cache_bytes=1 << 22, models=[str(dirs["llama"])], tensor_parallel_size=2)
    try:
        assert llm.generate(PROMPTS[0], la.Model(str(dirs["llama"])), GREEDY)[0].token_ids
        worker = llm.engine.worker
        worker.processes[0].kill()
        worker.processes[0].join(10)
        with pytest.raises(EngineError, match="ranks are gone"):
            llm.generate(PROMPTS[0], la.Model(str(dirs["llama"])), GREEDY)
    finally:
        llm.close()


def test_preemption_and_prefix_cache_under_one_page_table(dirs):
    """A pool too small for the batch: rank 0's block manager preempts and re-admits, shares
    cached prefix pages and copies pages on write, and every rank follows its page tables."""
    model = la.Model(str(dirs["llama"]))
    formulas = [model, model.prompt("You are rude.") + 0.5 * model, model.prompt("You are rude.") - model]
    prompts = [PROMPTS[i % 4] * (1 + i % 3) for i in range(12)]
    chosen = [formulas[i % 3] for i in range(12)]
    params = la.SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    with la.LLM(kv_cache_bytes=1 << 20, page_tokens=4) as roomy:
        alone = [roomy.generate([p], f, params)[0].token_ids for p, f in zip(prompts, chosen)]
    # each rank holds half the heads, so half the bytes give the same pages as one rank's 200 kB
    with la.LLM(kv_cache_bytes=100 * 1024, page_tokens=4, max_num_seqs=12,
                tensor_parallel_size=2) as tight:
        together = tight.generate(prompts, chosen, params)
        again = tight.generate(prompts[:3], chosen[:3], params)     # prefix-cache hits
        assert sum(o.num_preemptions for o in together) > 0, "the pool should have run out"
        assert [o.token_ids for o in together] == alone
        assert [o.token_ids for o in again] == alone[:3]
        assert tight.stats().prefix_cache_hit_tokens > 0
        assert_all_pages_free(tight)
        check_kv_invariants(tight)
