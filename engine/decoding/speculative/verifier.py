"""Batched exact verification: every speculative request's open positions evaluated in one
composer call, filtered (temperature, top-k, top-p, min-p) like the sampler, then checked
against the laws their tokens were drawn from by one spec_accept call over the batch."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ...bindings.ops import filtered_log_probs, spec_accept
from ...sampling_params import SamplingParams
from ..composer import compose
from ..sampler import DecodeRow, sampling_tensors
from .laws import Law


@dataclass
class VerifyRow:
    """One request's turn: the laws (and term logits) at its verified positions and at its
    next position (bonus, None when not ready), the proposals with their old laws."""

    laws: list[Law]                          # one per verified position, then the bonus's
    term_logits: list[dict[int, torch.Tensor]]
    proposals: list[int]
    old_laws: list[Optional[torch.Tensor]]   # None: a point-mass proposal (n-gram)
    has_bonus: bool
    params: SamplingParams
    seed: int
    step: int


@dataclass
class VerifyResult:
    num_accepted: int
    next_token: Optional[int]                # the resampled token, or the bonus (if any)
    new_laws: list[torch.Tensor]             # filtered law at each evaluated position


def _law_logits(law: Law, logits: dict[int, torch.Tensor], filler: torch.Tensor) -> list[torch.Tensor]:
    return [logits.get(slot, filler) for slot in law.slots]


def _evaluate(rows: Sequence[VerifyRow]) -> list[torch.Tensor]:
    """Filtered log-probs [positions, V] per row, all rows in one compose call."""
    filler = torch.zeros_like(next(iter(rows[0].term_logits[0].values())))
    flat = [(row, law, logits) for row in rows for law, logits in zip(row.laws, row.term_logits)]
    log_probs = compose([law.formula for _, law, _ in flat], [law.plan for _, law, _ in flat],
                        [_law_logits(law, logits, filler) for _, law, logits in flat])
    decode_rows = [DecodeRow(law.formula, law.plan, [], row.params, row.seed, row.step)
                   for row, law, _ in flat]
    temperature, top_k, top_p, min_p, _, _ = sampling_tensors(decode_rows, log_probs.shape[-1],
                                                              log_probs.device)
    filtered = filtered_log_probs(log_probs, temperature, top_k, top_p, min_p)
    return list(torch.split(filtered, [len(row.laws) for row in rows]))


def _point_mass(token: int, vocab: int, device: torch.device) -> torch.Tensor:
    law = torch.full((vocab,), float("-inf"), device=device)
    law[token] = 0.0
    return law


def verify(rows: Sequence[VerifyRow]) -> list[VerifyResult]:
    """Accepted counts and next tokens for rows over one vocabulary size."""
    laws = _evaluate(rows)
    vocab, device = laws[0].shape[-1], laws[0].device
    width = max(1, max(len(row.proposals) for row in rows))
    target = torch.full((len(rows), width + 1, vocab), float("-inf"), device=device)
    draft = torch.full((len(rows), width, vocab), float("-inf"), device=device)
    tokens = torch.zeros(len(rows), width, dtype=torch.int64)
    for b, (row, new) in enumerate(zip(rows, laws)):
        n = len(row.proposals)
        target[b, : new.shape[0]] = new
        if not row.has_bonus:          # a stand-in bonus row; its token is ignored
            target[b, n] = new[max(0, n - 1)]
        for j, (token, old) in enumerate(zip(row.proposals, row.old_laws)):
            draft[b, j] = old if old is not None else _point_mass(token, vocab, device)
            tokens[b, j] = token
    controls = (torch.tensor([len(r.proposals) for r in rows], dtype=torch.int32),
                torch.tensor([r.seed for r in rows], dtype=torch.int64),
                torch.tensor([r.step for r in rows], dtype=torch.int64),
                torch.tensor([r.params.temperature <= 0 for r in rows]))
    accepted, next_token = spec_accept(target, draft, tokens.to(device),
                                       *(c.to(device) for c in controls))
    accepted, next_token = accepted.tolist(), next_token.tolist()
    results = []
    for b, row in enumerate(rows):
        count = accepted[b]
        settled = count < len(row.proposals) or row.has_bonus
        results.append(VerifyResult(count, next_token[b] if settled else None, list(laws[b])))
    return results
