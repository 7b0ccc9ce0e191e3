"""From per-term logits to one token per request: stack the terms' logits, evaluate every
request's formula with the fused combine kernel, and draw with the fused sample kernel."""
from __future__ import annotations

import torch

from .bindings.ops import combine, sample
from .plan import stack_plans
from .request import Request


def _log_probs(requests: list[Request], logits: dict) -> torch.Tensor:
    """Normalised log-probs [B, V] of each request's formula on its terms' logits."""
    num_terms = max(len(r.sequences) for r in requests)
    filler = torch.zeros_like(logits[requests[0].sequences[0]])
    stacked = torch.stack([
        torch.stack([logits[r.sequences[slot]] if slot < len(r.sequences) else filler for r in requests])
        for slot in range(num_terms)])
    planned = [row for row, r in enumerate(requests) if r.plan is not None]
    result = torch.empty(len(requests), stacked.shape[-1], dtype=torch.float32, device=stacked.device)
    if planned:
        plans = stack_plans([requests[row].plan for row in planned], device=stacked.device)
        result[planned] = combine(stacked[:, planned].contiguous(), *plans)[0]
    for row, request in enumerate(requests):
        if request.plan is None:
            terms = len(request.sequences)
            result[row] = request.formula.log_probs(stacked[:terms, row: row + 1])[0]
    return result


def _sampling_tensors(requests: list[Request], device: torch.device):
    """Per-row sampling parameters as tensors on the logits' device."""
    params = [r.params for r in requests]
    columns = ((torch.float32, [p.temperature for p in params]), (torch.int32, [p.top_k for p in params]),
               (torch.float32, [p.top_p for p in params]), (torch.float32, [p.min_p for p in params]),
               (torch.int64, [r.seed for r in requests]), (torch.int64, [len(r.output_ids) for r in requests]))
    return tuple(torch.tensor(values, dtype=dtype, device=device) for dtype, values in columns)


def combine_and_sample(requests: list[Request], logits: dict) -> list[int]:
    """Tokens for the requests, in order; requests are grouped by vocabulary size."""
    groups: dict[int, list[int]] = {}
    for index, request in enumerate(requests):
        groups.setdefault(logits[request.sequences[0]].shape[-1], []).append(index)
    tokens = [0] * len(requests)
    for indices in groups.values():
        members = [requests[i] for i in indices]
        log_probs = _log_probs(members, logits)
        drawn = sample(log_probs, *_sampling_tensors(members, log_probs.device))
        for index, token in zip(indices, drawn.tolist()):
            tokens[index] = token
    return tokens
