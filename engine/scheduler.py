"""Scheduler: waiting and running requests, all-or-nothing admission across a request's
terms, chunked prefill under a token budget, and preemption (free + recompute later)
of the newest request when pages run out."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from .block_manager import BlockManager, CacheExhaustedError
from .request import Request, RequestStatus, TermSequence


@dataclass
class ScheduledBatch:
    """What one step computes: (term sequence, new token count) per request, and which
    requests have all their terms' last positions computed, so sample a token."""

    work: list[tuple[Request, list[tuple[TermSequence, int]]]] = field(default_factory=list)
    sampling: list[Request] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.work


class Scheduler:
    """Continuous batching over requests whose terms may live on several models."""

    def __init__(self, block_manager: BlockManager, copy_page: Callable[[int, int], None],
                 max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.block_manager = block_manager
        self.copy_page = copy_page
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        """Pick this step's work: running requests first (oldest first), then admissions."""
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        for request in sorted(self.running, key=lambda r: r.arrival):
            if request.status is RequestStatus.RUNNING and self._reserve_decode(request):
                budget = self._plan_request(request, budget, batch)
        while self.waiting and len(self.running) < self.max_num_seqs and budget > 0:
            request = self.waiting[0]
            if not self.block_manager.can_allocate([seq.paged for seq in request.sequences]):
                break
            self.waiting.popleft()
            self._admit(request)
            budget = self._plan_request(request, budget, batch)
        return batch

    def _admit(self, request: Request) -> None:
        for seq in request.sequences:
            seq.num_computed = self.block_manager.allocate(seq.paged)
        request.status = RequestStatus.RUNNING
        self.running.append(request)

    def _reserve_decode(self, request: Request) -> bool:
        """Give every term room for its pending token, preempting newer requests if needed.

        Returns False when the request itself had to be preempted."""
        while True:
            try:
                for seq in request.sequences:
                    if seq.pending is not None:
                        for source, target in self.block_manager.ensure_capacity(seq.paged, 1):
                            self.copy_page(source, target)
                        seq.paged.token_ids.append(seq.pending)
                        seq.pending = None
                return True
            except CacheExhaustedError:
                victim = max(self.running, key=lambda r: r.arrival)
                self.preempt(victim)
                if victim is request:
                    return False

    def _plan_request(self, request: Request, budget: int, batch: ScheduledBatch) -> int:
        """Schedule the request's uncomputed tokens within budget; returns the budget left."""
        remaining = [seq.num_uncomputed for seq in request.sequences]
        if sum(remaining) <= budget:
            counts, samples = remaining, True
        else:
            share = budget // len(remaining)
            counts, samples = [min(left - 1, share) for left in remaining], False
        if sum(counts) == 0:
            return budget
        batch.work.append((request, [(seq, n) for seq, n in zip(request.sequences, counts) if n > 0]))
        if samples:
            batch.sampling.append(request)
        return budget - sum(counts)

    def preempt(self, request: Request) -> None:
        """Free all the request's pages; it re-enters the queue first and recomputes later."""
        for seq in request.sequences:
            if self.block_manager.is_live(seq.paged):
                self.block_manager.preempt(seq.paged)
            seq.reset(request.output_ids)
        self.running.remove(request)
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.waiting.appendleft(request)

    def finish(self, request: Request, reason: str) -> None:
        """Mark done and return every page (in reverse order, so prefixes stay cached longest)."""
        for seq in request.sequences:
            if self.block_manager.is_live(seq.paged):
                self.block_manager.free(seq.paged)
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
