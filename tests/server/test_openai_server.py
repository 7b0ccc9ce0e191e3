"""The OpenAI-compatible server as clients see it: one real server process (uvicorn, tiny
models) for the module, driven by the official `openai` client and httpx. Every answer is
checked against the Python API on the same models in this process (greedy, or seeded)."""
from __future__ import annotations

import json
import math

import pytest

import lmarith as la
from server.helpers import GREEDY, expect, metrics

CHAT = [{"role": "user", "content": "Tell me about cats."}]


def test_models_health_and_metrics(client, http, setup):
    _, presets = setup
    listing = client.models.list()
    assert [m.id for m in listing.data] == list(presets)
    raw = http.get("/v1/models").json()
    assert raw["object"] == "list" and all(m["object"] == "model" for m in raw["data"])
    assert la.parse_formula(raw["data"][3]["formula"]) == presets["mix"]
    assert http.get("/health").json() == {"status": "ok"}
    samples = metrics(http)
    for name in ("lmarith_requests_running", "lmarith_requests_waiting", "lmarith_kv_pages_total",
                 "lmarith_kv_pages_free", "lmarith_generated_tokens_total",
                 "lmarith_prefix_cache_hit_tokens_total", "lmarith_preemptions_total",
                 "lmarith_proposed_tokens_total", "lmarith_accepted_tokens_total",
                 "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert name in samples, name
    assert samples["lmarith_kv_pages_total"] == 128


@pytest.mark.parametrize("preset", ["tiny", "mix"])
def test_completion_equals_python_api(client, local_llm, setup, preset):
    _, presets = setup
    want = expect(local_llm, "The cat sat", presets[preset], **GREEDY)
    got = client.completions.create(model=preset, prompt="The cat sat", max_tokens=12, temperature=0)
    assert got.id.startswith("cmpl-") and got.object == "text_completion" and got.model == preset
    assert got.created > 0 and len(got.choices) == 1
    assert got.choices[0].text == want.text
    assert got.choices[0].finish_reason == want.finish_reason == "length"
    assert got.usage.completion_tokens == len(want.token_ids) == 12
    assert got.usage.prompt_tokens == want.metrics.prompt_tokens   # summed over the terms
    assert got.usage.total_tokens == got.usage.prompt_tokens + 12


def test_completion_stream_with_usage(client, local_llm, setup):
    _, presets = setup
    want = expect(local_llm, "Once upon a time", presets["mix"], **GREEDY)
    chunks = list(client.completions.create(model="mix", prompt="Once upon a time", max_tokens=12,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text_chunks, last = chunks[:-1], chunks[-1]
    assert len(text_chunks) >= 2 and all(c.id == last.id and c.id.startswith("cmpl-") for c in chunks)
    assert "".join(c.choices[0].text for c in text_chunks) == want.text
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert last.choices == [] and last.usage.completion_tokens == 12
    assert last.usage.prompt_tokens == want.metrics.prompt_tokens
    assert last.usage.total_tokens == last.usage.prompt_tokens + 12


def test_stream_wire_format(http):
    """SSE framing: `data: {json}` events separated by blank lines, ending with [DONE]."""
    body = {"model": "tiny", "prompt": "The dog", "max_tokens": 4, "temperature": 0, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e[len("data: "):]) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1]) and payloads
    assert all("usage" not in p for p in payloads)             # include_usage not asked
    assert payloads[-1]["choices"][0]["finish_reason"] == "length"


def test_chat_equals_python_api(client, local_llm, setup):
    _, presets = setup
    want = expect(local_llm, CHAT, presets["chat"], **GREEDY)
    got = client.chat.completions.create(model="chat", messages=CHAT, max_tokens=12, temperature=0)
    assert got.id.startswith("chatcmpl-") and got.object == "chat.completion"
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want.text
    assert got.choices[0].finish_reason == want.finish_reason
    assert got.usage.prompt_tokens == want.metrics.prompt_tokens
    streamed = list(client.chat.completions.create(model="chat", messages=CHAT, max_tokens=12,
                                                   temperature=0, stream=True))
    assert all(c.object == "chat.completion.chunk" for c in streamed)
    assert streamed[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in streamed[1:])
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == want.text
    assert streamed[-1].choices[0].finish_reason == want.finish_reason


def test_system_message_and_preset_over_conversation(client, local_llm, setup):
    """A bare-model preset reads the conversation through the chat template too."""
    _, presets = setup
    conversation = [{"role": "system", "content": "Be brief."}, *CHAT,
                    {"role": "assistant", "content": "Cats purr."}, {"role": "user", "content": "More."}]
    want = expect(local_llm, conversation, presets["tiny"], **GREEDY)
    got = client.chat.completions.create(model="tiny", messages=conversation, max_tokens=12, temperature=0)
    assert got.choices[0].message.content == want.text


def test_formula_extension_overrides_preset(client, local_llm, setup):
    models, presets = setup
    text = "M('You are helpful.') + 0.5 * Union(M('You are rude.', model='tiny-b'), M())"
    want = expect(local_llm, "The cat sat", la.parse_formula(text, models), **GREEDY)
    plain = expect(local_llm, "The cat sat", presets["tiny"], **GREEDY)
    assert want.text != plain.text          # else the test could not tell the formula was used
    got = client.completions.create(model="tiny", prompt="The cat sat", max_tokens=12, temperature=0,
                                    extra_body={"formula": text})
    assert got.choices[0].text == want.text
    assert got.usage.prompt_tokens == want.metrics.prompt_tokens
    chat = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=12, temperature=0,
                                          extra_body={"formula": "Chat('Arr.') - 0.2 * Chat(model='tiny-b')"})
    want_chat = expect(local_llm, CHAT, la.parse_formula("Chat('Arr.') - 0.2 * Chat(model='tiny-b')",
                                                         models), **GREEDY)
    assert chat.choices[0].message.content == want_chat.text


