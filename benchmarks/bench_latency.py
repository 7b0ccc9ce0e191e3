"""Decode latency of composed formulas against single-model decoding, on the embedded
SmolLM2-135M-Instruct (CPU). Everything is measured in this one run, alternating the
variants, and printed as ratios (machines here are noisy).

    python benchmarks/bench_latency.py [--tokens 32] [--repeats 3] [--batches 1 16]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lmarith as la  # noqa: E402
from lmarith.embedded import embedded_model  # noqa: E402

SYSTEMS = ["You are a helpful assistant.", "You answer briefly.", "You love poetry.",
           "You are a careful scientist.", "You speak like a pirate."]
PROMPTS = ["Tell me about cats.", "What is the capital of France?", "Write a haiku about rain.",
           "Explain gravity to a child."]


def formula_with_terms(model: la.Model, num_terms: int) -> la.Formula:
    """1 term: the bare model; k terms: a linear mix of k system-prompted variants."""
    if num_terms == 1:
        return model
    terms = [model.prompt(system) for system in SYSTEMS[:num_terms]]
    formula = terms[0]
    for term in terms[1:]:
        formula = formula + (0.5 / (num_terms - 1)) * term
    return formula


def lmarith_decode_seconds(llm: la.LLM, formula: la.Formula, batch: int, tokens: int) -> float:
    """Seconds per decode step (every request gains one token), prefill excluded: the
    requests' decode time (first token to finish) over the tokens after the first."""
    params = la.SamplingParams(temperature=0, max_tokens=tokens + 1, ignore_eos=True)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    outputs = llm.generate(prompts, formula, params)
    return max(output.metrics.decode_time for output in outputs) / tokens


def transformers_decode_seconds(hf_model, tokenizer, batch: int, tokens: int) -> float:
    """Seconds per decode step of transformers generate (generate(N) - generate(1)) / (N - 1)."""
    tokenizer.padding_side = "left"
    inputs = tokenizer([PROMPTS[i % len(PROMPTS)] for i in range(batch)], return_tensors="pt", padding=True)

    def run(new_tokens: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            hf_model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=False, pad_token_id=tokenizer.pad_token_id or 0)
        return time.perf_counter() - start

    return (run(tokens + 1) - run(1)) / tokens


def memcpy_bandwidth() -> float:
    """Bytes per second of a large tensor copy (read + write counted)."""
    source = torch.empty(256 << 20, dtype=torch.uint8).fill_(1)
    target = torch.empty_like(source)
    timings = []
    for _ in range(5):
        start = time.perf_counter()
        target.copy_(source)
        timings.append(time.perf_counter() - start)
    return 2 * source.numel() / min(timings)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--terms", type=int, nargs="+", default=[1, 2, 3, 5])
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = embedded_model("float32")
    llm = la.LLM(kv_cache_bytes=1 << 30, max_num_seqs=64, models=[model])
    hf_model = AutoModelForCausalLM.from_pretrained(model.path).eval()
    tokenizer = AutoTokenizer.from_pretrained(model.path)
    weight_bytes = sum(p.numel() * p.element_size() for p in hf_model.parameters())
    bandwidth = memcpy_bandwidth()
    print(f"threads={torch.get_num_threads()} tokens={args.tokens} repeats={args.repeats} "
          f"weights={weight_bytes / 1e6:.0f} MB memcpy={bandwidth / 1e9:.1f} GB/s")
    print("| batch | variant | ms/step | tok/s | ratio |")
    print("|---|---|---|---|---|")
    for batch in args.batches:
        samples: dict[str, list[float]] = {}
        for _ in range(args.repeats):
            samples.setdefault("transformers", []).append(
                transformers_decode_seconds(hf_model, tokenizer, batch, args.tokens))
            for num_terms in args.terms:
                formula = formula_with_terms(model, num_terms)
                samples.setdefault(f"lmarith {num_terms}-term", []).append(
                    lmarith_decode_seconds(llm, formula, batch, args.tokens))
        report(batch, samples, weight_bytes, bandwidth)


def report(batch: int, samples: dict, weight_bytes: int, bandwidth: float) -> None:
    medians = {name: statistics.median(values) for name, values in samples.items()}
    single = medians["lmarith 1-term"]
    for name, seconds in medians.items():
        if name == "transformers":
            ratio = f"lmarith 1-term is {seconds / single:.2f}x faster"
        else:
            ratio = f"{seconds / single:.2f}x single-model step"
        print(f"| {batch} | {name} | {seconds * 1e3:.1f} | {batch / seconds:.1f} | {ratio} |")
    roofline = bandwidth / weight_bytes
    print(f"| {batch} | roofline (weights read once per step) | {1e3 / roofline:.1f} | "
          f"{batch * roofline:.1f} | lmarith 1-term at {100 / (roofline * single):.0f}% of the step roofline |")


if __name__ == "__main__":
    main()
