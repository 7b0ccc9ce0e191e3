"""Measures what replicas behind Ray Serve cost on the tiny test models (not a test; numbers for
the docs): Ray's start, the replicas' start, one request's latency through Serve's proxy vs the
plain server (alternating, one request at a time), a concurrent burst, and how long Serve takes
to replace a killed replica.

    python benchmarks/bench_ray_serve.py [--replicas 2] [--requests 40] [--max-tokens 1,32]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"    # the server tests' tiny models
sys.path[:0] = [str(TESTS / "server"), str(TESTS)]
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["OMP_WAIT_POLICY"] = "passive"

import httpx  # noqa: E402

from conftest import CHAT_TEMPLATE, LAUNCHER, free_port, wait_healthy  # noqa: E402
from launch_openai_server import LLM_SETTINGS, build  # noqa: E402


def model_dirs(root: Path) -> list[Path]:
    """The three tiny models of tests/server (same builders, same seeds)."""
    from builders import make_model, make_tokenizer

    tokenizer = make_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return [make_model(root / "a", "llama", seed=1, tokenizer=tokenizer, max_position_embeddings=1024),
            make_model(root / "b", "llama", seed=2, tokenizer=tokenizer, max_position_embeddings=1024),
            make_model(root / "plain", "llama", seed=3, max_position_embeddings=1024)]


def body(max_tokens: int, prompt: str = "The cat sat") -> dict:
    return {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True}


def alternate(urls: dict[str, str], max_tokens: int, requests: int) -> dict[str, list[float]]:
    """Seconds per request for each URL, taking turns so both see the same machine."""
    seconds: dict[str, list[float]] = {name: [] for name in urls}
    clients = {name: httpx.Client(base_url=url, timeout=60) for name, url in urls.items()}
    for round_ in range(requests + 3):
        for name, client in clients.items():
            start = time.perf_counter()
            response = client.post("/v1/completions", json=body(max_tokens))
            elapsed = time.perf_counter() - start
            assert response.status_code == 200, response.text
            if round_ >= 3:                                     # three warm-up rounds
                seconds[name].append(elapsed)
    for client in clients.values():
        client.close()
    return seconds


async def burst(url: str, count: int, max_tokens: int) -> float:
    """Wall seconds for `count` concurrent requests."""
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        start = time.perf_counter()
        responses = await asyncio.gather(*(client.post("/v1/completions", json=body(max_tokens))
                                           for _ in range(count)))
        assert all(r.status_code == 200 for r in responses)
        return time.perf_counter() - start


def replacement_seconds(ray, serve) -> float:
    """Kill one replica; seconds until Serve runs a new one in its place."""
    from lmarith.entrypoints.ray_serve import APP_NAME

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith("SERVE_REPLICA::")]
    start = time.perf_counter()
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
    while True:
        live = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith("SERVE_REPLICA::")}
        states = serve.status().applications[APP_NAME].deployments["LmarithReplica"].replica_states
        if names[0] not in live and len(live) == len(names) and set(states) == {"RUNNING"}:
            return time.perf_counter() - start
        time.sleep(0.1)


def summary(values: list[float]) -> str:
    ordered = sorted(values)
    p90 = ordered[int(0.9 * (len(ordered) - 1))]
    return f"median {1000 * statistics.median(values):.1f} ms, p90 {1000 * p90:.1f} ms"


def start_direct(dirs: list[Path], log: Path) -> tuple[subprocess.Popen, str]:
    """The plain server (`lmarith serve` as tests/server runs it), one thread like a replica."""
    port = free_port()
    with open(log, "wb") as sink:
        process = subprocess.Popen([sys.executable, str(LAUNCHER), str(port), *map(str, dirs)],
                                   stdout=sink, stderr=subprocess.STDOUT,
                                   env={**os.environ, "OMP_NUM_THREADS": "1"})   # as a replica
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, process, log)
    return process, url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--max-tokens", default="1,32")
    args = parser.parse_args()
    import ray
    from ray import serve

    from lmarith.entrypoints.ray_serve import build_deployment, deploy

    root = Path(tempfile.mkdtemp(prefix="ray_measure_"))
    dirs = model_dirs(root)
    start = time.perf_counter()
    process, direct = start_direct(dirs, root / "server.log")
    print(f"plain server process healthy: {time.perf_counter() - start:.1f} s")
    try:
        start = time.perf_counter()
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
        print(f"ray.init: {time.perf_counter() - start:.1f} s")
        models, presets = build(*dirs)
        app = build_deployment(models, presets, replicas=args.replicas, num_threads=1,
                               **LLM_SETTINGS, deployment_options={"health_check_period_s": 1})
        start = time.perf_counter()
        url = deploy(app, port=free_port())
        print(f"serve.start + {args.replicas} replicas ready: {time.perf_counter() - start:.1f} s")
        for max_tokens in map(int, args.max_tokens.split(",")):
            seconds = alternate({"direct": direct, "serve": url}, max_tokens, args.requests)
            for name, values in seconds.items():
                print(f"{max_tokens} tokens, one at a time, {name}: {summary(values)}")
            for name, target in (("direct", direct), ("serve", url)):
                print(f"16 concurrent x {max_tokens} tokens, {name}: "
                      f"{asyncio.run(burst(target, 16, max_tokens)):.2f} s")
        print(f"replica killed -> replacement running: {replacement_seconds(ray, serve):.1f} s")
    finally:
        serve.shutdown()
        ray.shutdown()
        process.terminate()
        process.wait(timeout=20)


if __name__ == "__main__":
    main()