def test_nudging_formula_per_request(client, local_llm, setup):
    """A request may carry a Nudging formula string: the server gives the Python API's answer."""
    models, _ = setup
    text = "Nudging(M(), Chat('You are kind.', model='tiny-b'), gamma=0.5)"
    formula = la.parse_formula(text, models)
    want = expect(local_llm, "The cat sat", formula, temperature=0, max_tokens=16)
    assert want.metrics.nudging_rounds >= 1
    got = client.completions.create(model="tiny", prompt="The cat sat", max_tokens=16, temperature=0,
                                    extra_body={"formula": text})
    assert got.choices[0].text == want.text
    assert got.usage.completion_tokens == len(want.token_ids)
    chat = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=16, temperature=0,
                                          extra_body={"formula": text})
    assert chat.choices[0].message.content == expect(local_llm, CHAT, formula, temperature=0,
                                                     max_tokens=16).text


def test_sampling_extensions_and_stop(client, local_llm, setup):
    _, presets = setup
    params = dict(temperature=0.8, top_p=0.9, top_k=20, min_p=0.05, seed=11, max_tokens=12)
    want = expect(local_llm, "The dog ran", presets["mix"], **params)
    got = client.completions.create(model="mix", prompt="The dog ran", max_tokens=12, temperature=0.8,
                                    top_p=0.9, seed=11, extra_body={"top_k": 20, "min_p": 0.05})
    assert got.choices[0].text == want.text
    free = expect(local_llm, "The dog ran", presets["tiny"], **GREEDY).text
    stop = next(free[i:i + 2] for i in range(2, len(free) - 1) if "\ufffd" not in free[i:i + 2])
    want_stop = expect(local_llm, "The dog ran", presets["tiny"], stop=[stop, "zzz"], **GREEDY)
    got = client.completions.create(model="tiny", prompt="The dog ran", max_tokens=12, temperature=0,
                                    stop=[stop, "zzz"])
    assert want_stop.finish_reason == "stop" and got.choices[0].finish_reason == "stop"
    assert got.choices[0].text == want_stop.text and stop not in got.choices[0].text
    ignored = client.completions.create(model="tiny", prompt="The dog ran", max_tokens=12,
                                        temperature=0, extra_body={"ignore_eos": True})
    assert ignored.usage.completion_tokens == 12


def test_n_choices_with_seeds(client, local_llm, setup):
    _, presets = setup
    prompts = ["The cat", "A robot"]
    got = client.completions.create(model="mix", prompt=prompts, n=3, seed=5, temperature=1.0, max_tokens=8)
    assert [c.index for c in got.choices] == list(range(6))
    for p, prompt in enumerate(prompts):
        for i in range(3):
            want = expect(local_llm, prompt, presets["mix"], temperature=1.0, max_tokens=8, seed=5 + i)
            assert got.choices[p * 3 + i].text == want.text
    assert len({c.text for c in got.choices[:3]}) > 1           # the seeds differ
    streamed = list(client.chat.completions.create(model="chat", messages=CHAT, n=2, seed=3,
                                                   temperature=1.0, max_tokens=8, stream=True))
    texts = {0: "", 1: ""}
    for chunk in streamed:
        texts[chunk.choices[0].index] += chunk.choices[0].delta.content or ""
    for i in range(2):
        assert texts[i] == expect(local_llm, CHAT, presets["chat"], temperature=1.0, max_tokens=8,
                                  seed=3 + i).text


def test_completion_logprobs(client, local_llm, setup):
    _, presets = setup
    want = expect(local_llm, "The cat sat", presets["mix"], logprobs=3, **GREEDY)
    got = client.completions.create(model="mix", prompt="The cat sat", max_tokens=12, temperature=0,
                                    logprobs=3).choices[0].logprobs
    assert len(got.tokens) == len(got.token_logprobs) == len(got.top_logprobs) == 12
    for entry, token, logprob, top in zip(want.logprobs, got.tokens, got.token_logprobs, got.top_logprobs):
        assert token == entry.text and math.isclose(logprob, entry.logprob, abs_tol=1e-5)
        # keyed by text, so tokens with the same text (partial characters) share one entry
        assert 1 <= len(top) <= 3 and len(entry.top) == 3
        assert {round(v, 4) for v in top.values()} <= {round(lp, 4) for _, _, lp in entry.top}
        assert sum(math.exp(lp) for _, _, lp in entry.top) <= 1 + 1e-4   # a normalised law
    assert got.text_offset[0] == 0 and got.text_offset == sorted(got.text_offset)
    streamed = list(client.completions.create(model="mix", prompt="The cat sat", max_tokens=12,
                                              temperature=0, logprobs=3, stream=True))
    assert sum(len(c.choices[0].logprobs.tokens) for c in streamed) == 12


def test_chat_logprobs(client, local_llm, setup):
    _, presets = setup
    want = expect(local_llm, CHAT, presets["chat"], logprobs=2, **GREEDY)
    got = client.chat.completions.create(model="chat", messages=CHAT, max_tokens=12, temperature=0,
                                         logprobs=True, top_logprobs=2).choices[0].logprobs.content
    assert len(got) == 12
    for entry, item in zip(want.logprobs, got):
        assert item.token == entry.text and math.isclose(item.logprob, entry.logprob, abs_tol=1e-5)
        assert [t.logprob for t in item.top_logprobs] == pytest.approx([lp for _, _, lp in entry.top])
        assert len(item.top_logprobs) == 2
    plain = client.chat.completions.create(model="chat", messages=CHAT, max_tokens=4, temperature=0)
    assert plain.choices[0].logprobs is None
