"""combine + sample on CPU: the fused C++ kernels (lmarith.bindings.ops) against the torch
eager chain one would write by hand, and against kernels/reference.py.

Workload: T=3 models, B=16 rows, V=49152; formula 1*m0 - 0.6*m1 + 2*Union(m0, m2)
(a linear block plus one max-group); temperature 0.8, top_p 0.9, top_k 0 (off), min_p 0.
--plausible wraps it in contrastive decoding's plausibility mask, Plausible(formula, m0, 0.1),
which the fused kernels evaluate in the same call.
Each repeat runs every implementation once, in alternating order, and the table reports
medians. Run: python benchmarks/bench_kernels.py [--repeats N] [--threads N] [--plausible]
On a shared, loaded machine set OMP_WAIT_POLICY=passive: torch and lmarith._C share one
libgomp whose spinning idle workers otherwise fight other processes for the cores.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Callable

import torch

from lmarith.bindings import cpp, ops
from lmarith.kernels import reference

NUM_TERMS, BATCH, VOCAB = 3, 16, 49152
LINEAR = (1.0, -0.6)
UNION_COEF = 2.0
TEMPERATURE, TOP_P, TOP_K, MIN_P = 0.8, 0.9, 0, 0.0
MASK_ALPHA = 0.1
PLAUSIBLE = False   # set by --plausible


def make_logits(seed: int) -> torch.Tensor:
    """LLM-like logits: Gaussian spread of 3 with a few strongly preferred tokens per row."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(NUM_TERMS, BATCH, VOCAB, generator=gen) * 3.0
    boosted = torch.randint(VOCAB, (NUM_TERMS, BATCH, 8), generator=gen)
    logits.scatter_add_(2, boosted, torch.full(boosted.shape, 6.0))
    return logits


def make_plan() -> tuple[torch.Tensor, ...]:
    """Plan tensors for LINEAR[0]*m0 + LINEAR[1]*m1 + UNION_COEF * max(m0, m2)."""
    weights = torch.zeros(BATCH, 3, NUM_TERMS)
    weights[:, 0, 0], weights[:, 0, 1] = LINEAR
    weights[:, 1, 0] = 1.0
    weights[:, 2, 2] = 1.0
    consts = torch.zeros(BATCH, 3)
    coefs = torch.full((BATCH, 1), UNION_COEF)
    kinds = torch.ones(BATCH, 1, dtype=torch.int32)
    if not PLAUSIBLE:
        return weights, consts, coefs, kinds
    mask_weights = torch.zeros(BATCH, NUM_TERMS)
    mask_weights[:, 0] = 1.0
    return weights, consts, coefs, kinds, mask_weights, torch.full((BATCH,), math.log(MASK_ALPHA))


def make_controls(step: int) -> tuple[torch.Tensor, ...]:
    return (torch.full((BATCH,), TEMPERATURE), torch.full((BATCH,), TOP_K, dtype=torch.int32),
            torch.full((BATCH,), TOP_P), torch.full((BATCH,), MIN_P),
            torch.arange(BATCH, dtype=torch.int64) + 1234, torch.full((BATCH,), step, dtype=torch.int64))


def eager_combine(logits: torch.Tensor) -> torch.Tensor:
    """The formula written directly in torch: per-model log_softmax, weighted sum, max, norm."""
    log_probs = torch.log_softmax(logits, dim=-1)
    value = LINEAR[0] * log_probs[0] + LINEAR[1] * log_probs[1]
    value = value + UNION_COEF * torch.maximum(log_probs[0], log_probs[2])
    if PLAUSIBLE:
        probs = log_probs[0].exp()
        plausible = probs >= MASK_ALPHA * probs.max(dim=-1, keepdim=True).values
        value = value.masked_fill(~plausible, float("-inf"))
    scores = value / (LINEAR[0] + LINEAR[1] + UNION_COEF)
    return scores - torch.logsumexp(scores, dim=-1, keepdim=True)


