"""Context sweep of bench_latency.py (`--context-sweep 32 512 2048`): batch-1 decode ms/token
and prefill seconds of the embedded SmolLM2 at several context lengths, with the torch
reference face of paged_attention (gathers pages, SDPA) against the C++ face (pages read in
place), alternated in one run. `--attention-rows` adds the kernel-level sweep over query rows
per sequence that sets the C++ face's fallback threshold (bindings/cpp.py).

Prompts carry a per-run tag in front, so the prefix cache never serves a previous run's
prefill."""
from __future__ import annotations

import itertools
import statistics
import time

import torch

import lmarith as la
from lmarith.bindings import cpp, ops
from lmarith.kernels.attention_metadata import build_metadata

OP = "paged_attention"
TEMPLATE_TOKENS = 0  # plain-text prompts: no chat template around them
_RUN = itertools.count()


class _Faces:
    """A variant: the torch reference, or the C++ face as dispatched, or (when a fallback
    threshold is set) the C++ kernel with it lifted. A model on the native C++ stack calls the
    C++ kernel directly, so the torch variant runs it through the Python layer loop."""

    def __init__(self, face: str, kernel_only: bool = False, model=None) -> None:
        self.face, self.kernel_only, self.model = face, kernel_only, model

    def __enter__(self):
        self._stack = getattr(self.model, "native_stack", None)
        if self.face == "torch" and self._stack is not None:
            self.model.native_stack = None
        self._forced = ops.forced_face(OP, self.face)
        self._forced.__enter__()
        self._threshold = cpp.ATTENTION_MAX_QUERY_ROWS
        if self.kernel_only:
            cpp.ATTENTION_MAX_QUERY_ROWS = 1 << 30
        return self

    def __exit__(self, *exc) -> None:
        cpp.ATTENTION_MAX_QUERY_ROWS = self._threshold
        self._forced.__exit__(*exc)
        if self._stack is not None:
            self.model.native_stack = self._stack


def prompt_of(tokenizer, context: int) -> str:
    """A fresh prompt of about `context` tokens once the chat template is applied."""
    tag = f"Run {next(_RUN)}. "
    words = " ".join(f"item{i} is {i * 7919 % 1000}" for i in range(context))
    ids = tokenizer(tag + words, add_special_tokens=False).input_ids
    return tokenizer.decode(ids[:max(1, context - TEMPLATE_TOKENS)])


def one_run(llm: la.LLM, model: la.Model, prompt: str, tokens: int) -> tuple[float, float, int]:
    """(decode s/token, prefill s, prompt tokens) of one batch-1 greedy request."""
    params = la.SamplingParams(temperature=0, max_tokens=tokens + 1, ignore_eos=True)
    [output] = llm.generate([prompt], model, params)
    metrics = output.metrics
    return metrics.decode_time / tokens, metrics.time_to_first_token, metrics.prompt_tokens


def context_sweep(llm: la.LLM, model: la.Model, tokenizer, contexts: list[int], tokens: int,
                  repeats: int) -> None:
    """Print the markdown table: per context, each variant's median decode ms/token and
    prefill ms, the C++/torch ratios, and the growth of decode time from the first context."""
    runner_model = llm.engine.worker.runners[model.spec].model
    variants = {"torch": _Faces("torch", model=runner_model), "cpp": _Faces("cpp", model=runner_model)}
    if cpp.ATTENTION_MAX_QUERY_ROWS is not None:  # the kernel's own prefill, past the fallback
        variants["cpp kernel"] = _Faces("cpp", kernel_only=True, model=runner_model)
    rows = {}
    for context in contexts:
        samples: dict[str, list[tuple[float, float, int]]] = {name: [] for name in variants}
        for _ in range(repeats):
            for name, faces in variants.items():
                with faces:
                    samples[name].append(one_run(llm, model, prompt_of(tokenizer, context), tokens))
        rows[context] = {name: tuple(statistics.median(s[i] for s in runs) for i in range(3))
                         for name, runs in samples.items()}
    report(rows, list(variants))


def report(rows: dict[int, dict[str, tuple[float, float, int]]], names: list[str]) -> None:
    """The sweep's markdown table and the decode growth from the first context to the last."""
    print("| context | " + " | ".join(f"{n} decode ms/token" for n in names) + " | cpp/torch | "
          + " | ".join(f"{n} prefill ms" for n in names) + " | cpp/torch |")
    print("|---" * (2 * len(names) + 3) + "|")
    for row in rows.values():
        decode = " | ".join(f"{row[n][0] * 1e3:.2f}" for n in names)
        prefill = " | ".join(f"{row[n][1] * 1e3:.0f}" for n in names)
        print(f"| {row['torch'][2]} | {decode} | {row['cpp'][0] / row['torch'][0]:.2f} | "
              f"{prefill} | {row['cpp'][1] / row['torch'][1]:.2f} |")
    first, last = rows[min(rows)], rows[max(rows)]
    for name in ("torch", "cpp"):
        print(f"{name}: decode per token at {last[name][2]} tokens of context is "
              f"{last[name][0] / first[name][0]:.2f}x the time at {first[name][2]} "
              f"(+{(last[name][0] - first[name][0]) * 1e3:.2f} ms)", flush=True)


def attention_rows_sweep(rows_list: list[int], context: int = 512, repeats: int = 20) -> None:
    """One layer's paged_attention call at SmolLM2's shapes (9 heads, 3 kv heads, head_dim 64,
    16-token pages, caches strided in a 30-layer arena): torch face vs the C++ kernel (no
    fallback) for one sequence with `rows` query rows ending at `context`."""
    heads, kv_heads, dim, page = 9, 3, 64, 16
    pages = -(-context // page)
    arena = torch.randn(pages, 30, 2, page, kv_heads, dim)
    key_cache, value_cache = arena[:, 7, 0], arena[:, 7, 1]
    print(f"| query rows (context {context}) | torch us | cpp kernel us | cpp/torch |")
    print("|---|---|---|---|")
    for rows in rows_list:
        meta = build_metadata([rows], [context], [list(range(pages))], page)
        query = torch.randn(rows, heads, dim)
        times = {}
        for face in ("torch", "cpp", "torch", "cpp"):
            with _Faces(face, kernel_only=True):
                times.setdefault(face, []).append(_call_seconds(query, key_cache, value_cache, meta, repeats))
        torch_us, cpp_us = (min(times[f]) * 1e6 for f in ("torch", "cpp"))
        print(f"| {rows} | {torch_us:.0f} | {cpp_us:.0f} | {cpp_us / torch_us:.2f} |", flush=True)


def _call_seconds(query, key_cache, value_cache, meta, repeats: int) -> float:
    """Mean seconds of one dispatched paged_attention call (its per-step plan rebuilt)."""
    ops.paged_attention(query, key_cache, value_cache, meta, 0.125)
    start = time.perf_counter()
    for _ in range(repeats):
        meta.scratch.clear()
        ops.paged_attention(query, key_cache, value_cache, meta, 0.125)
    return (time.perf_counter() - start) / repeats
