"""Speculative sampling on the embedded SmolLM2-135M-Instruct (CPU): each speculative formula
against the same law without speculation, alternated in one run, printed as ratios.

  A. across terms: M(normal) + l*M(formal, speculative_factor=k); forward passes of the
     formal term per token, acceptance, wall time.
  B. two models: SmolLM2 and a copy truncated to its first layers; the expensive term with
     speculation across terms, and Speculative(full, truncated, k).
  C. prompt lookup: Speculative(3-term formula, NgramDraft(n=3), k) on prompts whose answers
     repeat their context, greedy and temperature 0.7, batch 1 and 8.

    python benchmarks/bench_speculative.py [--tokens 48] [--repeats 2] [--sections A B C]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lmarith as la  # noqa: E402
from lmarith.embedded import cache_root, embedded_model  # noqa: E402

NORMAL = "You are a helpful assistant."
FORMAL = "You are a helpful assistant. Always answer in a formal, academic register."
CHAT_PROMPTS = ["Tell me about cats.", "What is the capital of France?",
                "Give me three tips for sleeping well.", "Explain gravity to a child."]
ECHO_PROMPTS = [
    "Repeat this list exactly, one item per line: apples, bananas, cherries, dates, elderberries, "
    "figs, grapes, honeydew, kiwis, lemons.",
    "Copy this sentence three times: The quick brown fox jumps over the lazy dog.",
    "Write the numbers from one to twenty in words, separated by commas.",
    "Rename the variable total to result in this code and print the code:\n"
    "def add(values):\n    total = 0\n    for v in values:\n        total += v\n    return total\n",
    "Summarise, reusing its words: The meeting on Monday covered the budget, the hiring plan "
    "and the new office. The budget was approved, the hiring plan was delayed, and the new "
    "office opens in May.",
]
SYSTEMS = ["You are a helpful assistant.", "You answer precisely.", "You are a careful editor."]


@dataclass
class Run:
    seconds: float
    tokens: int
    passes: list[int]      # forward passes per term, summed over the batch
    proposed: int
    accepted: int


def run(llm: la.LLM, formula: la.Formula, prompts: list[str], params: la.SamplingParams) -> Run:
    seeded = [dataclasses.replace(params, seed=i) for i in range(len(prompts))]
    start = time.perf_counter()
    outputs = llm.generate(prompts, formula, seeded)
    seconds = time.perf_counter() - start
    passes = [sum(o.metrics.term_forward_passes[t] for o in outputs)
              for t in range(len(outputs[0].metrics.term_forward_passes))]
    return Run(seconds, sum(len(o.token_ids) for o in outputs), passes,
               sum(o.metrics.proposed_tokens for o in outputs),
               sum(o.metrics.accepted_tokens for o in outputs))


def run_batches(llm, formula, batches: list[list[str]], params) -> Run:
    """One generate call per batch of prompts, one after the other, added up."""
    parts = [run(llm, formula, prompts, params) for prompts in batches]
    return Run(sum(p.seconds for p in parts), sum(p.tokens for p in parts),
               [sum(column) for column in zip(*(p.passes for p in parts))],
               sum(p.proposed for p in parts), sum(p.accepted for p in parts))


def compare(llm, variants: dict, prompts, params, repeats: int) -> dict[str, list[Run]]:
    """Every variant once per repeat, in turn, so drift hits them alike. prompts: one batch,
    or a list of batches run one after the other."""
    batches = prompts if isinstance(prompts[0], list) else [prompts]
    runs: dict[str, list[Run]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, formula in variants.items():
            runs[name].append(run_batches(llm, formula, batches, params))
    return runs


def median_time(runs: list[Run]) -> float:
    return statistics.median(r.seconds / r.tokens for r in runs)


def acceptance(runs: list[Run]) -> str:
    proposed = sum(r.proposed for r in runs)
    return f"{sum(r.accepted for r in runs) / proposed:.0%}" if proposed else "-"


def passes_per_token(runs: list[Run], term: int) -> float:
    return sum(r.passes[term] for r in runs) / sum(r.tokens for r in runs)


def section_a(llm, model, args) -> None:
    print("\n### A. Across terms: M(normal) + l*M(formal, k), temperature 1, batch 4")
    print("| l | k | formal passes/token | vs k=1 | acceptance | ms/token | wall vs k=1 |")
    print("|---|---|---|---|---|---|---|")
    params = la.SamplingParams(max_tokens=args.tokens, temperature=1.0, ignore_eos=True)
    for weight in (0.1, 0.3, 1.0):
        variants = {k: model.chat(NORMAL) + weight * model.chat(FORMAL, speculative_factor=k)
                    for k in (1, 2, 4, 8)}
        runs = compare(llm, variants, CHAT_PROMPTS, params, args.repeats)
        base_passes, base_time = passes_per_token(runs[1], 1), median_time(runs[1])
        for k, formal_runs in runs.items():
            per_token = passes_per_token(formal_runs, 1)
            seconds = median_time(formal_runs)
            print(f"| {weight} | {k} | {per_token:.2f} | {per_token / base_passes:.2f}x | "
                  f"{acceptance(formal_runs)} | {seconds * 1e3:.1f} | {seconds / base_time:.2f}x |")


def truncated_copy(model: la.Model, layers: int) -> la.Model:
    """SmolLM2 with only its first `layers` decoder layers (a cheap, weaker stand-in)."""
    target = cache_root() / f"{os.path.basename(model.path)}-first{layers}"
    if not (target / "config.json").is_file():
        from transformers import AutoModelForCausalLM, AutoTokenizer
        hf_model = AutoModelForCausalLM.from_pretrained(model.path)
        hf_model.model.layers = hf_model.model.layers[:layers]
        hf_model.config.num_hidden_layers = layers
        hf_model.save_pretrained(target)
        AutoTokenizer.from_pretrained(model.path).save_pretrained(target)
    return la.Model(str(target))


def section_b(llm, model, args) -> None:
    small = truncated_copy(model, args.truncated_layers)
    print(f"\n### B. Two models: SmolLM2 (30 layers) and its first {args.truncated_layers} "
          "layers, temperature 1, batch 4")
    print("| formula | full-model passes/token | vs plain | acceptance | ms/token | wall vs plain |")
    print("|---|---|---|---|---|---|")
    params = la.SamplingParams(max_tokens=args.tokens, temperature=1.0, ignore_eos=True)
    groups = [
        ("M(small) + 0.3*M(full, k)", 1, {k: small.chat(NORMAL) + 0.3 * model.chat(NORMAL, speculative_factor=k)
                                          for k in (1, 2, 4)}),
        ("Speculative(M(full), M(small), k)", 0, {1: model.chat(NORMAL), **{
            k: la.Speculative(model.chat(NORMAL), small.chat(NORMAL), k=k) for k in (2, 4)}}),
    ]
    for label, full_term, variants in groups:
        runs = compare(llm, variants, CHAT_PROMPTS, params, args.repeats)
        base_passes, base_time = passes_per_token(runs[1], full_term), median_time(runs[1])
        for k, rs in runs.items():
            per_token, seconds = passes_per_token(rs, full_term), median_time(rs)
            name = label.replace("k)", f"k={k})") if k > 1 else "plain (no speculation)"
            print(f"| {name} | {per_token:.2f} | {per_token / base_passes:.2f}x | {acceptance(rs)} | "
                  f"{seconds * 1e3:.1f} | {seconds / base_time:.2f}x |")


def section_c(llm, model, args) -> None:
    formula = model.chat(SYSTEMS[0]) + 0.25 * model.chat(SYSTEMS[1]) + 0.25 * model.chat(SYSTEMS[2])
    print("\n### C. Prompt lookup on a 3-term formula, prompts whose answers repeat their context")
    print("| batch | temperature | k | acceptance | tokens/step | ms/token | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for batch in (1, 8):      # batch 1: each prompt alone in turn; batch 8: all of them at once
        prompts = ([[p] for p in ECHO_PROMPTS] if batch == 1
                   else [ECHO_PROMPTS[i % len(ECHO_PROMPTS)] for i in range(batch)])
        for temperature in (0.0, 0.7):
            # EOS ends a request here: the answer, not what a small model babbles after it
            params = la.SamplingParams(max_tokens=args.tokens, temperature=temperature)
            variants = {1: formula, **{k: la.Speculative(formula, la.NgramDraft(n=3), k=k) for k in (4, 8)}}
            runs = compare(llm, variants, prompts, params, args.repeats)
            base_time = median_time(runs[1])
            for k, rs in runs.items():
                seconds = median_time(rs)
                steps = sum(r.passes[0] for r in rs)
                print(f"| {batch} | {temperature} | {k if k > 1 else 'off'} | {acceptance(rs)} | "
                      f"{sum(r.tokens for r in rs) / steps:.2f} | {seconds * 1e3:.1f} | "
                      f"{base_time / seconds:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--truncated-layers", type=int, default=10)
    parser.add_argument("--sections", nargs="+", default=["A", "B", "C"])
    args = parser.parse_args()
    import torch
    model = embedded_model("float32")
    llm = la.LLM(kv_cache_bytes=1 << 30, max_num_seqs=64, models=[model])
    print(f"threads={torch.get_num_threads()} tokens={args.tokens} repeats={args.repeats}")
    sections = {"A": section_a, "B": section_b, "C": section_c}
    for name in args.sections:
        sections[name](llm, model, args)
    llm.close()


if __name__ == "__main__":
    main()
