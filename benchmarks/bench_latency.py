"""Decode latency of composed formulas against single-model decoding, on the embedded
SmolLM2-135M-Instruct (CPU). Everything is measured in this one run, alternating the
variants, and printed as ratios (machines here are noisy).

    python benchmarks/bench_latency.py [--tokens 32] [--repeats 3] [--batches 1 16]
        [--terms 1 2 3 5] [--plot latency.png] [--quiet]
    python benchmarks/bench_latency.py --dtypes float32 bfloat16 q8_0 auto [--batches 1 16]
        [--gguf other.gguf]
    python benchmarks/bench_latency.py --context-sweep 32 512 2048
    python benchmarks/bench_latency.py --scaling-plot scaling.png [--sweep-batches 1 2 4 8 16]
        [--sweep-contexts 32 256 1024 2048] | --under-load | --prefill 512
        (benchmarks/scaling_sweep.py)
    python benchmarks/bench_latency.py --context-sweep 32 512 2048 [--attention-rows 1 17 64 512]
        [--context-dtype float32|auto] [--kv-cache-dtype auto|bfloat16]
        (batch-1 decode and prefill per context length, torch vs C++ paged attention;
        benchmarks/context_sweep.py)
    lmarith bench latency [the same options]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lmarith as la  # noqa: E402
from lmarith.embedded import embedded_model  # noqa: E402
from lmarith.entrypoints.plots import plot_latency  # noqa: E402
from lmarith.models.loading.progress import NO_PROGRESS_ENV, progress  # noqa: E402
from tqdm import tqdm  # noqa: E402

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


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=32, help="decode steps timed per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per variant (median kept)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16], help="batch sizes")
    parser.add_argument("--terms", type=int, nargs="+", default=[1, 2, 3, 5],
                        help=f"numbers of terms in the formula (1..{len(SYSTEMS)})")
    parser.add_argument("--plot", metavar="PATH", default=None,
                        help="also draw ms/step against the number of terms, one line per batch "
                             "size, into PATH (e.g. latency.png)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--context-sweep", type=int, nargs="+", metavar="TOKENS", default=None,
                        help="instead of the formula table: batch-1 decode ms/token and prefill "
                             "at these context lengths, torch vs C++ paged attention")
    parser.add_argument("--dtypes", nargs="+", metavar="DTYPE", default=None,
                        help="instead of the formula table: single-model decode per weight dtype "
                             "(float32 bfloat16 q8_0 auto; auto = the GGUF's Q4_1 blocks), with "
                             "transformers and, if installed, llama.cpp")
    parser.add_argument("--gguf", metavar="PATH", default=None,
                        help="with --dtypes: the GGUF file 'auto' and llama.cpp load (default: "
                             "the embedded Q4_1 one)")
    parser.add_argument("--context-dtype", default="float32", metavar="DTYPE",
                        help="with --context-sweep: the weights (float32 bfloat16 q8_0 auto)")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                        help="with --context-sweep: what the KV cache stores (LLM(kv_cache_dtype=))")
    parser.add_argument("--attention-rows", type=int, nargs="+", metavar="ROWS", default=None,
                        help="with --context-sweep (or alone): one layer's attention call for "
                             "these query rows per sequence, torch vs the C++ kernel")
    parser.add_argument("--scaling-plot", metavar="PATH", default=None,
                        help="tokens/s against batch and context for lmarith (fp32, Q4_1), "
                             "transformers and llama.cpp, drawn to PATH (scaling_sweep.py)")
    parser.add_argument("--sweep-batches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--sweep-contexts", type=int, nargs="+", default=[32, 256, 1024, 2048])
    parser.add_argument("--under-load", action="store_true",
                        help="batch-1 decode quiet and beside one memory-streaming process")
    parser.add_argument("--prefill", type=int, metavar="TOKENS", default=None,
                        help="time to first token of a TOKENS-token prompt vs transformers")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    if args.quiet:
        os.environ[NO_PROGRESS_ENV] = "1"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.scaling_plot or args.under_load or args.prefill:
        return scaling_sweeps(args)
    if args.context_sweep or args.attention_rows:
        return attention_sweeps(args)
    if args.dtypes:
        return dtypes_table(args)
    model = embedded_model("float32")
    llm = la.LLM(kv_cache_bytes=1 << 30, max_num_seqs=64, models=[model])
    hf_model = AutoModelForCausalLM.from_pretrained(model.path).eval()
    tokenizer = AutoTokenizer.from_pretrained(model.path)
    weight_bytes = sum(p.numel() * p.element_size() for p in hf_model.parameters())
    bandwidth = memcpy_bandwidth()
    print(f"threads={torch.get_num_threads()} tokens={args.tokens} repeats={args.repeats} "
          f"weights={weight_bytes / 1e6:.0f} MB memcpy={bandwidth / 1e9:.1f} GB/s", flush=True)
    table, baselines = measure(args, llm, model, (hf_model, tokenizer), (weight_bytes, bandwidth))
    if args.plot:
        print(f"plot: {plot_latency(table, args.plot, baselines)}")


def dtypes_table(args: argparse.Namespace) -> None:
    """--dtypes (benchmarks/dtype_sweep.py)."""
    from dtype_sweep import dtype_sweep
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = embedded_model("float32").path
    hf = (AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path))
    print(f"threads={torch.get_num_threads()} tokens={args.tokens} repeats={args.repeats} "
          f"memcpy={memcpy_bandwidth() / 1e9:.1f} GB/s", flush=True)
    dtype_sweep(args.dtypes, args.batches, args.tokens, args.repeats,
                lambda batch, tokens: transformers_decode_seconds(*hf, batch, tokens),
                gguf=Path(args.gguf) if args.gguf else None)


def scaling_sweeps(args: argparse.Namespace) -> None:
    """--scaling-plot, --under-load, --prefill (benchmarks/scaling_sweep.py)."""
    import scaling_sweep

    print(f"threads={torch.get_num_threads()} tokens={args.tokens} repeats={args.repeats} "
          f"memcpy={memcpy_bandwidth() / 1e9:.1f} GB/s", flush=True)
    if args.scaling_plot:
        scaling_sweep.scaling_plot(args.scaling_plot, args.sweep_batches, args.sweep_contexts,
                                   args.tokens, args.repeats)
    if args.under_load:
        scaling_sweep.under_load(args.tokens, args.repeats)
    if args.prefill:
        scaling_sweep.prefill(args.prefill, args.repeats)


def attention_sweeps(args: argparse.Namespace) -> None:
    """--attention-rows and --context-sweep (benchmarks/context_sweep.py)."""
    from context_sweep import attention_rows_sweep, context_sweep
    from transformers import AutoTokenizer

    print(f"threads={torch.get_num_threads()} tokens={args.tokens} repeats={args.repeats}",
          flush=True)
    if args.attention_rows:
        attention_rows_sweep(args.attention_rows)
    if args.context_sweep:
        model = embedded_model(args.context_dtype)
        print(f"model {args.context_dtype}, kv_cache_dtype {args.kv_cache_dtype}", flush=True)
        llm = la.LLM(kv_cache_bytes=1 << 30, max_num_seqs=8, models=[model],
                     kv_cache_dtype=args.kv_cache_dtype)
        tokenizer = AutoTokenizer.from_pretrained(model.path)
        context_sweep(llm, model, tokenizer, args.context_sweep, args.tokens, args.repeats)


def measure(args: argparse.Namespace, llm: la.LLM, model: la.Model, hf: tuple,
            machine: tuple[int, float]) -> tuple[dict[int, dict[int, float]], dict[int, float]]:
    """Run every variant, alternated, printing each batch's rows as it completes. Returns
    the table {batch: {terms: median s/step}} and transformers' {batch: median s/step}."""
    runs = len(args.batches) * args.repeats * (len(args.terms) + 1)
    table: dict[int, dict[int, float]] = {}
    baselines: dict[int, float] = {}
    with progress(total=runs, desc="bench_latency", unit="run") as bar:
        for batch in args.batches:
            samples: dict[str, list[float]] = {}
            for _ in range(args.repeats):
                bar.set_postfix_str(f"batch {batch}, transformers")
                samples.setdefault("transformers", []).append(
                    transformers_decode_seconds(*hf, batch, args.tokens))
                bar.update()
                for num_terms in args.terms:
                    bar.set_postfix_str(f"batch {batch}, {num_terms} terms")
                    samples.setdefault(f"lmarith {num_terms}-term", []).append(
                        lmarith_decode_seconds(llm, formula_with_terms(model, num_terms), batch,
                                               args.tokens))
                    bar.update()
            medians = {name: statistics.median(values) for name, values in samples.items()}
            table[batch] = {t: medians[f"lmarith {t}-term"] for t in args.terms}
            baselines[batch] = medians["transformers"]
            with tqdm.external_write_mode(file=sys.stdout):
                report(batch, medians, *machine, header=batch == args.batches[0])
    return table, baselines


def report(batch: int, medians: dict[str, float], weight_bytes: int, bandwidth: float,
           header: bool = False) -> None:
    """The batch's markdown rows: each variant's median ms/step, tok/s, and ratio."""
    if header:
        print("| batch | variant | ms/step | tok/s | ratio |")
        print("|---|---|---|---|---|")
    single = medians.get("lmarith 1-term")
    for name, seconds in medians.items():
        if single is None:
            ratio = ""
        elif name == "transformers":
            ratio = f"lmarith 1-term is {seconds / single:.2f}x faster"
        else:
            ratio = f"{seconds / single:.2f}x single-model step"
        print(f"| {batch} | {name} | {seconds * 1e3:.1f} | {batch / seconds:.1f} | {ratio} |")
    roofline = bandwidth / weight_bytes
    share = f"lmarith 1-term at {100 / (roofline * single):.0f}% of the step roofline" \
        if single else ""
    print(f"| {batch} | roofline (weights read once per step) | {1e3 / roofline:.1f} | "
          f"{batch * roofline:.1f} | {share} |", flush=True)


if __name__ == "__main__":
    main()
