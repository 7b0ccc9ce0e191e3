"""Replicas behind Ray Serve: a local Ray instance (module fixture) runs two replicas of the
tiny models of tests/server, each with its own LLM, behind Serve's HTTP proxy. Answers through
the proxy equal the Python API's in this process; killing a replica mid-load fails only the
requests it held (promptly, with a 5xx or a cut stream), the other keeps answering, and the
replacement Serve starts serves too. A second app's replica shards its models over two ranks
(tensor parallel) and answers the same. Without ray, a clear error names the extra."""
from __future__ import annotations

import asyncio
import json
import socket
import sys
import time

import httpx
import pytest

import lmarith as la
from lmarith.entrypoints import ray_serve
from lmarith.errors import ConfigError, LmarithError
from server.helpers import expect, metrics
from server.launch_openai_server import LLM_SETTINGS

CLIENT_TIMEOUT = 30
PROMPTS = ["The cat sat", "Once upon a time", "Tell me about dogs", "Paris is", "The robot",
           "You are", "The dog ran in", "Fish and birds"]
LONG = dict(temperature=0.0, max_tokens=300, ignore_eos=True)
pytestmark = pytest.mark.filterwarnings("ignore:Using extra keyword arguments on `Field`")


def replica_of(response: httpx.Response) -> str:
    """The Serve replica id the x-lmarith-replica header names."""
    return response.headers["x-lmarith-replica"].split()[0]


def completion(preset: str, prompt: str, **params) -> dict:
    return {"model": preset, "prompt": prompt, **{"temperature": 0.0, "max_tokens": 12, **params}}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def replica_names(ray, app: str = ray_serve.APP_NAME) -> dict[str, str]:
    """{replica id: actor name} of the app's live Serve replicas."""
    return {actor["name"].rsplit("#", 1)[1]: actor["name"]
            for actor in ray.util.list_named_actors(all_namespaces=True)
            if actor["name"].startswith(f"SERVE_REPLICA::{app}#")}


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module")
def ray_url(setup, monkeypatch_module):
    """Two replicas on a fresh local Ray instance; yields Serve's base URL, then shuts down."""
    ray = pytest.importorskip("ray")
    from ray import serve

    models, presets = setup
    monkeypatch_module.setenv("OMP_WAIT_POLICY", "passive")     # the replicas inherit it
    monkeypatch_module.setenv("RAY_USAGE_STATS_ENABLED", "0")   # no reports to the network
    ray.init(address="local", num_cpus=6, include_dashboard=False, log_to_driver=False)
    try:
        app = ray_serve.build_deployment(
            models, presets, replicas=2, num_threads=1, **LLM_SETTINGS,
            deployment_options={"health_check_period_s": 1, "health_check_timeout_s": 10})
        yield ray_serve.deploy(app, port=free_port())
    finally:
        serve.shutdown()
        ray.shutdown()


def test_without_ray_a_clear_error(monkeypatch, setup):
    models, _ = setup
    monkeypatch.setitem(sys.modules, "ray", None)        # import ray now raises ImportError
    with pytest.raises(ray_serve.RayNotInstalledError, match=r'pip install "lmarith\[ray\]"') as info:
        ray_serve.build_deployment(models, replicas=2)
    assert isinstance(info.value, LmarithError) and isinstance(info.value, ImportError)


@pytest.mark.parametrize("settings", [dict(replicas=0), dict(tensor_parallel_size=0),
                                      dict(replicas=1.5)])
def test_bad_settings_refused_before_ray(setup, settings):
    models, _ = setup
    with pytest.raises(ConfigError):
        ray_serve.build_deployment(models, **settings)
    with pytest.raises(ConfigError):
        ray_serve.build_deployment({})


def test_llm_and_actor_options():
    one = ray_serve.llm_kwargs(None, 8, None, "cpu", 1)
    assert one == {"max_num_seqs": 8, "device": "cpu"}                 # LLM's defaults kept
    four = ray_serve.llm_kwargs(1 << 20, 8, 2, "cuda", 4)
    assert four == {"max_num_seqs": 8, "device": "cuda", "kv_cache_bytes": 1 << 20,
                    "num_threads": 2, "tensor_parallel_size": 4}
    assert ray_serve.actor_options("cpu", None, 1, None) == {"num_cpus": 1}
    assert ray_serve.actor_options("cuda", 2, 4, None) == {"num_cpus": 8, "num_gpus": 4}
    assert ray_serve.actor_options("cpu", 2, 1, {"num_cpus": 0.5}) == {"num_cpus": 0.5}


