"""Combine and sample on vocabulary shards (tensor parallelism): each rank holds every term's
logits for its token ids [start, end) only. The rule is exactly `sample(combine(...))` of
kernels/reference.py; what crosses ranks is per-row statistics, never logits:
  - each term's log-sum-exp, and the combined scores': an all-reduce of row maxima, then of
    sums of exponentials;
  - the plausibility mask's row maximum (masked plans only);
  - top-k: each rank's k best scaled scores (the k-th best overall is the threshold);
  - min-p: the row maximum of the scaled scores;
  - the race: each rank's best key and its token id; the best over ranks wins, ties going
    to the lowest id, as in one pass over the whole vocabulary.
Rows that need more (top-p, logprobs) gather their logits instead."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from lmarith.kernels.reference import _safe_temperature, gumbel, plan_scores

from ..distributed import Communicator, VocabRange
from ..formula import Plan, stack_plans
from ..sampling_params import SamplingParams

NEG_INF = float("-inf")


@dataclass
class ShardRow:
    """One request's draw on shards: where each term's logits row lies in this step's
    per-model shard logits (model key, row), and how to draw."""

    term_rows: list[tuple[object, int]]
    plan: Plan
    temperature: float
    top_k: int
    min_p: float
    seed: int
    step: int


def can_shard(plan: Optional[Plan], params: SamplingParams) -> bool:
    """True when the row's draw runs on shards: a fused plan, no top-p, no logprobs."""
    return plan is not None and params.top_p >= 1.0 and params.logprobs is None


def log_softmax(logits: torch.Tensor, comm: Communicator) -> torch.Tensor:
    """log-softmax over the WHOLE vocabulary of the last axis, from this rank's shard of it
    (+inf entries and all -inf rows give NaN, as `scores - logsumexp(scores)` does)."""
    logits = logits.float()
    empty = logits.new_full(logits.shape[:-1], NEG_INF)
    local_max = logits.amax(dim=-1) if logits.shape[-1] else empty
    row_max = comm.all_reduce(local_max.clone(), "max")
    shift = torch.where(torch.isfinite(row_max), row_max, 0.0)
    sums = comm.all_reduce(torch.exp(logits - shift[..., None]).sum(dim=-1), "sum")
    return logits - (shift + torch.log(sums))[..., None]


def draw(logits: torch.Tensor, rows: list[ShardRow], vocab: VocabRange,
         comm: Communicator) -> list[int]:
    """The token of every row; logits [T, B, Vshard] stacked in rows' term order (zeros where
    a row has fewer terms: its plan gives them weight 0). Every rank calls this together."""
    plan_tensors = stack_plans([row.plan for row in rows], device=logits.device)
    reduce_max = lambda values: comm.all_reduce(values.contiguous(), "max")  # noqa: E731
    scores = plan_scores(log_softmax(logits, comm), *plan_tensors, reduce_max=reduce_max)
    scores = log_softmax(scores, comm)          # the composed law, as combine returns it
    column = lambda values, dtype: torch.tensor(values, dtype=dtype, device=logits.device)  # noqa: E731
    temperature = column([r.temperature for r in rows], torch.float32)
    scaled = scores / _safe_temperature(temperature)
    keep = torch.isfinite(scaled)
    keep &= _top_k_keep(scaled, [r.top_k for r in rows], comm)
    keep &= _min_p_keep(scaled.masked_fill(~keep, NEG_INF), [r.min_p for r in rows], comm)
    seeds, steps = column([r.seed for r in rows], torch.int64), column([r.step for r in rows], torch.int64)
    noise = gumbel(seeds, steps, vocab.size, vocab.start)
    keys = torch.where(keep, scaled + noise, NEG_INF)
    keys = torch.where((temperature > 0)[:, None], keys, scores)
    return _best_over_ranks(keys, vocab, comm)


def _top_k_keep(scaled: torch.Tensor, top_k: list[int], comm: Communicator) -> torch.Tensor:
    """Keep scaled >= the k-th largest over the whole vocabulary (k <= 0: keep all)."""
    keep = torch.ones_like(scaled, dtype=torch.bool)
    k_max = max(top_k)
    if k_max <= 0:
        return keep
    local = torch.full((scaled.shape[0], k_max), NEG_INF, device=scaled.device)
    best = torch.topk(scaled, min(k_max, scaled.shape[-1]), dim=-1).values
    local[:, : best.shape[-1]] = best
    pooled = torch.sort(torch.cat(comm.all_gather(local), dim=-1), dim=-1, descending=True).values
    for row, k in enumerate(top_k):
        if k > 0:
            keep[row] = scaled[row] >= pooled[row, k - 1]
    return keep


def _min_p_keep(masked: torch.Tensor, min_p: list[float], comm: Communicator) -> torch.Tensor:
    """Keep p(x) >= min_p * max p, as scaled(x) - max scaled >= log(min_p)."""
    if max(min_p) <= 0:
        return torch.ones_like(masked, dtype=torch.bool)
    empty = masked.new_full((masked.shape[0], 1), NEG_INF)
    local_max = masked.amax(dim=-1, keepdim=True) if masked.shape[-1] else empty
    row_max = comm.all_reduce(local_max.contiguous(), "max")
    ratio = torch.tensor(min_p, dtype=torch.float32, device=masked.device)[:, None]
    return torch.exp(masked - row_max) >= ratio


def _best_over_ranks(keys: torch.Tensor, vocab: VocabRange, comm: Communicator) -> list[int]:
    """argmax over the whole vocabulary of keys split over ranks (lowest id among ties)."""
    if keys.shape[-1]:
        values, index = keys.max(dim=-1)
    else:
        values = keys.new_full((keys.shape[0],), NEG_INF)
        index = torch.zeros(keys.shape[0], dtype=torch.int64, device=keys.device)
    local = torch.stack([values.double(), (index + vocab.start).double()], dim=-1)
    pooled = torch.stack(comm.all_gather(local))          # [ranks, B, 2], ranks in id order
    winner = pooled[:, :, 0].argmax(dim=0)                 # first rank holding the maximum
    tokens = pooled[winner, torch.arange(keys.shape[0]), 1]
    return [int(token) for token in tokens.tolist()]
