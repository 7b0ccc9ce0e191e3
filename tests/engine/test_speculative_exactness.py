"""Speculative sampling leaves the law unchanged: thousands of seeded requests with speculation
on, for every kind of speculation, pass a chi-square test against the exact joint law of the
first tokens (enumerated by lmarith.reference.joint_law); a deliberately wrong acceptance
rule fails the same test, which shows the test has the power to catch one."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

import lmarith as la
from lmarith.decoding.speculative import verifier
from lmarith.kernels.reference_speculative import spec_accept
from lmarith.reference import joint_law
from builders import assert_all_pages_free, check_kv_invariants, make_model, make_word_tokenizer

NUM_REQUESTS = 2000
NUM_TOKENS = 3
MIN_P_VALUE = 1e-4          # the seeds are fixed, so a pass is reproducible, never flaky
MIN_EXPECTED = 5.0          # cells expected fewer times than this are pooled
PROMPT = "The cat sat on the mat. The cat"
RUDE, MAGIC = "You are rude.", "You talk about magic and dragons."


@pytest.fixture(scope="module")
def models(llama_dir, wide_dir):
    return la.Model(str(llama_dir)), la.Model(str(wide_dir))


@pytest.fixture(scope="module")
def word_models(tmp_path_factory):
    """A bigram model (its greedy chains cycle) and a random one over a 60-word vocabulary
    whose text round-trips exactly, so a prompt can repeat what the target likes to say."""
    tokenizer = make_word_tokenizer(60)
    bigram = make_model(tmp_path_factory.mktemp("bigram"), tokenizer=tokenizer, seed=1, bigram=True)
    other = make_model(tmp_path_factory.mktemp("other"), tokenizer=tokenizer, seed=2)
    return la.Model(str(bigram)), la.Model(str(other))


@pytest.fixture(scope="module")
def llm():
    engine = la.LLM(kv_cache_bytes=64 << 20, max_num_seqs=256, max_num_batched_tokens=4096)
    yield engine
    engine.close()


def _cases(big, small):
    """(formula, sampling controls) per kind of speculation."""
    top_k = dict(temperature=1.0, top_k=4)
    return {
        "two terms across": (big + 0.5 * small.prompt(RUDE, speculative_factor=2), top_k),
        "three terms across": (big + 0.4 * small.as_term(speculative_factor=2)
                               - 0.2 * big.prompt(RUDE, speculative_factor=3), top_k),
        "union across": (la.Union(big, small.prompt(MAGIC, speculative_factor=2))
                         + 0.5 * small.prompt(RUDE), top_k),
        "auto factor": (big + 0.5 * small.prompt(RUDE, speculative_factor="auto"), top_k),
        "top-p across": (big + 0.5 * small.prompt(RUDE, speculative_factor=3),
                         dict(temperature=0.8, top_k=8, top_p=0.6)),
        "one-term target, draft model": (la.Speculative(big, small, k=3), top_k),
        "draft formula": (la.Speculative(big + 0.5 * small, small.prompt(RUDE), k=2), top_k),
    }


def _ngram_case(llm, bigram, other):
    """Prompt lookup on a prompt that repeats the bigram model's own greedy cycle."""
    seed_text = "w5 w9 w7"
    greedy = la.SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    prompt = seed_text + llm.generate(seed_text, bigram, greedy)[0].text
    formula = la.Speculative(bigram + 0.3 * other, la.NgramDraft(n=2), k=2)
    return formula, dict(temperature=1.0, top_k=4), prompt


def _sample(llm, formula, controls, prompt: str = PROMPT) -> Counter:
    params = [la.SamplingParams(max_tokens=NUM_TOKENS, seed=seed, ignore_eos=True, **controls)
              for seed in range(NUM_REQUESTS)]
    outputs = llm.generate([prompt] * NUM_REQUESTS, formula, params)
    return Counter(tuple(output.token_ids) for output in outputs)


def _p_value(counts: Counter, law: dict) -> float:
    """Chi-square goodness of fit of the sampled sequences to the exact law (0 when a
    sequence the law gives probability 0 was sampled)."""
    if not set(counts) <= set(law):
        return 0.0
    expected = {seq: prob * NUM_REQUESTS for seq, prob in law.items()}
    big = [seq for seq in expected if expected[seq] >= MIN_EXPECTED]
    rest = [seq for seq in expected if expected[seq] < MIN_EXPECTED]
    observed = [counts[seq] for seq in big] + [sum(counts[seq] for seq in rest)]
    wanted = [expected[seq] for seq in big] + [sum(expected[seq] for seq in rest)]
    chi2 = sum((o - e) ** 2 / e for o, e in zip(observed, wanted) if e > 0)
    dof = sum(1 for e in wanted if e > 0) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2), torch.tensor(chi2 / 2)))


@pytest.fixture(scope="module")
def hf_models():
    return {}


@pytest.mark.parametrize("case", ["two terms across", "three terms across", "union across",
                                  "auto factor", "top-p across", "one-term target, draft model", "draft formula",
                                  "n-gram draft"])
def test_speculation_samples_the_exact_law(case, models, word_models, llm, hf_models):
    if case == "n-gram draft":
        formula, controls, prompt = _ngram_case(llm, *word_models)
    else:
        (formula, controls), prompt = _cases(*models)[case], PROMPT
    before = llm.stats()
    counts = _sample(llm, formula, controls, prompt)
    after = llm.stats()
    proposed = after.proposed_tokens - before.proposed_tokens
    accepted = after.accepted_tokens - before.accepted_tokens
    assert 0 < accepted < proposed, "speculation must both accept and reject here"
    law = joint_law(formula, prompt, NUM_TOKENS, models=hf_models, **controls)
    assert _p_value(counts, law) > MIN_P_VALUE
    check_kv_invariants(llm)
    assert_all_pages_free(llm)


def _accept_everything(target, draft, tokens, num_drafts, seed, step, greedy):
    """A wrong rule: keep every proposal, then draw the bonus from the target law."""
    rows = []
    for b in range(len(num_drafts)):
        n = int(num_drafts[b])
        rows.append(spec_accept(target[b:b + 1, n:n + 1], draft[b:b + 1, :0], tokens[b:b + 1, :0],
                                num_drafts[b:b + 1] * 0, seed[b:b + 1], step[b:b + 1],
                                greedy[b:b + 1])[1])
    return num_drafts.to(torch.int32), torch.cat(rows)


def test_a_wrong_acceptance_rule_fails_the_same_test(models, llm, hf_models, monkeypatch):
    formula, controls = _cases(*models)["two terms across"]
    monkeypatch.setattr(verifier, "spec_accept", _accept_everything)
    counts = _sample(llm, formula, controls)
    law = joint_law(formula, PROMPT, NUM_TOKENS, models=hf_models, **controls)
    assert _p_value(counts, law) < 1e-6
