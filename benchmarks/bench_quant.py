"""Quantized matmul on CPU: lmarith's C++ quant_matmul (q8_0, q4_1, q5_0, q4_k, q6_k) against
torch's dense float32 and bfloat16 linear (oneDNN), on SmolLM2-135M-shaped weights.

For each weight [N, K] (q/k/v/o 576x576, MLP up/gate 1536x576, down 576x1536, LM head
49152x576, and a Llama-3.2-1B MLP up 8192x2048) and M = 1 (decode) and 16 (a batch or a verify step), each repeat runs every
implementation once in alternating order; the table shows medians (ms per matmul), the
effective bandwidth over the weight's bytes (GB/s, what bounds M = 1) and the time ratio
to float32. The K-quants (K a multiple of 256 only) run on the best SIMD path and, as its
baseline, on the scalar one (LMARITH_QUANT_ISA=scalar). Run:
    OMP_WAIT_POLICY=passive python benchmarks/bench_quant.py [--repeats N] [--threads N]
(passive: torch and lmarith._C share one libgomp whose spinning workers otherwise fight
other processes for the cores.)
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from gguf.quants import quantize

from lmarith.bindings import cpp_quant, ops
from lmarith.kernels.quant_formats import QuantWeight

SHAPES = {"attn 576x576": (576, 576), "mlp up 1536x576": (1536, 576),
          "mlp down 576x1536": (576, 1536), "lm head 49152x576": (49152, 576),
          "1B mlp up 8192x2048": (8192, 2048)}
KQUANTS = {"q4_k": (144, (0, 2)), "q6_k": (210, (208,))}   # block bytes, fp16 scale offsets
BATCHES = (1, 16)
TARGET_SECONDS = 0.004   # each timed sample repeats the call to last about this long


def implementations(w: torch.Tensor) -> dict[str, tuple[Callable, int]]:
    """name -> (fn(x_fp32) -> y, weight bytes) for one float weight [N, K]."""
    n, k = w.shape
    w_bf16 = w.to(torch.bfloat16)
    q8 = ops.quantize_q8_0(w)
    q41, q50 = (QuantWeight(name, torch.from_numpy(quantize(w.numpy(), qtype)), n, k)
                for name, qtype in (("q4_1", GGMLQuantizationType.Q4_1),
                                    ("q5_0", GGMLQuantizationType.Q5_0)))
    impls = {
        "fp32 linear": (lambda x: F.linear(x, w), w.numel() * 4),
        "bf16 linear": (lambda x: F.linear(x.to(torch.bfloat16), w_bf16), w.numel() * 2),
        "q8_0 cpp": (cpp_quant.prepared(q8), q8.nbytes),
        "q4_1 cpp": (cpp_quant.prepared(q41), q41.nbytes),
        "q5_0 cpp": (cpp_quant.prepared(q50), q50.nbytes),
    }
    if k % 256 == 0:
        for qtype in KQUANTS:
            weight = random_kquant(qtype, n, k)
            impls[f"{qtype} cpp"] = (cpp_quant.prepared(weight), weight.nbytes)
            impls[f"{qtype} scalar"] = (prepared_on("scalar", weight), weight.nbytes)
    return impls


def random_kquant(qtype: str, n: int, k: int) -> QuantWeight:
    """Random K-quant blocks with small finite fp16 scales (gguf's Python cannot quantize
    K-quants; the kernels' time does not depend on the values)."""
    block_bytes, scale_offsets = KQUANTS[qtype]
    gen = torch.Generator().manual_seed(n + k)
    blocks = torch.randint(0, 256, (n, k // 256, block_bytes), dtype=torch.uint8, generator=gen)
    for offset in scale_offsets:
        scales = (torch.rand(n, k // 256, 1, generator=gen) * 0.02).half()
        blocks[..., offset:offset + 2] = scales.view(torch.uint8).reshape(n, k // 256, 2)
    return QuantWeight(qtype, blocks.reshape(n, -1), n, k)


def prepared_on(isa: str, weight: QuantWeight) -> Callable:
    """cpp_quant.prepared(weight) with the instruction path forced to `isa`."""
    previous = os.environ.get(cpp_quant.ISA_ENV)
    os.environ[cpp_quant.ISA_ENV] = isa
    try:
        return cpp_quant.prepared(weight)
    finally:
        if previous is None:
            del os.environ[cpp_quant.ISA_ENV]
        else:
            os.environ[cpp_quant.ISA_ENV] = previous


def time_call(fn: Callable, x: torch.Tensor, inner: int) -> float:
    start = time.perf_counter()
    for _ in range(inner):
        fn(x)
    return (time.perf_counter() - start) / inner


def measure(impls: dict, x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median seconds per call of each implementation, alternating their order per repeat."""
    inner = {}
    for name, (fn, _) in impls.items():
        fn(x)
        inner[name] = max(1, int(TARGET_SECONDS / max(time_call(fn, x, 3), 1e-7)))
    samples: dict[str, list[float]] = {name: [] for name in impls}
    names = list(impls)
    for repeat in range(repeats):
        for name in (names if repeat % 2 == 0 else names[::-1]):
            samples[name].append(time_call(impls[name][0], x, inner[name]))
    return {name: statistics.median(values) for name, values in samples.items()}


def report(label: str, m: int, impls: dict, seconds: dict[str, float]) -> None:
    base = seconds["fp32 linear"]
    print(f"\n{label}, M = {m}")
    print(f"  {'implementation':<14} {'ms':>9} {'GB/s':>8} {'vs fp32':>8}")
    for name, (_, nbytes) in impls.items():
        s = seconds[name]
        print(f"  {name:<14} {s * 1e3:9.4f} {nbytes / s / 1e9:8.2f} {base / s:7.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not cpp_quant.isa_supported("scalar"):
        raise SystemExit("lmarith._C is not built: pip install --no-build-isolation -e .")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, quant path: "
          f"{next(i for i in ('vnni', 'avx2', 'scalar') if cpp_quant.isa_supported(i))}")
    gen = torch.Generator().manual_seed(0)
    for label, (n, k) in SHAPES.items():
        w = torch.randn(n, k, generator=gen) * 0.05
        impls = implementations(w)
        for m in BATCHES:
            x = torch.randn(m, k, generator=gen)
            report(label, m, impls, measure(impls, x, args.repeats))


if __name__ == "__main__":
    main()
