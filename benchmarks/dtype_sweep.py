"""Weight-dtype sweep of bench_latency.py (`--dtypes float32 bfloat16 q8_0 auto`): single-model
decode ms/step of the embedded SmolLM2-135M-Instruct with each weight format ("auto" is the
shipped GGUF's own Q4_1 blocks, "q8_0" the float model quantised at load), at each batch
size, alternated in one run with transformers (fp32) and, when llama-cpp-python is installed
(an optional install, never in CI), llama.cpp on the same GGUF file with the same threads."""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Optional

import torch

import lmarith as la
from lmarith.embedded import embedded_model, find_embedded_gguf

PROMPT = "Tell me about cats."


def weight_bytes(llm: la.LLM, model: la.Model) -> int:
    """Weight bytes one decode step reads: every projection and the output head (float,
    oneDNN-packed or quantized blocks) and the norms; the embedding gives one row."""
    from lmarith.models.packed_linear import PackedLinear
    from lmarith.models.quantization import QuantLinear

    runner = llm.engine.worker.runners[model.spec]
    total = 0
    for module in runner.model.modules():
        if isinstance(module, QuantLinear):
            total += sum(b.numel() for name, b in module.named_buffers() if name.startswith("blocks"))
        elif isinstance(module, PackedLinear):
            total += module.packed.numel() * module.packed.element_size()
        elif isinstance(module, torch.nn.Linear):
            total += module.weight.numel() * module.weight.element_size()
        elif not isinstance(module, torch.nn.Embedding):
            total += sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
    return total


def lmarith_seconds(llm: la.LLM, model: la.Model, batch: int, tokens: int,
                    prompt: str = PROMPT) -> float:
    """Seconds per decode step of `batch` copies of prompt (first token to last)."""
    params = la.SamplingParams(temperature=0, max_tokens=tokens + 1, ignore_eos=True)
    outputs = llm.generate([prompt] * batch, model, params)
    return max(o.metrics.decode_time for o in outputs) / tokens


def cpu_has_amx() -> bool:
    """Whether this CPU reports Intel AMX tiles (Linux /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as info:
            return "amx_int8" in info.read(1 << 16)
    except OSError:
        return False


def llama_cpp_runner(threads: int, context: int = 512, path: Optional[Path] = None):
    """A llama.cpp model on `path` (default: the embedded GGUF), or None when
    llama-cpp-python is missing. On
    CPUs with AMX its extra (AMX / repack) weight buffers are turned off: llama-cpp-python
    0.3.36 built on such a host crashes (SIGSEGV) in its first decode with them (2026-12-02)."""
    try:
        from llama_cpp import Llama
        from llama_cpp import llama_cpp as bindings   # what Llama() reads its defaults from
    except ImportError:
        return None
    defaults = bindings.llama_model_default_params
    if cpu_has_amx() and hasattr(defaults(), "use_extra_bufts"):
        def without_extra_buffers():
            params = defaults()
            params.use_extra_bufts = False
            return params
        bindings.llama_model_default_params = without_extra_buffers
    try:
        return Llama(model_path=str(path or find_embedded_gguf()), n_threads=threads, n_ctx=context,
                     verbose=False)
    finally:
        bindings.llama_model_default_params = defaults


def llama_cpp_seconds(runner, tokens: int, prompt: str = PROMPT) -> float:
    """Decode seconds per token of llama.cpp: (generate(N) - generate(1)) / (N - 1), greedy,
    after one call that evaluates the prompt (llama.cpp keeps its KV between calls)."""
    def run(count: int) -> float:
        start = time.perf_counter()
        runner(prompt, max_tokens=count, temperature=0.0, top_k=1)
        return time.perf_counter() - start
    run(1)
    return (run(tokens + 1) - run(1)) / tokens


def sgemm_rate(size: int = 2048, calls: int = 5) -> float:
    """float32 multiply-add flops per second of torch's GEMM (MKL, every thread) on a large
    square product: what this CPU's FMA units give a compute-bound fp32 step at best."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    start = time.perf_counter()
    for _ in range(calls):
        torch.mm(a, b)
    return 2 * size ** 3 * calls / (time.perf_counter() - start)


def dtype_sweep(dtypes: list[str], batches: list[int], tokens: int, repeats: int, hf_seconds,
                gguf: Optional[Path] = None) -> None:
    """Print one table row per (batch, variant): ms/step, tok/s, MB read per step, speed vs
    fp32. `gguf`: the file "auto" and llama.cpp load instead of the embedded Q4_1 one (e.g. a
    Q6_K or Q4_K_M requantisation of it, for the other formats' kernels)."""
    models = {dtype: la.Model(str(gguf), dtype="auto") if dtype == "auto" and gguf
              else embedded_model(dtype) for dtype in dtypes}
    llama = llama_cpp_runner(torch.get_num_threads(), path=gguf)
    llama_label = f"llama.cpp ({(gguf or find_embedded_gguf()).name})"
    with la.LLM(kv_cache_bytes=1 << 30, max_num_seqs=64, models=list(models.values())) as llm:
        sizes = {dtype: weight_bytes(llm, model) for dtype, model in models.items()}
        rate = sgemm_rate() if "float32" in sizes else None
        print("| batch | variant | MB/step | ms/step | tok/s | vs lmarith float32 |")
        print("|---|---|---|---|---|---|")
        for batch in batches:
            samples: dict[str, list[float]] = {}
            for _ in range(repeats):
                samples.setdefault("transformers float32", []).append(hf_seconds(batch, tokens))
                if llama is not None and batch == 1:
                    samples.setdefault(llama_label, []).append(llama_cpp_seconds(llama, tokens))
                for dtype, model in models.items():
                    samples.setdefault(dtype, []).append(lmarith_seconds(llm, model, batch, tokens))
            base = statistics.median(samples.get("float32", samples[dtypes[0]]))
            for name, values in samples.items():
                seconds = statistics.median(values)
                label = f"lmarith {name}" if name in models else name
                size = f"{sizes[name] / 1e6:.0f}" if name in sizes else "-"
                print(f"| {batch} | {label} | {size} | {seconds * 1e3:.1f} | {batch / seconds:.1f} | "
                      f"{base / seconds:.2f}x |", flush=True)
            if rate:
                floor = 2 * sizes["float32"] / 4 * batch / rate   # one multiply-add per weight and row
                print(f"| {batch} | float32 compute floor (sgemm {rate / 1e9:.0f} GFLOP/s) | - | "
                      f"{floor * 1e3:.1f} | {batch / floor:.1f} | {base / floor:.2f}x |", flush=True)
