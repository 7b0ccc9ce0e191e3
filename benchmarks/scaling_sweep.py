"""Scaling sweeps of bench_latency.py on the embedded SmolLM2-135M-Instruct, each engine
alternated with the others at every point of one run:

  --scaling-plot PATH  decode tokens/s against batch (1..16, short prompts) and against
                       context (batch 1) for lmarith fp32, lmarith on the GGUF's own Q4_1
                       blocks, transformers fp32 and, when llama-cpp-python is installed,
                       llama.cpp on the same GGUF (batch 1 only: its Python API decodes one
                       sequence); a table, and two panels drawn to PATH.
  --under-load         batch-1 decode tokens/s quiet, then with one other process streaming
                       memory on the machine; the ratio loaded/quiet per engine.
  --prefill TOKENS     time to first token of a TOKENS-token prompt, lmarith vs transformers.
"""
from __future__ import annotations

import importlib.util
import statistics
import subprocess
import sys
import time

import torch

import lmarith as la
from context_sweep import prompt_of
from dtype_sweep import llama_cpp_runner, llama_cpp_seconds, lmarith_seconds
from lmarith.embedded import embedded_model

SHORT = "Tell me about cats."
STREAMER = ("import numpy as np\nsource = np.ones(32 << 20)\ntarget = np.empty_like(source)\n"
            "while True:\n    np.copyto(target, source)\n")


def transformers_rate(hf: tuple, prompt: str, batch: int, tokens: int) -> float:
    """Decode tokens/s of transformers generate: batch * N / (generate(N+1) - generate(1))."""
    model, tokenizer = hf
    inputs = tokenizer([prompt] * batch, return_tensors="pt")

    def run(count: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=count, min_new_tokens=count, do_sample=False,
                           pad_token_id=tokenizer.pad_token_id or 0)
        return time.perf_counter() - start
    return batch * tokens / (run(tokens + 1) - run(1))


