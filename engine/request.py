"""Request (one prompt under one formula) and TermSequence (one term's tokens and pages)."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional

from .block_manager import PagedSequence
from .formula import Formula, Term
from .plan import Plan
from .sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class TermSequence:
    """One term of a request: its model's context + generated tokens and KV pages.

    paged.token_ids holds every token scheduled so far; num_computed of them have KV in
    the cache; a sampled token waits in `pending` until the next step schedules it.
    """

    term: Term
    model_key: str
    paged: PagedSequence
    prompt_len: int
    num_computed: int = 0
    pending: Optional[int] = None

    @property
    def num_uncomputed(self) -> int:
        return len(self.paged.token_ids) - self.num_computed

    def reset(self, generated: list[int]) -> None:
        """Back to a fresh prefill over context + all generated tokens (after preemption)."""
        context = self.paged.token_ids[: self.prompt_len]
        self.paged.token_ids = context + list(generated)
        self.pending = None
        self.num_computed = 0


@dataclass(eq=False)
class Request:
    """One prompt decoded under one formula; every term appends the same sampled tokens."""

    request_id: str
    prompt: str
    formula: Formula
    plan: Optional[Plan]
    params: SamplingParams
    seed: int
    sequences: list[TermSequence]
    eos_token_ids: frozenset[int]
    arrival: int
    output_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: Optional[str] = None
    text: str = ""
    num_preemptions: int = 0

    @property
    def terms(self) -> tuple[Term, ...]:
        return tuple(seq.term for seq in self.sequences)

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def pages_needed(self) -> int:
        """Pages all terms need for their prompt plus max_tokens (the request's worst case)."""
        return sum(seq.paged.pages_needed(seq.prompt_len + self.params.max_tokens) for seq in self.sequences)
