"""Nudging against base-only decoding, alternated in one run, printed as ratios per token.

  A. The embedded SmolLM2-135M-Instruct on both sides: the base prompted plainly (no chat
     template), the nudger through its chat template, greedy; token hand-offs (one
     tokenizer), forced text hand-offs (the cross-tokenizer path), and full_drafts=False.
  B. Two tiny random models with different tokenizers (byte-level BPEs of 300 and 110
     tokens, so words split differently): the text path's overhead where forwards are cheap.

Base-only runs with ignore_eos (a plainly prompted base ends at once otherwise); cost is
wall seconds per generated token, batch 1 (each prompt alone in turn) and batch 8.

    python benchmarks/bench_nudging.py [--tokens 64] [--repeats 2] [--sections A B]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lmarith as la  # noqa: E402
from lmarith.embedded import embedded_model  # noqa: E402

QUESTIONS = ["What is the capital of France?", "Give me three tips for staying healthy.",
             "Explain why the sky is blue.", "Write a short poem about the sea.",
             "How do I boil an egg?", "What is photosynthesis?",
             "Name three famous painters.", "Why do cats purr?"]
BASE_TEMPLATE = "Question: {input}\nAnswer:"


@dataclass
class Run:
    seconds: float
    tokens: int
    nudged: int
    rounds: int
    answers: int


def run(llm: la.LLM, formula: la.Formula, batches: list[list[str]], params: la.SamplingParams) -> Run:
    """One generate call per batch, one after the other, added up."""
    total = Run(0.0, 0, 0, 0, 0)
    for prompts in batches:
        start = time.perf_counter()
        outputs = llm.generate(prompts, formula, params)
        total.seconds += time.perf_counter() - start
        total.tokens += sum(len(o.token_ids) for o in outputs)
        total.nudged += sum(o.metrics.nudged_tokens for o in outputs)
        total.rounds += sum(o.metrics.nudging_rounds for o in outputs)
        total.answers += len(outputs)
    return total


def compare(llm, variants: dict, batches, repeats: int) -> dict[str, list[Run]]:
    """Every variant once per repeat, in turn, so drift hits them alike."""
    runs: dict[str, list[Run]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, (formula, params) in variants.items():
            runs[name].append(run(llm, formula, batches, params))
    return runs


def per_token(runs: list[Run]) -> float:
    return statistics.median(r.seconds / r.tokens for r in runs)


def table(runs: dict[str, list[Run]], batch: int) -> None:
    baseline = per_token(runs["base only"])
    for name, rs in runs.items():
        tokens, answers = sum(r.tokens for r in rs), sum(r.answers for r in rs)
        nudged = f"{sum(r.nudged for r in rs) / tokens:.0%}" if name != "base only" else "-"
        rounds = f"{sum(r.rounds for r in rs) / answers:.1f}" if name != "base only" else "-"
        seconds = per_token(rs)
        print(f"| {batch} | {name} | {1 / seconds:.1f} | {tokens / answers:.0f} | {nudged} | "
              f"{rounds} | {seconds / baseline:.2f}x |")


def batches_of(prompts: list[str], batch: int) -> list[list[str]]:
    return [[p] for p in prompts] if batch == 1 else [prompts[:batch]]


def header(title: str) -> None:
    print(f"\n### {title}")
    print("| batch | variant | tokens/s | tokens/answer | nudged | rounds/answer | s/token vs base only |")
    print("|---|---|---|---|---|---|---|")


def section_a(args) -> None:
    model = embedded_model()
    base, nudger = model.prompt("", template=BASE_TEMPLATE), model.chat("You are a helpful assistant.")
    greedy = la.SamplingParams(temperature=0, max_tokens=args.tokens)
    variants = {
        "base only": (base, la.SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)),
        "nudging (token hand-offs)": (la.Nudging(base, nudger), greedy),
        "nudging (text hand-offs)": (la.Nudging(base, nudger, handover="text"), greedy),
        "nudging, full_drafts=False": (la.Nudging(base, nudger, full_drafts=False), greedy),
    }
    header("A. SmolLM2-135M-Instruct: plain base nudged by its chat template, greedy")
    with la.LLM(models=[model]) as llm:
        for batch in (1, 8):
            table(compare(llm, variants, batches_of(QUESTIONS[:args.prompts], batch), args.repeats), batch)


def tiny_pair(root: Path) -> tuple[la.Model, la.Model]:
    """Two random tiny models whose byte-level BPE tokenizers split words differently."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from builders import ascii_tokenizer, make_model
    return (la.Model(str(make_model(root / "coarse", seed=5, tokenizer=ascii_tokenizer(300)))),
            la.Model(str(make_model(root / "fine", seed=6, tokenizer=ascii_tokenizer(110)))))


def section_b(args) -> None:
    with tempfile.TemporaryDirectory() as root:
        base, nudger = tiny_pair(Path(root))
        greedy = la.SamplingParams(temperature=0, max_tokens=args.tokens)
        variants = {
            "base only": (base, la.SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)),
            "nudging (text hand-offs)": (la.Nudging(base, nudger.prompt("You are kind.")), greedy),
            "nudging, full_drafts=False": (la.Nudging(base, nudger.prompt("You are kind."), full_drafts=False), greedy),
        }
        header("B. Tiny random models with different tokenizers (300- and 110-token BPEs)")
        with la.LLM(models=[base, nudger]) as llm:
            for batch in (1, 8):
                table(compare(llm, variants, batches_of(QUESTIONS[:args.prompts], batch), args.repeats), batch)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--sections", nargs="+", default=["A", "B"])
    args = parser.parse_args()
    print(f"max_tokens={args.tokens}, repeats={args.repeats}, threads={os.cpu_count()}")
    if "A" in args.sections:
        section_a(args)
    if "B" in args.sections:
        section_b(args)


if __name__ == "__main__":
    main()