def test_cli_ray_replicas_hands_over_to_ray(monkeypatch, model_dirs):
    from lmarith.entrypoints import cli

    calls = []
    monkeypatch.setattr(ray_serve, "run_ray_server", lambda *args, **kw: calls.append((args, kw)))
    status = cli.main(["serve", "--ray-replicas", "3", "--port", "8123", "--model",
                       f"a={model_dirs[0]}", "--kv-cache-bytes", "8M", "--max-num-seqs", "4"])
    assert status == 0
    [(args, kwargs)] = calls
    a = la.Model(str(model_dirs[0]))
    assert args == ({"a": a}, {"a": a}, "127.0.0.1", 8123, 3, None)
    assert kwargs.pop("tensor_parallel_size", 1) == 1        # the engine flags' default
    assert kwargs.pop("kv_cache_dtype", "auto") == "auto"
    assert kwargs == {"kv_cache_bytes": 8 << 20, "max_num_seqs": 4, "device": "cpu"}


def test_routes_and_metrics_through_the_proxy(ray_url, setup):
    _, presets = setup
    with httpx.Client(base_url=ray_url, timeout=CLIENT_TIMEOUT) as http:
        assert http.get("/health").json() == {"status": "ok"}
        listing = http.get("/v1/models").json()
        assert [card["id"] for card in listing["data"]] == list(presets)
        samples = metrics(http)
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting",
                 "vllm:kv_cache_usage_perc", "lmarith_requests_running"):
        assert name in samples, name
    assert samples["lmarith_kv_pages_total"] == 128        # each replica has launcher's budget


async def _complete_all(url: str, bodies: list[dict], path: str = "/v1/completions"):
    async with httpx.AsyncClient(base_url=url, timeout=CLIENT_TIMEOUT) as client:
        return await asyncio.gather(*(client.post(path, json=body) for body in bodies))


def test_two_replicas_answer_concurrent_requests_like_the_python_api(ray_url, local_llm, setup):
    _, presets = setup
    cases = [(preset, prompt) for preset in ("tiny", "mix") for prompt in PROMPTS]
    responses = asyncio.run(_complete_all(ray_url, [completion(*case) for case in cases]))
    for (preset, prompt), response in zip(cases, responses):
        assert response.status_code == 200, response.text
        want = expect(local_llm, prompt, presets[preset], temperature=0.0, max_tokens=12)
        assert response.json()["choices"][0]["text"] == want.text, (preset, prompt)
    assert len({replica_of(r) for r in responses}) == 2, "one replica got every request"


def test_chat_and_stream_through_the_proxy(ray_url, local_llm, setup):
    _, presets = setup
    chat = [{"role": "user", "content": "Tell me about cats."}]
    with httpx.Client(base_url=ray_url, timeout=CLIENT_TIMEOUT) as http:
        response = http.post("/v1/chat/completions", json={"model": "chat", "messages": chat,
                                                           "temperature": 0, "max_tokens": 12})
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] == \
            expect(local_llm, chat, presets["chat"], temperature=0.0, max_tokens=12).text
        with http.stream("POST", "/v1/completions",
                         json=completion("mix", "Once upon a time", stream=True)) as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            events = [line[len("data: "):] for line in stream.iter_lines() if line]
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(event)["choices"][0]["text"] for event in events[:-1])
    assert text == expect(local_llm, "Once upon a time", presets["mix"], temperature=0.0,
                          max_tokens=12).text


def test_a_tensor_parallel_replica(ray_url, local_llm, setup):
    """A second app whose replica shards every model over 2 ranks answers like one process."""
    from ray import serve

    models, presets = setup
    app = ray_serve.build_deployment(models, presets, replicas=1, tensor_parallel_size=2,
                                     num_threads=1, **LLM_SETTINGS)
    try:
        url = ray_serve.deploy(app, port=httpx.URL(ray_url).port, name="lmarith-tp",
                               route_prefix="/tp")
        assert url == f"{ray_url}/tp"
        responses = asyncio.run(_complete_all(url, [completion("mix", p) for p in PROMPTS[:4]]))
    finally:
        serve.delete("lmarith-tp")
    for prompt, response in zip(PROMPTS, responses):
        assert response.status_code == 200, response.text
        want = expect(local_llm, prompt, presets["mix"], temperature=0.0, max_tokens=12)
        assert response.json()["choices"][0]["text"] == want.text, prompt


async def _stream(client: httpx.AsyncClient, outcome: dict, started: asyncio.Event) -> None:
    """One long stream, written into outcome as it goes: its replica (from the headers), its
    text, whether it reached [DONE], or how it failed. started is set at the first chunk."""
    begin = time.monotonic()
    try:
        body = completion("tiny", outcome["prompt"], stream=True, **LONG)
        async with client.stream("POST", "/v1/completions", json=body) as response:
            outcome.update(status=response.status_code, replica=replica_of(response))
            async for line in response.aiter_lines():
                if line == "data: [DONE]":
                    outcome["done"] = True
                elif line.startswith("data: "):
                    outcome["text"] += json.loads(line[len("data: "):])["choices"][0]["text"]
                    started.set()
    except httpx.TimeoutException as error:
        outcome["hung"] = repr(error)
    except httpx.TransportError as error:              # the connection was cut: a clear failure
        outcome["error"] = repr(error)
    finally:
        outcome["seconds"] = time.monotonic() - begin
        started.set()


