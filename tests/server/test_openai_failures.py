"""The server under bad input and under load, on the real server process: every bad request
gets its 4xx and OpenAI's error body and the next good request still succeeds; 50 concurrent
streams, some of them dropped after their first chunk, get the Python API's text while the
dropped ones are cancelled (their tokens are never generated, their pages come back)."""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest

import lmarith as la
from server.helpers import error_of, idle, metrics, poll

GOOD = {"model": "tiny", "prompt": "The cat", "max_tokens": 3, "temperature": 0}
CHAT = [{"role": "user", "content": "Hi"}]
LONG = "The cat sat on the mat. " * 30
C, CH = "/v1/completions", "/v1/chat/completions"

# (case, path, body: dict or raw bytes, status, param, code)
BAD = [
    ("invalid json", C, b'{"model": "tiny", "prompt": ', 400, None, None),
    ("body not an object", C, b'["tiny"]', 400, None, None),
    ("missing model", C, {"prompt": "x"}, 400, "model", None),
    ("prompt of the wrong type", C, {"model": "tiny", "prompt": 5}, 400, "prompt", None),
    ("empty prompt list", C, {"model": "tiny", "prompt": []}, 400, "prompt", "invalid_prompt"),
    ("empty prompt", C, {"model": "tiny", "prompt": ""}, 400, "prompt", "invalid_prompt"),
    ("unknown preset", C, {"model": "gpt-9", "prompt": "x"}, 404, "model", "model_not_found"),
    ("unknown preset, chat", CH, {"model": "gpt-9", "messages": CHAT}, 404, "model", "model_not_found"),
    ("formula syntax error", C, {**GOOD, "formula": "M() + * 2"}, 400, "formula", "invalid_formula"),
    ("formula unknown name", C, {**GOOD, "formula": "Foo(M())"}, 400, "formula", "invalid_formula"),
    ("negative total weight", C, {**GOOD, "formula": "M() - 2 * M(model='tiny-b')"}, 400, "formula",
     "invalid_formula"),
    ("formula on a model not served", C, {**GOOD, "formula": "M(model='/etc')"}, 400, "formula",
     "model_not_served"),
    ("negative temperature", C, {**GOOD, "temperature": -1}, 400, "temperature", "invalid_sampling_params"),
    ("top_p 0", C, {**GOOD, "top_p": 0}, 400, "top_p", "invalid_sampling_params"),
    ("top_k negative", C, {**GOOD, "top_k": -3}, 400, "top_k", "invalid_sampling_params"),
    ("max_tokens 0", C, {**GOOD, "max_tokens": 0}, 400, "max_tokens", "invalid_sampling_params"),
    ("empty stop string", C, {**GOOD, "stop": [""]}, 400, "stop", "invalid_sampling_params"),
    ("negative seed", C, {**GOOD, "seed": -1}, 400, "seed", "invalid_sampling_params"),
    ("temperature not a number", C, {**GOOD, "temperature": "hot"}, 400, "temperature", None),
    ("n 0", C, {**GOOD, "n": 0}, 400, "n", None),
    ("logprobs 50", C, {**GOOD, "logprobs": 50}, 400, "logprobs", "invalid_sampling_params"),
    ("top_logprobs without logprobs", CH, {"model": "chat", "messages": CHAT, "top_logprobs": 2}, 400,
     "top_logprobs", None),
    ("presence_penalty", C, {**GOOD, "presence_penalty": 1.0}, 400, "presence_penalty",
     "unsupported_parameter"),
    ("prompt too long", C, {**GOOD, "prompt": LONG, "max_tokens": 1000}, 400, "prompt", "invalid_prompt"),
    ("no chat template", CH, {"model": "plain", "messages": CHAT}, 400, "messages", "invalid_prompt"),
    ("no messages", CH, {"model": "chat", "messages": []}, 400, "messages", None),
    ("bad role", CH, {"model": "chat", "messages": [{"role": "wizard", "content": "x"}]}, 400,
     "messages.0.role", None),
    ("never fits the KV cache", C, {"model": "mix", "prompt": "Hi", "max_tokens": 1000}, 400,
     "max_tokens", "kv_cache_exhausted"),
    ("stream, never fits", C, {"model": "mix", "prompt": "Hi", "max_tokens": 1000, "stream": True}, 400,
     "max_tokens", "kv_cache_exhausted"),
    ("stream, bad formula", CH, {"model": "chat", "messages": CHAT, "stream": True, "formula": "M("}, 400,
     "formula", "invalid_formula"),
]


