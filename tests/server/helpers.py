"""Small helpers of the server tests: what the Python API answers for a request, and the
server's /metrics read into a dict."""
from __future__ import annotations

import time
from typing import Callable

from prometheus_client.parser import text_string_to_metric_families

GREEDY = dict(temperature=0.0, max_tokens=12)


def expect(llm, prompt, formula, **params):
    """The RequestOutput the Python API gives for one prompt (a str or a conversation)."""
    import lmarith as la

    return llm.generate([prompt], formula, la.SamplingParams(**params))[0]


def metrics(http) -> dict[str, float]:
    """Every sample of GET /metrics as {"name{label=value,...}": value}."""
    response = http.get("/metrics")
    assert response.status_code == 200, response.text
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def poll(read: Callable[[], dict], done: Callable[[dict], bool], seconds: float = 30) -> dict:
    """Read until done(value) holds (or the time is up); returns the last value read."""
    deadline = time.monotonic() + seconds
    value = read()
    while not done(value) and time.monotonic() < deadline:
        time.sleep(0.05)
        value = read()
    return value


def idle(samples: dict) -> bool:
    """Nothing running or waiting, every KV page free."""
    return (samples["lmarith_requests_running"] == 0 and samples["lmarith_requests_waiting"] == 0
            and samples["lmarith_kv_pages_free"] == samples["lmarith_kv_pages_total"])


def error_of(response) -> dict:
    """The OpenAI error object of a response, checked to have exactly its four fields."""
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"], body
    return body["error"]
