"""Tensor parallelism on one machine: decode tokens/s and per-rank memory at tensor parallel
sizes 1 and 2, alternated in one run and printed as ratios, with what the ranks' collectives
cost per step (calls, bytes, seconds waited on rank 0). Each size above 1 runs twice: with
the shared-memory collectives (the default on CPU) and over gloo alone (LMARITH_TP_SHM=0).

The model is SmolLM2-135M's shape (30 layers, hidden 576, MLP 1536, its tokenizer and 49152
-token vocabulary) with random weights and 8 query / 4 KV heads, because SmolLM2's own 9 / 3
heads do not split over 2 ranks (`--model PATH` takes any model whose heads do). Every
size gets the same total threads (--threads, split over the ranks): on a 2-core CPU expect
no speed-up, only the cost of the collectives; on a GPU machine (--device cuda) each rank
gets its own GPU.

    python benchmarks/bench_tp.py [--sizes 1 2] [--batches 1 8] [--tokens 32] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import lmarith as la  # noqa: E402

PROMPT = "Tell me about the history of the city of Paris and its famous buildings."


def smollm2_shaped(directory: Path) -> Path:
    """A random Llama of SmolLM2-135M's size with 8/4 heads, and SmolLM2's tokenizer."""
    import transformers
    from lmarith.embedded import embedded_model_dir

    source = embedded_model_dir("float32")
    config = transformers.AutoConfig.from_pretrained(source)
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = 8, 4, 72
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory)
    transformers.AutoTokenizer.from_pretrained(source).save_pretrained(directory)
    return directory


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def weight_bytes(llm: la.LLM) -> int:
    """Bytes of rank 0's share of the weights (every rank holds the same share)."""
    tensors = {}
    for runner in llm.engine.worker.runners.values():
        for module in runner.model.modules():          # parameters, buffers, packed weights
            for value in list(module._parameters.values()) + list(module._buffers.values()) + \
                    list(vars(module).values()):
                if isinstance(value, torch.Tensor) and not value.is_mkldnn:
                    tensors[value.data_ptr()] = value.numel() * value.element_size()
                elif isinstance(value, torch.Tensor):
                    tensors[id(value)] = value.numel() * value.element_size()
    return sum(tensors.values())


def decode_rate(llm: la.LLM, model: la.Model, batch: int, tokens: int) -> tuple[float, float]:
    """(tokens/s, seconds) of one batch decoding `tokens` tokens each, greedy, after prefill."""
    params = la.SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    llm.generate([PROMPT] * batch, model, la.SamplingParams(temperature=0, max_tokens=1))
    start = time.perf_counter()
    outputs = llm.generate([PROMPT] * batch, model, params)
    seconds = time.perf_counter() - start
    return sum(len(o.token_ids) for o in outputs) / seconds, seconds


def comm_per_step(llm: la.LLM, model: la.Model, batch: int) -> str:
    """Rank 0's collectives per decode step: a 24-token run minus an 8-token run (same
    prompts, so the prefill cancels), over the 16 extra steps."""
    worker = llm.engine.worker
    if not hasattr(worker, "rank"):
        return "-"
    stats = worker.rank.comm.stats
    totals = []
    for tokens in (8, 24):
        before = (stats.calls, stats.bytes, stats.seconds)
        decode_rate(llm, model, batch, tokens)
        totals.append((stats.calls - before[0], stats.bytes - before[1], stats.seconds - before[2]))
    calls, sent, waited = (b - a for a, b in zip(*totals))
    return f"{calls / 16:.0f} collectives, {sent / 16 / 1024:.1f} KiB, {waited / 16 * 1e3:.2f} ms waited"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--no-gloo", action="store_true",
                        help="skip the gloo-only runs (LMARITH_TP_SHM=0) of each size above 1")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="total threads, split evenly over the ranks")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", help="a Hugging Face directory (default: SmolLM2-shaped, random)")
    args = parser.parse_args()
    path = Path(args.model) if args.model else smollm2_shaped(Path(tempfile.mkdtemp()))
    model = la.Model(str(path))
    base_rss = rss_bytes(os.getpid())
    engines = {}
    for size in args.sizes:
        variants = [("shm", "1"), ("gloo", "0")] if size > 1 and not args.no_gloo else [("", "1")]
        for transport, shm in variants:
            os.environ["LMARITH_TP_SHM"] = shm          # read by each rank as its group forms
            engines[f"{size} {transport}".strip()] = la.LLM(
                kv_cache_bytes=64 << 20, models=[model], device=args.device,
                tensor_parallel_size=size, num_threads=max(1, args.threads // size))
    os.environ.pop("LMARITH_TP_SHM")
    report_memory(engines, base_rss)
    rates = {(name, batch): [] for name in engines for batch in args.batches}
    for _ in range(args.repeats):                       # alternate the engines in every round
        for batch in args.batches:
            for name, llm in engines.items():
                rates[name, batch].append(decode_rate(llm, model, batch, args.tokens)[0])
    baseline = next(iter(engines))
    print(f"\ndecode tokens/s (median of {args.repeats}, {args.tokens} tokens, {args.threads} threads "
          f"in all), ratio to tensor parallel size {baseline}; collectives per step on rank 0")
    print(f"{'size':>8} {'batch':>5} {'tok/s':>8} {'ratio':>6}  communication per decode step")
    for batch in args.batches:
        for name, llm in engines.items():
            median = statistics.median(rates[name, batch])
            ratio = median / statistics.median(rates[baseline, batch])
            print(f"{name:>8} {batch:>5} {median:8.1f} {ratio:6.2f}  {comm_per_step(llm, model, batch)}")
    for llm in engines.values():
        llm.close()


def report_memory(engines: dict, base_rss: int) -> None:
    """Each size's weights per rank, and the resident memory of each rank's process."""
    print(f"{'size':>8} {'weights/rank':>13}  resident memory per rank process")
    for size, llm in engines.items():
        worker = llm.engine.worker
        others = [rss_bytes(p.pid) for p in getattr(worker, "processes", [])]
        ranks = ", ".join(f"{b / 2**20:.0f} MiB" for b in others)
        print(f"{size:>8} {weight_bytes(llm) / 2**20:10.0f} MiB  "
              f"{'ranks 1..: ' + ranks if ranks else 'rank 0 only (in this process)'}")
    print(f"     this process (rank 0 of every size): {(rss_bytes(os.getpid()) - base_rss) / 2**20:.0f} MiB "
          "added since start")


if __name__ == "__main__":
    main()
