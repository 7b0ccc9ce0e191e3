"""Serving overhead: N concurrent streaming clients against the OpenAI-compatible server on
the embedded SmolLM2-135M-Instruct, against the same load through the Python API
(`LLM.astream` under asyncio.gather), for a single model and a 3-term formula. Every request
generates exactly --tokens tokens (greedy, ignore_eos). Server and API runs alternate, in one
run; printed as a markdown table with the server/API ratio of tokens/s.

    OMP_WAIT_POLICY=passive python benchmarks/bench_serve.py [--tokens 32] [--clients 1 8 32]
        [--rounds 2] [--repeats 2] [--formulas single three]

The server runs in a subprocess (as deployed: uvicorn, its own engine), on 127.0.0.1; the
API runs in this process on an LLM with the same settings. Only one side is busy at a time.
TTFT: request sent -> first text; ITL: gaps between later text chunks (as a client sees them).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx  # noqa: E402
from tqdm import tqdm  # noqa: E402

import lmarith as la  # noqa: E402
from lmarith.embedded import embedded_model  # noqa: E402

LLM_SETTINGS = dict(kv_cache_bytes=1 << 30, max_num_seqs=64)
SYSTEMS = ["You are a helpful assistant.", "You answer briefly.", "You love poetry."]
PROMPTS = ["Tell me about cats.", "What is the capital of France?", "Write a haiku about rain.",
           "Explain gravity to a child."]


def presets(model: la.Model) -> dict[str, la.Formula]:
    """single: the bare model; three: a linear mix of three system-prompted variants."""
    a, b, c = (model.prompt(system) for system in SYSTEMS)
    return {"single": model, "three": a + 0.25 * b + 0.25 * c}


@dataclass
class Run:
    """One load: wall time, tokens, and per-request latencies (seconds)."""

    wall: float = 0.0
    requests: int = 0
    tokens: int = 0
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)

    def add(self, start: float, stamps: list[float], tokens: int) -> None:
        self.requests += 1
        self.tokens += tokens
        if stamps:
            self.ttft.append(stamps[0] - start)
            self.itl.extend(b - a for a, b in zip(stamps, stamps[1:]))


async def api_client(llm: la.LLM, formula: la.Formula, client: int, args, run: Run) -> None:
    params = la.SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    for r in range(args.rounds):
        start, stamps, tokens = time.perf_counter(), [], 0
        async for chunk in llm.astream(PROMPTS[(client + r) % len(PROMPTS)], formula, params):
            tokens += len(chunk.token_ids)
            if chunk.text:
                stamps.append(time.perf_counter())
        run.add(start, stamps, tokens)


async def http_client(http: httpx.AsyncClient, preset: str, client: int, args, run: Run) -> None:
    for r in range(args.rounds):
        body = {"model": preset, "prompt": PROMPTS[(client + r) % len(PROMPTS)], "stream": True,
                "max_tokens": args.tokens, "temperature": 0, "ignore_eos": True,
                "stream_options": {"include_usage": True}}
        start, stamps, tokens = time.perf_counter(), [], 0
        async with http.stream("POST", "/v1/completions", json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
                elif event["choices"] and event["choices"][0]["text"]:
                    stamps.append(time.perf_counter())
        run.add(start, stamps, tokens)


async def load(clients: int, make_client) -> Run:
    run = Run()
    start = time.perf_counter()
    await asyncio.gather(*(make_client(i, run) for i in range(clients)))
    run.wall = time.perf_counter() - start
    return run


async def measure_api(llm, formula, clients: int, args) -> Run:
    return await load(clients, lambda i, run: api_client(llm, formula, i, args, run))


async def measure_server(url: str, preset: str, clients: int, args) -> Run:
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        return await load(clients, lambda i, run: http_client(http, preset, i, args, run))


def percentiles(values: list[float]) -> str:
    if len(values) < 2:
        return "-"
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return "/".join(f"{cuts[p - 1] * 1e3:.0f}" for p in (50, 90, 99))


def report(rows: list[tuple[str, int, str, Run, Optional[float]]]) -> None:
    print("| formula | clients | path | req/s | tok/s | TTFT p50/p90/p99 ms | ITL p50/p90/p99 ms "
          "| tok/s server/API |")
    print("|---|---|---|---|---|---|---|---|")
    for preset, clients, path, run, ratio in rows:
        shown = f"{ratio:.3f} ({(1 - ratio) * 100:+.1f}% overhead)" if ratio is not None else ""
        print(f"| {preset} | {clients} | {path} | {run.requests / run.wall:.2f} | "
              f"{run.tokens / run.wall:.1f} | {percentiles(run.ttft)} | {percentiles(run.itl)} | "
              f"{shown} |", flush=True)


def merge(runs: list[Run]) -> Run:
    """The runs of one cell pooled: total tokens over total wall time, every latency."""
    merged = Run(sum(r.wall for r in runs), sum(r.requests for r in runs), sum(r.tokens for r in runs))
    for run in runs:
        merged.ttft += run.ttft
        merged.itl += run.itl
    return merged


def start_server(port: int) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, __file__, "--serve", str(port)])
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.2)
    raise SystemExit("the server did not start")


def serve(port: int) -> None:
    """The --serve mode: the server process."""
    from lmarith.entrypoints.openai.server import run_server

    model = embedded_model("float32")
    llm = la.LLM(**LLM_SETTINGS, models=[model])
    run_server(llm, {"smollm2": model}, presets(model), "127.0.0.1", port, log_level="warning")


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=32, help="tokens per request")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=2, help="requests per client, one after another")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs per cell (pooled)")
    parser.add_argument("--formulas", nargs="+", default=["single", "three"], choices=["single", "three"])
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        return serve(args.serve)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = start_server(port)
    try:
        rows = bench(args, f"http://127.0.0.1:{port}")
    finally:
        server.terminate()
        server.wait(timeout=30)
    report(rows)


def bench(args, url: str) -> list:
    model = embedded_model("float32")
    llm = la.LLM(**LLM_SETTINGS, models=[model])
    formulas = {name: f for name, f in presets(model).items() if name in args.formulas}
    warm = argparse.Namespace(**{**vars(args), "rounds": 1, "tokens": 4})
    for preset in formulas:        # warm-up: load, first forwards, prefix cache on both sides
        asyncio.run(measure_api(llm, formulas[preset], 4, warm))
        asyncio.run(measure_server(url, preset, 4, warm))
    rows = []
    cells = [(p, c) for p in formulas for c in args.clients]
    with tqdm(total=len(cells) * args.repeats * 2, desc="bench_serve", unit="run",
              disable=not sys.stderr.isatty()) as bar:
        for preset, clients in cells:
            api_runs, server_runs = [], []
            for repeat in range(args.repeats):
                bar.set_postfix_str(f"{preset}, {clients} clients")
                sides = [(api_runs, measure_api(llm, formulas[preset], clients, args)),
                         (server_runs, measure_server(url, preset, clients, args))]
                for runs, work in sides if repeat % 2 == 0 else sides[::-1]:   # alternate the order
                    runs.append(asyncio.run(work))
                    bar.update()
            api, server = merge(api_runs), merge(server_runs)
            rows.append((preset, clients, "Python API", api, None))
            rows.append((preset, clients, "HTTP server", server,
                         (server.tokens / server.wall) / (api.tokens / api.wall)))
    llm.close()
    return rows


if __name__ == "__main__":
    main()