@pytest.mark.parametrize("case, path, body, status, param, code", BAD, ids=[c[0] for c in BAD])
def test_bad_input_is_answered_and_the_server_carries_on(http, case, path, body, status, param, code):
    if isinstance(body, bytes):
        response = http.post(path, content=body, headers={"content-type": "application/json"})
    else:
        response = http.post(path, json=body)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = error_of(response)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param and error["code"] == code, error
    good = http.post(C, json=GOOD)
    assert good.status_code == 200 and good.json()["choices"][0]["finish_reason"] == "length"


def test_unknown_route_and_method(http):
    assert error_of(http.get("/v1/nothing"))["code"] == "not_found"
    assert http.get("/v1/completions").status_code == 405


async def _stream(client: httpx.AsyncClient, prompt: str, drop: bool, max_tokens: int, n: int = 1):
    """Stream one completion; drop: close the connection after the first chunk."""
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "ignore_eos": drop, "n": n}
    text = ""
    async with client.stream("POST", C, json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            text += json.loads(line[6:])["choices"][0]["text"]
            if drop:
                return None           # leaving the block closes the connection mid-stream
    return text


async def _load(url: str, prompts: list[str], dropped: set[int], max_tokens: int, drop_tokens: int):
    limits = httpx.Limits(max_connections=len(prompts), max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        return await asyncio.gather(*(
            _stream(client, p, i in dropped, drop_tokens if i in dropped else max_tokens,
                    n=2 if i in dropped and i % 10 == 0 else 1)     # n=2: two merged streams
            for i, p in enumerate(prompts)))


def test_50_concurrent_streams_some_dropped(server_url, http, local_llm, setup):
    _, presets = setup
    words = ["cat", "dog", "robot", "sea", "book", "park", "fish", "bird", "mat", "time"]
    prompts = [f"The {words[i % 10]} and the {words[(i * 3) % 10]}" for i in range(50)]
    dropped = set(range(0, 50, 5))         # 10 of them (15 engine requests) leave after one chunk
    before = metrics(http)
    results = asyncio.run(_load(server_url, prompts, dropped, max_tokens=10, drop_tokens=200))
    kept = [i for i in range(50) if i not in dropped]
    wants = local_llm.generate([prompts[i] for i in kept], presets["tiny"],
                               la.SamplingParams(temperature=0, max_tokens=10))
    assert [results[i] for i in kept] == [w.text for w in wants]
    key = "lmarith_requests_total{endpoint=completions,outcome=disconnected}"
    after = poll(lambda: metrics(http), lambda s: idle(s) and s.get(key, 0) - before.get(key, 0) >= 10)
    assert idle(after), after
    assert after[key] - before.get(key, 0) == 10
    generated = after["lmarith_generated_tokens_total"] - before["lmarith_generated_tokens_total"]
    kept_tokens = sum(len(w.token_ids) for w in wants)
    # had the dropped requests run on, they alone would have made 15 * 200 tokens
    assert kept_tokens <= generated < kept_tokens + 10 * 100
    assert after["lmarith_request_latency_seconds_count{endpoint=completions}"] > before.get(
        "lmarith_request_latency_seconds_count{endpoint=completions}", 0)


async def _abandon_whole_request(url: str, body: dict, http_metrics) -> None:
    """Send a non-streamed request, and cancel it (closing its connection) once it runs."""
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        task = asyncio.ensure_future(client.post(C, json=body))
        for _ in range(600):
            await asyncio.sleep(0.05)
            if (await asyncio.to_thread(http_metrics))["lmarith_requests_running"] >= 1:
                break
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def test_non_streamed_request_is_cancelled_when_the_client_leaves(server_url, http):
    before = metrics(http)
    body = {"model": "tiny", "prompt": "Hi", "max_tokens": 1000, "temperature": 0, "ignore_eos": True}
    asyncio.run(_abandon_whole_request(server_url, body, lambda: metrics(http)))
    after = poll(lambda: metrics(http), idle)
    assert idle(after), after
    generated = after["lmarith_generated_tokens_total"] - before["lmarith_generated_tokens_total"]
    assert generated < 1000
    assert http.post(C, json=GOOD).status_code == 200
