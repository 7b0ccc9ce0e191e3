"""From each request's term logits to its next token: compose the formula, then draw with the
fused sample kernel (temperature, top-k, top-p, min-p, an exponential race keyed by
(seed, step, token), so a request's draws do not depend on its batch). A failure is
isolated: the batch is retried row by row and only the failing rows get an exception."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from ..bindings.ops import sample
from ..formula import Formula, Plan
from ..sampling_params import SamplingParams
from .classifier import ClassifierInput
from .composer import compose


@dataclass
class DecodeRow:
    """One request's turn to pick a token: its formula, plan, term logits [V] in
    formula.terms order, sampling parameters, seed and step (tokens generated so far); and
    for a formula with Classifier terms what they read (prompt text, generated tokens)."""

    formula: Formula
    plan: Optional[Plan]
    term_logits: list[torch.Tensor]
    params: SamplingParams
    seed: int
    step: int
    classifier: Optional[ClassifierInput] = None


@dataclass
class Sampled:
    """A drawn token, with its log-prob under the row's composed law and the most likely
    alternatives (token, log-prob) when the request asked for logprobs."""

    token: int
    logprob: Optional[float] = None
    top: Optional[list[tuple[int, float]]] = None


def sampling_tensors(rows: Sequence[DecodeRow], vocab_size: int, device: torch.device):
    """Per-row kernel controls; top_k beyond the vocabulary means off (0), never an overflow."""
    params = [row.params for row in rows]
    columns = ((torch.float32, [p.temperature for p in params]),
               (torch.int32, [p.top_k if p.top_k <= vocab_size else 0 for p in params]),
               (torch.float32, [p.top_p for p in params]), (torch.float32, [p.min_p for p in params]),
               (torch.int64, [row.seed for row in rows]), (torch.int64, [row.step for row in rows]))
    return tuple(torch.tensor(values, dtype=dtype, device=device) for dtype, values in columns)


def _draw(rows: Sequence[DecodeRow]) -> list[Sampled]:
    log_probs = compose([r.formula for r in rows], [r.plan for r in rows], [r.term_logits for r in rows],
                        [r.classifier for r in rows])
    tokens = sample(log_probs, *sampling_tensors(rows, log_probs.shape[-1], log_probs.device)).tolist()
    drawn = [Sampled(token) for token in tokens]
    for index, row in enumerate(rows):
        wanted = row.params.logprobs
        if wanted is not None:
            law = log_probs[index]
            top = torch.topk(law, min(wanted, law.shape[-1])) if wanted else None
            drawn[index].logprob = float(law[tokens[index]])
            drawn[index].top = list(zip(top.indices.tolist(), top.values.tolist())) if top else []
    return drawn


def next_tokens(rows: Sequence[DecodeRow]) -> list[Union[Sampled, Exception]]:
    """A token per row, in order, or the exception that row raised; rows are grouped by
    vocabulary size, and a failing group is redone row by row to find the culprits."""
    groups: dict[int, list[int]] = {}
    for index, row in enumerate(rows):
        groups.setdefault(row.term_logits[0].shape[-1], []).append(index)
    results: list[Union[Sampled, Exception]] = [Sampled(0)] * len(rows)
    for indices in groups.values():
        try:
            drawn: list[Union[Sampled, Exception]] = _draw([rows[i] for i in indices])
        except Exception:
            drawn = [_draw_alone(rows[i]) for i in indices]
        for index, token in zip(indices, drawn):
            results[index] = token
    return results


def _draw_alone(row: DecodeRow) -> Union[Sampled, Exception]:
    try:
        return _draw([row])[0]
    except Exception as error:  # reported to this request's caller only
        return error