class Engines:
    """The engines a sweep alternates; rate(name, prompt, batch, tokens) -> tokens/s."""

    def __init__(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        self.fp32, self.q4 = embedded_model("float32"), embedded_model("auto")
        self.llm = la.LLM(kv_cache_bytes=1 << 30, max_num_seqs=64, models=[self.fp32, self.q4])
        self.hf = (AutoModelForCausalLM.from_pretrained(self.fp32.path).eval(),
                   AutoTokenizer.from_pretrained(self.fp32.path))
        self.llama: dict[int, object] = {}   # by context window: llama.cpp's cost grows with it
        self.names = ["lmarith fp32", "lmarith Q4_1", "transformers fp32"] + \
            (["llama.cpp Q4_1"] if importlib.util.find_spec("llama_cpp") else [])

    def llama_for(self, prompt: str, tokens: int):
        """A llama.cpp runner whose window just holds the prompt and the new tokens."""
        needed = len(self.hf[1](prompt).input_ids) + tokens + 64
        window = 512 if needed <= 512 else 1 << (needed - 1).bit_length()
        if window not in self.llama:
            self.llama[window] = llama_cpp_runner(torch.get_num_threads(), context=window)
        return self.llama[window]

    def rate(self, name: str, prompt: str, batch: int, tokens: int) -> float | None:
        if name in ("lmarith fp32", "lmarith Q4_1"):
            model = self.fp32 if name == "lmarith fp32" else self.q4
            return batch / lmarith_seconds(self.llm, model, batch, tokens, prompt)
        if name == "transformers fp32":
            return transformers_rate(self.hf, prompt, batch, tokens)
        if batch > 1:
            return None
        return 1 / llama_cpp_seconds(self.llama_for(prompt, tokens), tokens, prompt)


def sweep(engines: Engines, points: list[tuple[str, int]], tokens: int, repeats: int) -> dict:
    """{(name, point index): median tokens/s} over (prompt, batch) points, engines alternated."""
    rates: dict = {}
    for index, (prompt, batch) in enumerate(points):
        samples: dict[str, list[float]] = {}
        for _ in range(repeats):
            for name in engines.names:
                value = engines.rate(name, prompt, batch, tokens)
                if value is not None:
                    samples.setdefault(name, []).append(value)
        for name, values in samples.items():
            rates[name, index] = statistics.median(values)
    return rates


def scaling_plot(path: str, batches: list[int], contexts: list[int], tokens: int, repeats: int) -> None:
    """The batch and context sweeps: a markdown table and a two-panel plot."""
    engines = Engines()
    tokenizer = engines.hf[1]
    print("| sweep | point | " + " | ".join(engines.names) + " |")
    print("|---|---|" + "---|" * len(engines.names))
    by_batch = sweep(engines, [(SHORT, b) for b in batches], tokens, repeats)
    print_rows("batch", by_batch, batches, engines.names)
    by_context = sweep(engines, [(prompt_of(tokenizer, c), 1) for c in contexts], tokens, repeats)
    print_rows("context", by_context, contexts, engines.names)
    draw(path, engines.names, (batches, by_batch), (contexts, by_context))
    print(f"plot: {path}")


def print_rows(label: str, table: dict, points: list[int], names: list[str]) -> None:
    for index, point in enumerate(points):
        cells = [f"{table[n, index]:.1f}" if (n, index) in table else "-" for n in names]
        print(f"| {label} | {point} | " + " | ".join(cells) + " |", flush=True)


def draw(path: str, names: list[str], batch_sweep: tuple, context_sweep: tuple) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for axis, (points, table), label in zip(axes, (batch_sweep, context_sweep),
                                            ("batch (requests decoded together)", "context tokens (batch 1)")):
        for name in names:
            shown = [(p, table[name, i]) for i, p in enumerate(points) if (name, i) in table]
            if shown:
                axis.plot(*zip(*shown), marker="o", label=name)
        axis.set_xscale("log", base=2)
        axis.set_xlabel(label)
        axis.set_ylabel("decode tokens/s")
        axis.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].legend()
    figure.suptitle(f"SmolLM2-135M decode on CPU, {torch.get_num_threads()} threads")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def under_load(tokens: int, repeats: int) -> None:
    """Batch-1 decode quiet and beside one memory-streaming process, per engine."""
    engines = Engines()
    quiet = sweep(engines, [(SHORT, 1)], tokens, repeats)
    streamer = subprocess.Popen([sys.executable, "-c", STREAMER])
    try:
        time.sleep(2)
        loaded = sweep(engines, [(SHORT, 1)], tokens, repeats)
    finally:
        streamer.kill()
    print("| engine | quiet tok/s | with one busy process | loaded / quiet |")
    print("|---|---|---|---|")
    for name in engines.names:
        print(f"| {name} | {quiet[name, 0]:.1f} | {loaded[name, 0]:.1f} | "
              f"{loaded[name, 0] / quiet[name, 0]:.2f} |", flush=True)


def prefill(prompt_tokens: int, repeats: int) -> None:
    """Time to first token of one fresh prompt_tokens-token prompt, lmarith in float32,
    bfloat16 and the GGUF's Q4_1 against transformers fp32, alternated."""
    engines = Engines()
    model, tokenizer = engines.hf
    bf16 = embedded_model("bfloat16")
    llm16 = la.LLM(kv_cache_bytes=1 << 29, max_num_seqs=8, models=[bf16])
    ours = {"lmarith fp32": (engines.llm, engines.fp32), "lmarith bf16": (llm16, bf16),
            "lmarith Q4_1": (engines.llm, engines.q4)}
    samples: dict[str, list[float]] = {name: [] for name in [*ours, "transformers fp32"]}
    for _ in range(repeats):
        prompt = prompt_of(tokenizer, prompt_tokens)
        params = la.SamplingParams(temperature=0, max_tokens=1)
        for name, (llm, formula) in ours.items():
            [output] = llm.generate([prompt], formula, params)
            samples[name].append(output.metrics.time_to_first_token)
        inputs = tokenizer([prompt], return_tensors="pt")
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=1, do_sample=False,
                           pad_token_id=tokenizer.pad_token_id or 0)
        samples["transformers fp32"].append(time.perf_counter() - start)
    llm16.close()
    medians = {name: statistics.median(values) for name, values in samples.items()}
    for name, seconds in medians.items():
        print(f"| {name} | {prompt_tokens} | {seconds * 1e3:.0f} ms |")
    for name in ours:
        print(f"{name} is {medians['transformers fp32'] / medians[name]:.2f}x faster to the "
              "first token than transformers fp32")