"""Kernel-level speed of bf16_linear (csrc/bf16_matmul.cpp) on SmolLM2-135M's projection
shapes, against torch's bf16 F.linear and the oneDNN-packed float32 linear the engine used
for float32 models. Every variant is timed in this one run, alternated, medians reported;
GB/s counts the weight bytes one call reads (the whole traffic of a batch-1 decode GEMV).

    OMP_WAIT_POLICY=passive python benchmarks/bench_bf16.py [--rows 1 4 8] [--isa auto avx2]
        [--repeats 5] [--calls 200]
    OMP_WAIT_POLICY=passive python benchmarks/bench_bf16.py --sweep [--rows 1 4]
        (one decode step's projections, 30 layers of SmolLM2 + the head, weights cold from DRAM)
    OMP_WAIT_POLICY=passive python benchmarks/bench_bf16.py --engine [--batches 1 4] [--tokens 32]
        (end to end on the embedded SmolLM2-135M: float32 (F32Linear, native stack), bfloat16 with torch's
        linears, bfloat16 with BF16Linear; three engines alternated in one run)
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

from lmarith.bindings import cpp_bf16, ops
from lmarith.models.packed_linear import PackedLinear, packing_available
from lmarith.worker import model_runner

SHAPES = [(576, 576), (960, 576), (3072, 576), (576, 1536), (49152, 576)]   # (N, K)
LAYER = [(960, 576), (576, 576), (3072, 576), (576, 1536)]                   # qkv, o, gate_up, down


def seconds_per_call(call: Callable[[], object], calls: int) -> float:
    """Mean seconds of one call over `calls` back-to-back calls (after one warm-up)."""
    call()
    start = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - start) / calls


def prepared_on(isa: str, weight) -> Callable:
    """ops.prepared_bf16_linear on one forced instruction path (the variable is read when a
    call is prepared, then restored)."""
    os.environ[cpp_bf16.ISA_ENV] = isa
    try:
        return ops.prepared_bf16_linear(weight)
    finally:
        os.environ.pop(cpp_bf16.ISA_ENV, None)


def variants(n: int, k: int, rows: int, isas: list[str]) -> dict[str, tuple[Callable[[], object], int]]:
    """name -> (a call, weight bytes it reads) for one shape and batch."""
    w = torch.randn(n, k) * 0.05
    w16, x16 = w.bfloat16(), torch.randn(rows, k).bfloat16()
    found: dict[str, tuple[Callable[[], object], int]] = {}
    for isa in isas:
        call = prepared_on(isa, ops.pack_bf16(w16))
        found[f"bf16_linear {isa}"] = (lambda call=call: call(x16), 2 * n * k)
    found["torch bf16 F.linear"] = (lambda: F.linear(x16, w16), 2 * n * k)
    if packing_available():
        packed, x32 = PackedLinear(torch.nn.Linear(k, n, bias=False), batch_hint=16), x16.float()
        found["oneDNN fp32 packed"] = (lambda: packed(x32), 4 * n * k)
    return found


def sweep_calls(rows: int, isas: list[str], layers: int = 30
                ) -> dict[str, tuple[Callable[[], object], int]]:
    """name -> (one decode step's projections in order, its weight bytes), each layer its own
    weights, so (269 MB in bf16) every call streams its weight from DRAM as decode does; one
    bf16_linear variant per instruction path in isas."""
    shapes = LAYER * layers + [SHAPES[-1]]
    x16 = {k: torch.randn(rows, k).bfloat16() for k in (576, 1536)}
    x32 = {k: x.float() for k, x in x16.items()}
    packed16 = [(ops.pack_bf16((torch.randn(n, k) * 0.05).bfloat16()), k) for n, k in shapes]
    found = {}
    for isa in isas:
        ours = [(prepared_on(isa, weight), k) for weight, k in packed16]
        found[f"bf16_linear {isa}"] = (lambda ours=ours: [call(x16[k]) for call, k in ours], 2)
    theirs = [(torch.nn.Linear(k, n, bias=False).bfloat16(), k) for n, k in shapes]
    found["torch bf16 nn.Linear"] = (lambda: [layer(x16[k]) for layer, k in theirs], 2)
    if packing_available():
        packed = [(PackedLinear(torch.nn.Linear(k, n, bias=False), batch_hint=16), k) for n, k in shapes]
        found["oneDNN fp32 packed"] = (lambda: [layer(x32[k]) for layer, k in packed], 4)
    elements = sum(n * k for n, k in shapes)
    return {name: (call, size * elements) for name, (call, size) in found.items()}


def sweep_table(rows_list: list[int], repeats: int, isas: list[str]) -> None:
    """ms per decode step's projections, alternated, medians, GB/s and ratio to oneDNN fp32."""
    print("| M | variant | ms/step | GB/s | vs oneDNN fp32 |")
    print("|---|---|---|---|---|")
    for rows in rows_list:
        found = sweep_calls(rows, isas)
        samples: dict[str, list[float]] = {name: [] for name in found}
        for _ in range(repeats):
            for name, (call, _) in found.items():
                samples[name].append(seconds_per_call(call, 3))
        base = statistics.median(samples.get("oneDNN fp32 packed", samples[f"bf16_linear {isas[0]}"]))
        for name, values in samples.items():
            seconds = statistics.median(values)
            print(f"| {rows} | {name} | {seconds * 1e3:.2f} | {found[name][1] / seconds / 1e9:.1f} | "
                  f"{base / seconds:.2f}x |", flush=True)


@contextlib.contextmanager
def torch_bf16_linears() -> Iterator[None]:
    """Engines started inside the block keep bf16 models on torch's nn.Linear (the old path)."""
    saved = model_runner.use_bf16_linears
    model_runner.use_bf16_linears = lambda model: 0
    try:
        yield
    finally:
        model_runner.use_bf16_linears = saved


def engine_table(batches: list[int], tokens: int, repeats: int) -> None:
    """Decode ms/step and tok/s of the three engines, alternated, medians, ratios to float32."""
    import lmarith as la
    from lmarith.embedded import embedded_model

    fp32, bf16 = embedded_model("float32"), embedded_model("bfloat16")
    with torch_bf16_linears():
        old = la.LLM(kv_cache_bytes=1 << 28, models=[bf16])
    engines = {"float32": (la.LLM(kv_cache_bytes=1 << 28, models=[fp32]), fp32),
               "bfloat16 torch nn.Linear": (old, bf16),
               "bfloat16 BF16Linear": (la.LLM(kv_cache_bytes=1 << 28, models=[bf16]), bf16)}
    print("| batch | engine | ms/step | tok/s | vs float32 |")
    print("|---|---|---|---|---|")
    for batch in batches:
        params = la.SamplingParams(temperature=0, max_tokens=tokens + 1, ignore_eos=True)
        samples: dict[str, list[float]] = {name: [] for name in engines}
        for _ in range(repeats + 1):                       # the first round warms up
            for name, (llm, model) in engines.items():
                outputs = llm.generate(["Tell me about cats."] * batch, model, params)
                samples[name].append(max(o.metrics.decode_time for o in outputs) / tokens)
        base = statistics.median(samples["float32"][1:])
        for name, values in samples.items():
            seconds = statistics.median(values[1:])
            print(f"| {batch} | {name} | {seconds * 1e3:.1f} | {batch / seconds:.1f} | "
                  f"{base / seconds:.2f}x |", flush=True)
    for llm, _ in engines.values():
        llm.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--isa", nargs="+", default=["auto"], choices=list(cpp_bf16.ISA_CODES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--sweep", action="store_true", help="one decode step's projections, cold")
    parser.add_argument("--engine", action="store_true", help="end-to-end decode instead")
    parser.add_argument("--batches", type=int, nargs="+", default=[1])
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    print(f"threads={torch.get_num_threads()} OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '-')}")
    lacking = [isa for isa in args.isa if not cpp_bf16.isa_supported(isa)]
    if lacking:
        print(f"skipped (this CPU cannot run them): {' '.join(lacking)}")
        args.isa = [isa for isa in args.isa if isa not in lacking]
    if args.engine:
        return engine_table(args.batches, args.tokens, args.repeats)
    if args.sweep:
        with torch.inference_mode():
            return sweep_table(args.rows, args.repeats, args.isa)
    print("| N x K | M | variant | us/call | GB/s | vs oneDNN fp32 |")
    print("|---|---|---|---|---|---|")
    with torch.inference_mode():
        for rows in args.rows:
            for n, k in SHAPES:
                found = variants(n, k, rows, args.isa)
                calls = max(10, args.calls * 576 * 576 // (n * k))
                samples: dict[str, list[float]] = {name: [] for name in found}
                for _ in range(args.repeats):
                    for name, (call, _) in found.items():
                        samples[name].append(seconds_per_call(call, calls))
                base = statistics.median(samples.get("oneDNN fp32 packed", samples[next(iter(found))]))
                for name, values in samples.items():
                    seconds = statistics.median(values)
                    print(f"| {n} x {k} | {rows} | {name} | {seconds * 1e6:.1f} | "
                          f"{found[name][1] / seconds / 1e9:.1f} | {base / seconds:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
