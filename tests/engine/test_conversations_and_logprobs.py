"""Conversations as prompts (each term reads its chat template over its own system prompt
plus the messages) and logprobs of the formula's law, through generate and stream."""
from __future__ import annotations

import pytest
import torch

import lmarith as la
from lmarith import PromptError, SamplingParamsError
from builders import assert_all_pages_free, make_model, make_tokenizer

CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")
GREEDY = la.SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    tokenizer = make_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return la.Model(str(make_model(tmp_path_factory.mktemp("chat"), tokenizer=tokenizer, seed=4)))


@pytest.fixture(scope="module")
def llm():
    engine = la.LLM(kv_cache_bytes=4 << 20)
    yield engine
    engine.close()


def test_a_one_message_conversation_reads_like_the_text(chat_model, llm):
    formula = chat_model.chat("Be brief.") + 0.5 * chat_model.chat()
    conversation = [{"role": "user", "content": "Tell me about cats."}]
    from_text = llm.generate("Tell me about cats.", formula, GREEDY)[0]
    from_conversation = llm.generate([conversation], formula, GREEDY)[0]
    assert from_conversation.token_ids == from_text.token_ids
    assert from_conversation.prompt == conversation


def test_a_terms_own_system_prompt_replaces_the_conversations(chat_model, llm):
    user = {"role": "user", "content": "Tell me about cats."}
    with_other_system = [{"role": "system", "content": "Be verbose."}, user]
    term = chat_model.chat("Be brief.")
    assert llm.generate([with_other_system], term, GREEDY)[0].token_ids == \
        llm.generate([[user]], term, GREEDY)[0].token_ids
    bare = llm.generate([with_other_system], chat_model, GREEDY)[0].token_ids
    assert bare != llm.generate([[user]], chat_model, GREEDY)[0].token_ids  # kept for bare terms


def test_multi_turn_conversations_stream(chat_model, llm):
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                    {"role": "user", "content": "Tell me about dogs."}]
    chunks = list(llm.stream(conversation, chat_model, GREEDY))
    assert [t for c in chunks for t in c.token_ids] == llm.generate([conversation], chat_model, GREEDY)[0].token_ids


@pytest.mark.parametrize("conversation, words", [
    ([{"role": "robot", "content": "hi"}], "role"),
    ([{"role": "user"}], "content"),
    ([{"role": "user", "content": 3}], "content"),
    ([{"role": "user", "content": "hi", "extra": 1}], "role"),
    ([{"role": "user", "content": "\ud800"}], "Unicode"),
])
def test_bad_conversations_raise_prompt_error(conversation, words, chat_model, llm):
    with pytest.raises(PromptError, match=words):
        llm.generate([conversation], chat_model, GREEDY)
    assert_all_pages_free(llm)


def test_a_model_without_a_chat_template_cannot_read_a_conversation(llama_dir, llm):
    with pytest.raises(PromptError, match="no chat template"):
        llm.generate([[{"role": "user", "content": "hi"}]], la.Model(str(llama_dir)), GREEDY)
    with pytest.raises(PromptError, match="no chat template"):
        llm.generate("hi", la.Model(str(llama_dir)).chat("Be brief."), GREEDY)


def test_logprobs_are_those_of_the_formulas_law(llama_dir, llm):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = la.Model(str(llama_dir))
    params = la.SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3)
    output = llm.generate("The cat sat", model, params)[0]
    hf_model = AutoModelForCausalLM.from_pretrained(str(llama_dir)).eval()
    ids = AutoTokenizer.from_pretrained(str(llama_dir))("The cat sat").input_ids
    with torch.no_grad():
        logits = hf_model(torch.tensor([ids + output.token_ids])).logits[0].float()
    laws = torch.log_softmax(logits[len(ids) - 1: -1], dim=-1)
    assert len(output.logprobs) == len(output.token_ids)
    for position, entry in enumerate(output.logprobs):
        assert entry.token_id == output.token_ids[position] == entry.top[0][0]  # greedy: the top
        assert entry.logprob == pytest.approx(float(laws[position, entry.token_id]), abs=1e-4)
        assert len(entry.top) == 3 and entry.top[0][2] >= entry.top[1][2] >= entry.top[2][2]
        assert entry.text == entry.top[0][1]


def test_stream_chunks_carry_the_logprobs_of_their_tokens(llama_dir, llm):
    formula = la.Model(str(llama_dir)) + 0.5 * la.Model(str(llama_dir)).prompt("You are rude.")
    params = la.SamplingParams(temperature=0.8, max_tokens=8, seed=3, logprobs=0)
    whole = llm.generate("The cat", formula, params)[0]
    chunks = list(llm.stream("The cat", formula, params))
    streamed = [entry for chunk in chunks for entry in chunk.logprobs]
    assert [e.token_id for e in streamed] == whole.token_ids
    assert [e.logprob for e in streamed] == [e.logprob for e in whole.logprobs]
    assert all(e.top == [] and e.logprob <= 0 for e in streamed)


def test_logprobs_with_speculation_are_refused(llama_dir, wide_dir, llm):
    formula = la.Speculative(la.Model(str(llama_dir)), la.Model(str(wide_dir)), k=2)
    with pytest.raises(SamplingParamsError, match="speculative"):
        llm.generate("hi", formula, la.SamplingParams(logprobs=2))
    with pytest.raises(SamplingParamsError, match="logprobs"):
        la.SamplingParams(logprobs=21)