def nucleus(log_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort-based top-p: sorted probabilities (zeroed outside the nucleus) and their ids."""
    probs = torch.softmax(log_probs / TEMPERATURE, dim=-1)
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    return sorted_probs.masked_fill(mass_before >= TOP_P, 0.0), order


def eager_sample(log_probs: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    kept, order = nucleus(log_probs)
    choice = torch.multinomial(kept, 1, generator=gen)
    return order.gather(-1, choice).squeeze(-1)


def median_ms(samples: list[float]) -> float:
    return 1e3 * statistics.median(samples)


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def run(repeats: int) -> None:
    logits = make_logits(0)
    plan = make_plan()
    gen = torch.Generator().manual_seed(0)
    stages = {name: {"combine": [], "sample": []} for name in ("eager", "reference", "fused")}

    def run_eager(step: int) -> None:
        seconds, log_probs = timed(lambda: eager_combine(logits))
        stages["eager"]["combine"].append(seconds)
        seconds, _ = timed(lambda: eager_sample(log_probs, gen))
        stages["eager"]["sample"].append(seconds)

    def run_reference(step: int) -> None:
        seconds, (log_probs, _) = timed(lambda: reference.combine(logits, *plan))
        stages["reference"]["combine"].append(seconds)
        seconds, _ = timed(lambda: reference.sample(log_probs, *make_controls(step)))
        stages["reference"]["sample"].append(seconds)

    def run_fused(step: int) -> None:
        seconds, (log_probs, _) = timed(lambda: ops.combine(logits, *plan))
        stages["fused"]["combine"].append(seconds)
        controls = make_controls(step)
        seconds, _ = timed(lambda: ops.sample(log_probs, *controls))
        stages["fused"]["sample"].append(seconds)

    runners = [run_eager, run_reference, run_fused]
    for warmup in range(2):
        for runner in runners:
            runner(warmup)
    for stage in stages.values():
        stage["combine"].clear()
        stage["sample"].clear()
    for step in range(repeats):
        order = runners if step % 2 == 0 else runners[::-1]
        for runner in order:
            runner(step)

    formula = "1*m0 - 0.6*m1 + 2*Union(m0, m2)"
    formula = f"Plausible({formula}, m0, {MASK_ALPHA})" if PLAUSIBLE else formula
    print(f"T={NUM_TERMS} B={BATCH} V={VOCAB}  formula {formula}  "
          f"temperature={TEMPERATURE} top_p={TOP_P} top_k={TOP_K} (off) min_p={MIN_P}")
    print(f"torch threads={torch.get_num_threads()}  _C OpenMP={cpp._C.built_with_openmp()}  "
          f"repeats={repeats} (median ms)")
    print(f"{'implementation':<16}{'combine':>10}{'sample':>10}{'total':>10}")
    totals = {}
    for name, stage in stages.items():
        combine_ms, sample_ms = median_ms(stage["combine"]), median_ms(stage["sample"])
        per_repeat = [a + b for a, b in zip(stage["combine"], stage["sample"])]
        totals[name] = median_ms(per_repeat)
        print(f"{name:<16}{combine_ms:>10.2f}{sample_ms:>10.2f}{totals[name]:>10.2f}")
    for baseline in ("eager", "reference"):
        ratios = [
            median_ms(stages[baseline][part]) / median_ms(stages["fused"][part])
            for part in ("combine", "sample")
        ]
        print(f"speed-up of fused over {baseline}: total {totals[baseline] / totals['fused']:.1f}x "
              f"(combine {ratios[0]:.1f}x, sample {ratios[1]:.1f}x)")


def sanity_check() -> None:
    """The three chains agree: same log-probs, fused tokens equal the reference's, and every
    drawn token lies in the eager nucleus."""
    logits = make_logits(1)
    plan = make_plan()
    eager = eager_combine(logits)
    fused, _ = ops.combine(logits, *plan)
    ref, _ = reference.combine(logits, *plan)
    finite = torch.isfinite(eager)
    print(f"sanity: max |fused - eager| log-prob {(fused - eager)[finite].abs().max().item():.2e}, "
          f"max |fused - reference| {(fused - ref)[finite].abs().max().item():.2e}, -inf patterns "
          f"equal: {torch.equal(torch.isinf(fused), torch.isinf(eager))}")
    kept, order = nucleus(eager)
    in_nucleus = torch.zeros_like(eager, dtype=torch.bool).scatter_(1, order, kept > 0)
    mismatches, outside, drawn = 0, 0, 0
    for step in range(20):
        tokens = ops.sample(fused, *make_controls(step))
        mismatches += int((tokens != reference.sample(fused, *make_controls(step))).sum())
        eager_tokens = eager_sample(eager, torch.Generator().manual_seed(step))
        for batch_tokens in (tokens, eager_tokens):
            outside += int((~in_nucleus.gather(1, batch_tokens[:, None])).sum())
            drawn += BATCH
    print(f"sanity: fused vs reference token mismatches {mismatches} of {20 * BATCH}; "
          f"tokens outside the eager nucleus {outside} of {drawn}; "
          f"mean nucleus size {(kept > 0).sum(-1).float().mean().item():.0f} tokens")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: default)")
    parser.add_argument("--plausible", action="store_true", help="add the plausibility mask")
    args = parser.parse_args()
    global PLAUSIBLE
    PLAUSIBLE = args.plausible
    if args.threads:
        torch.set_num_threads(args.threads)
    if not ops.cpp_available():
        raise SystemExit("lmarith._C is not built; run pip install --no-build-isolation -e .")
    sanity_check()
    run(args.repeats)


if __name__ == "__main__":
    main()