async def _whole(client: httpx.AsyncClient, prompt: str) -> dict:
    """One long non-streamed request: its status, and its replica and text when it worked."""
    begin = time.monotonic()
    try:
        response = await client.post("/v1/completions", json=completion("tiny", prompt, **LONG))
    except httpx.TimeoutException as error:
        return {"prompt": prompt, "hung": repr(error)}
    outcome = {"prompt": prompt, "status": response.status_code,
               "seconds": time.monotonic() - begin}
    if response.status_code == 200:
        outcome.update(replica=replica_of(response), text=response.json()["choices"][0]["text"])
    return outcome


async def _kill_mid_load(url: str, ray) -> tuple[str, list[dict], list[dict]]:
    """Six long streams and four long whole requests; once every stream has its first chunk,
    kill the replica of the first stream. Returns (its id, the streams, the whole requests)."""
    streams = [{"prompt": prompt, "text": "", "done": False} for prompt in PROMPTS[:6]]
    events = [asyncio.Event() for _ in streams]
    async with httpx.AsyncClient(base_url=url, timeout=CLIENT_TIMEOUT) as client:
        tasks = [asyncio.ensure_future(_stream(client, s, e)) for s, e in zip(streams, events)]
        wholes = [asyncio.ensure_future(_whole(client, PROMPTS[6 + i % 2])) for i in range(4)]
        await asyncio.wait_for(asyncio.gather(*(event.wait() for event in events)), CLIENT_TIMEOUT)
        assert not any(task.done() for task in tasks), f"a stream ended before the kill: {streams}"
        victim = streams[0]["replica"]
        ray.kill(ray.get_actor(replica_names(ray)[victim], namespace="serve"), no_restart=True)
        await asyncio.gather(*tasks)
        return victim, streams, await asyncio.gather(*wholes)


def _check_outcomes(victim: str, streams: list[dict], wholes: list[dict], local_llm, presets):
    """Streams on the victim were cut (no [DONE]); everything else has the Python API's text;
    whole requests either worked on the survivor or got a 5xx; nothing hung."""
    want = {p: expect(local_llm, p, presets["tiny"], **LONG).text for p in PROMPTS}
    assert not [o for o in streams + wholes if "hung" in o], "a request hung"
    for outcome in streams:
        if outcome.get("replica") == victim:
            assert not outcome["done"] and outcome["seconds"] < CLIENT_TIMEOUT, outcome
        else:
            assert outcome["done"] and outcome["text"] == want[outcome["prompt"]], outcome
    for outcome in wholes:
        if outcome["status"] == 200:
            assert outcome["replica"] != victim and outcome["text"] == want[outcome["prompt"]]
        else:
            assert outcome["status"] >= 500, outcome
    return want


def _wait_for_replacement(ray, serve, victim: str, seconds: float = 90) -> set[str]:
    """The ids of the live replicas once Serve has replaced the victim and both run."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        live = set(replica_names(ray))
        states = serve.status().applications[ray_serve.APP_NAME].deployments["LmarithReplica"]
        if len(live) == 2 and victim not in live and states.replica_states == {"RUNNING": 2}:
            return live
        time.sleep(0.5)
    raise AssertionError(f"no replacement replica after {seconds} s: {replica_names(ray)}")


def test_killing_a_replica_mid_load(ray_url, local_llm, setup):
    """Runs last: it leaves the deployment with a replaced replica."""
    import ray
    from ray import serve

    _, presets = setup
    survivors = set(replica_names(ray))
    victim, streams, wholes = asyncio.run(_kill_mid_load(ray_url, ray))
    survivors.discard(victim)
    want = _check_outcomes(victim, streams, wholes, local_llm, presets)
    assert sum(not s["done"] for s in streams) >= 1          # the kill did land mid-stream
    after = asyncio.run(_complete_all(ray_url, [completion("tiny", p, **LONG) for p in PROMPTS[:4]]))
    for prompt, response in zip(PROMPTS, after):             # the survivor answers meanwhile
        assert response.status_code == 200 and replica_of(response) != victim, response.text
        assert response.json()["choices"][0]["text"] == want[prompt]
    replacement = _wait_for_replacement(ray, serve, victim) - survivors
    seen = set()
    for _ in range(5):                                      # until the new one has answered
        again = asyncio.run(_complete_all(ray_url, [completion("tiny", p) for p in PROMPTS]))
        assert all(r.status_code == 200 for r in again), [r.text for r in again]
        seen |= {replica_of(r) for r in again}
        if replacement <= seen:
            break
    assert replacement <= seen and victim not in seen, (replacement, seen)
