"""Apps built in this process (httpx's ASGI transport, no sockets) on the in-process LLM: the
API key, an engine failure answered as a 500 (before and after a stream started) while the
same engine keeps serving, and several apps with their own metrics in one process."""
from __future__ import annotations

import asyncio

import httpx
import pytest

import lmarith as la
from lmarith.entrypoints.openai.server import build_app
from server.helpers import GREEDY, error_of, expect

BODY = {"model": "tiny", "prompt": "The cat", "max_tokens": 4, "temperature": 0}


def call(app, method: str, path: str, **kwargs) -> httpx.Response:
    async def go():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            return await client.request(method, path, **kwargs)
    return asyncio.run(go())


@pytest.fixture(scope="module")
def keyed_app(local_llm, setup):
    return build_app(local_llm, *setup, api_key="sekret")


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"},
                                     {"Authorization": "Basic sekret"}])
def test_api_key_is_required_on_v1(keyed_app, headers):
    for method, path, kwargs in [("GET", "/v1/models", {}), ("POST", "/v1/completions", {"json": BODY}),
                                 ("POST", "/v1/chat/completions", {"json": {"bad": 1}})]:
        response = call(keyed_app, method, path, headers=headers, **kwargs)
        assert response.status_code == 401, (path, response.text)
        assert error_of(response)["code"] == "invalid_api_key"


def test_api_key_accepted_and_health_open(keyed_app, local_llm, setup):
    _, presets = setup
    key = {"Authorization": "Bearer sekret"}
    assert call(keyed_app, "GET", "/health").json() == {"status": "ok"}
    assert call(keyed_app, "GET", "/metrics").status_code == 200
    assert call(keyed_app, "GET", "/v1/models", headers=key).status_code == 200
    response = call(keyed_app, "POST", "/v1/completions", headers=key, json=BODY)
    assert response.status_code == 200
    want = expect(local_llm, "The cat", presets["tiny"], temperature=0, max_tokens=4)
    assert response.json()["choices"][0]["text"] == want.text


class Faulty:
    """An LLM whose requests fail with `error` (the stream after one chunk); stats() works."""

    def __init__(self, llm, error: BaseException) -> None:
        self.llm, self.error = llm, error

    def stats(self):
        return self.llm.stats()

    async def agenerate(self, prompts, formula, params):
        raise self.error

    async def astream(self, prompt, formula, params):
        yield la.StreamChunk("a", [5])
        raise self.error


@pytest.mark.parametrize("error, status, code", [
    (la.EngineError("step failed"), 500, "engine_error"),
    (RuntimeError("a bug"), 500, "internal_error"),
    (la.RequestAbortedError("the LLM was closed"), 503, "request_aborted")])
def test_engine_failure_is_a_5xx_and_the_engine_keeps_serving(local_llm, setup, error, status, code):
    broken = build_app(Faulty(local_llm, error), *setup)
    response = call(broken, "POST", "/v1/completions", json=BODY)
    assert response.status_code == status
    assert error_of(response)["type"] == "server_error" and error_of(response)["code"] == code
    streamed = call(broken, "POST", "/v1/completions", json={**BODY, "stream": True})
    assert streamed.status_code == 200                     # the status line was already sent
    events = streamed.text.split("\n\n")
    assert events[0].startswith('data: {"id"') and '"error"' in events[1] and events[2] == "data: [DONE]"
    good = call(build_app(local_llm, *setup), "POST", "/v1/completions", json=BODY)
    assert good.status_code == 200


def test_apps_have_their_own_metrics(local_llm, setup):
    first, second = build_app(local_llm, *setup), build_app(local_llm, *setup)
    chat = {"model": "chat", "messages": [{"role": "user", "content": "Hi"}], **GREEDY}
    assert call(first, "POST", "/v1/chat/completions", json=chat).status_code == 200
    text_first, text_second = call(first, "GET", "/metrics").text, call(second, "GET", "/metrics").text
    line = 'lmarith_request_latency_seconds_count{endpoint="chat_completions"} 1.0'
    assert line in text_first and line not in text_second
    assert "lmarith_forward_calls_total{model=\"tiny\"}" in text_first


def test_unknown_fields_are_ignored(local_llm, setup):
    response = call(build_app(local_llm, *setup), "POST", "/v1/completions",
                    json={**BODY, "store": True, "metadata": {"a": "b"}})
    assert response.status_code == 200
