"""Speed of f32_linear (csrc/f32_matmul.cpp) against the oneDNN-packed float32 linear the
engine used before it and torch's F.linear, and of the three float32 engines end to end.
Every variant is timed in this one run, alternated, medians reported; GB/s counts the weight
bytes the calls read.

    OMP_WAIT_POLICY=passive python benchmarks/bench_f32.py [--rows 1 3 16 64 512] [--repeats 5]
        (one decode step's projections: 30 layers of SmolLM2-135M + the head, each layer its
        own weights, so every call streams its weight from DRAM as decode does)
    OMP_WAIT_POLICY=passive python benchmarks/bench_f32.py --engine [--batches 1 16] [--tokens 32]
        (the embedded SmolLM2-135M in float32: oneDNN-packed linears in the Python layer loop,
        F32Linear in the loop, F32Linear in the native C++ stack layer by layer
        (LMARITH_STACK_TEAM=0), and the stack as one thread team per decode step)
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from lmarith.bindings import ops
from lmarith.models import native_stack
from lmarith.models.packed_linear import PackedLinear, packing_available
from lmarith.worker import model_runner

from bench_bf16 import seconds_per_call   # a sibling script: benchmarks/ is on sys.path

LAYER = [(960, 576), (576, 576), (3072, 576), (576, 1536)]   # (N, K): qkv, o, gate_up, down
HEAD = (49152, 576)
TEAM_ENV = "LMARITH_STACK_TEAM"   # csrc/decoder_stack.cpp: "0" runs decode steps layer by layer


def step_calls(rows: int, layers: int = 30) -> dict[str, Callable[[], object]]:
    """name -> one decode step's projections in order, each layer with its own weights."""
    shapes = LAYER * layers + [HEAD]
    weights = [torch.randn(n, k) * 0.05 for n, k in shapes]
    x = {k: torch.randn(rows, k) for k in (576, 1536)}
    ours = [(ops.prepared_f32_linear(ops.pack_f32(w)), w.shape[1]) for w in weights]
    found = {"f32_linear": lambda: [call(x[k]) for call, k in ours],
             "torch F.linear": lambda: [F.linear(x[w.shape[1]], w) for w in weights]}
    if packing_available():
        packed = []
        for w in weights:
            linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
            linear.weight.data = w
            packed.append((PackedLinear(linear, batch_hint=16), w.shape[1]))
        found["oneDNN packed"] = lambda: [layer(x[k]) for layer, k in packed]
    return found


def kernel_table(rows_list: list[int], repeats: int) -> None:
    """ms per decode step's projections, GB/s of weights, ratio to oneDNN (else F.linear)."""
    weight_bytes = 4 * sum(n * k for n, k in LAYER * 30 + [HEAD])
    print("| M | variant | ms/step | GB/s | vs oneDNN packed |")
    print("|---|---|---|---|---|")
    for rows in rows_list:
        found = step_calls(rows)
        samples: dict[str, list[float]] = {name: [] for name in found}
        for _ in range(repeats):
            for name, call in found.items():
                samples[name].append(seconds_per_call(call, 2))
        base = statistics.median(samples.get("oneDNN packed", samples["torch F.linear"]))
        for name, values in samples.items():
            seconds = statistics.median(values)
            print(f"| {rows} | {name} | {seconds * 1e3:.2f} | {weight_bytes / seconds / 1e9:.1f} | "
                  f"{base / seconds:.2f}x |", flush=True)


@contextlib.contextmanager
def float32_path(packed_linears: bool, stack: bool) -> Iterator[None]:
    """Engines started inside the block get F32Linear (else oneDNN-packed) linears and the
    native stack (else the Python layer loop)."""
    saved_linears, saved_env = model_runner.use_f32_linears, os.environ.get(native_stack.ENV)
    if not packed_linears:
        model_runner.use_f32_linears = lambda model: 0
    os.environ[native_stack.ENV] = "1" if stack else "0"
    try:
        yield
    finally:
        model_runner.use_f32_linears = saved_linears
        os.environ.pop(native_stack.ENV, None) if saved_env is None else os.environ.update(
            {native_stack.ENV: saved_env})


def engine_table(batches: list[int], tokens: int, repeats: int) -> None:
    """Decode ms/step and tok/s of the four float32 variants, alternated, medians, ratios."""
    import lmarith as la
    from lmarith.embedded import embedded_model

    model = embedded_model("float32")
    engines = {}
    for name, packed, stack in (("oneDNN packed, Python loop", False, False),
                                ("F32Linear, Python loop", True, False),
                                ("F32Linear, native stack", True, True)):
        with float32_path(packed, stack):
            engines[name] = la.LLM(kv_cache_bytes=1 << 28, models=[model])
    variants = {"oneDNN packed, Python loop": (engines["oneDNN packed, Python loop"], "1"),
                "F32Linear, Python loop": (engines["F32Linear, Python loop"], "1"),
                "native stack, no team": (engines["F32Linear, native stack"], "0"),
                "native stack, team": (engines["F32Linear, native stack"], "1")}
    print("| batch | engine | ms/step | tok/s | vs oneDNN loop |")
    print("|---|---|---|---|---|")
    for batch in batches:
        params = la.SamplingParams(temperature=0, max_tokens=tokens + 1, ignore_eos=True)
        samples: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(repeats + 1):                       # the first round warms up
            for name, (llm, team) in variants.items():
                os.environ[TEAM_ENV] = team
                outputs = llm.generate(["Tell me about cats."] * batch, model, params)
                samples[name].append(max(o.metrics.decode_time for o in outputs) / tokens)
        base = statistics.median(samples["oneDNN packed, Python loop"][1:])
        for name, values in samples.items():
            seconds = statistics.median(values[1:])
            print(f"| {batch} | {name} | {seconds * 1e3:.1f} | {batch / seconds:.1f} | "
                  f"{base / seconds:.2f}x |", flush=True)
    os.environ.pop(TEAM_ENV, None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 3, 16, 64])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--engine", action="store_true", help="end to end instead of kernels")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    print(f"threads={torch.get_num_threads()}", flush=True)
    if args.engine:
        engine_table(args.batches, args.tokens, args.repeats)
    else:
        kernel_table(args.rows, args.repeats)


if __name__ == "__main__":
    main()
