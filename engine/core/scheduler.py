"""Scheduler: waiting and running requests, all-or-nothing admission across a request's
terms, chunked prefill under a token budget, preemption (free + recompute later) of the
newest request when pages run out; and postprocess, which does all of a step's bookkeeping:
commit pages, pick tokens (compose + sample), append them, detokenize, stop, free."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..decoding import DecodeRow, Sampled, next_tokens
from ..errors import CacheExhaustedError
from ..kv_cache import BlockManager
from .request import Request, RequestStatus
from .sequence import Sequence
from . import nudging
from .speculation import due_counts, logits_wanted, propose, settle, store_logits


@dataclass
class SchedulerCounters:
    """Running totals for EngineStats; they outlive a scheduler when the pool is rebuilt."""

    preemptions: int = 0
    tokens_generated: int = 0
    prefix_cache_hit_tokens: int = 0
    proposed_tokens: int = 0
    accepted_tokens: int = 0


@dataclass
class ScheduledBatch:
    """What one step computes: (sequence, new token count, logits rows wanted) per request,
    and which (non-speculative) requests have all their terms' last positions computed, so
    sample a token."""

    work: list[tuple[Request, list[tuple[Sequence, int, int]]]] = field(default_factory=list)
    sampling: list[Request] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.work


class Scheduler:
    """Continuous batching over requests whose terms may live on several models."""

    def __init__(self, block_manager: BlockManager, copy_page: Callable[[int, int], None],
                 max_num_seqs: int, max_num_batched_tokens: int,
                 counters: Optional[SchedulerCounters] = None,
                 decode: Callable[[list[DecodeRow]], list] = next_tokens) -> None:
        self.block_manager = block_manager
        self.copy_page = copy_page
        self.decode = decode            # next_tokens, or the tensor-parallel draw on shards
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.counters = counters or SchedulerCounters()

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
            if not self.block_manager.can_allocate(request.sequences):
                break
            self.waiting.popleft()
            self._admit(request)
            if request.nudging is not None and not self._reserve_admitted(request):
                break
            budget = self._plan_request(request, budget, batch)
        return batch

    def _admit(self, request: Request) -> None:
        for seq in request.sequences:
            seq.num_computed = self.block_manager.allocate(seq)
            self.counters.prefix_cache_hit_tokens += seq.num_computed
            if request.num_preemptions == 0:
                request.metrics.cached_prompt_tokens += min(seq.num_computed, seq.prompt_len)
        request.status = RequestStatus.RUNNING
        self.running.append(request)

    def _reserve_admitted(self, request: Request) -> bool:
        """A just-admitted nudging request takes the pages its sides' tokens need beyond the
        prompt, or goes back to the queue's head untouched: it never preempts others, whose
        work may already be planned this step."""
        try:
            nudging.reserve(request, self.block_manager, self.copy_page)
            return True
        except CacheExhaustedError:
            self._requeue(request)
            return False

    def _reserve_decode(self, request: Request) -> bool:
        """Give every term its newly sampled tokens and room for them, preempting newer
        requests if needed. Returns False when the request itself had to be preempted."""
        if request.speculation is not None:
            propose(request)
        while True:
            try:
                if request.nudging is not None:
                    nudging.reserve(request, self.block_manager, self.copy_page)
                    return True
                drawn = request.drawn_ids
                for seq in request.sequences:
                    new = drawn[seq.num_generated:]
                    if new:
                        for source, target in self.block_manager.ensure_capacity(seq, len(new)):
                            self.copy_page(source, target)
                        seq.token_ids.extend(new)
                return True
            except CacheExhaustedError:
                victim = max(self.running, key=lambda r: r.arrival)
                self.preempt(victim)
                if victim is request:
                    return False

    def _plan_request(self, request: Request, budget: int, batch: ScheduledBatch) -> int:
        """Schedule the request's uncomputed tokens within budget; returns the budget left."""
        if request.speculation is not None:
            return self._plan_speculative(request, budget, batch)
        if request.nudging is not None:
            work = nudging.plan_work(request, budget)
            if work:
                batch.work.append((request, work))
            return budget - sum(count for _, count, _ in work)
        remaining = [seq.num_uncomputed for seq in request.sequences]
        if sum(remaining) <= budget:
            counts, samples = remaining, True
        else:
            share = budget // len(remaining)
            counts, samples = [min(left - 1, share) for left in remaining], False
        if sum(counts) == 0:
            return budget
        wanted = 1 if samples else 0
        batch.work.append((request, [(seq, n, wanted) for seq, n in zip(request.sequences, counts)
                                     if n > 0]))
        if samples:
            batch.sampling.append(request)
        return budget - sum(counts)

    def _plan_speculative(self, request: Request, budget: int, batch: ScheduledBatch) -> int:
        """The terms due this step (chunked to the budget); logits for unverified positions."""
        counts = due_counts(request)
        due = sum(1 for count in counts if count)
        if due == 0 or budget <= 0:
            return budget
        if sum(counts) > budget:
            counts = [min(count, max(1, budget // due)) for count in counts]
        batch.work.append((request, [(seq, n, logits_wanted(request, seq, n))
                                     for seq, n in zip(request.sequences, counts) if n > 0]))
        return budget - sum(counts)

    def postprocess(self, batch: ScheduledBatch, logits: dict[Sequence, torch.Tensor],
                    failed: dict[Request, BaseException]) -> list[Request]:
        """All bookkeeping after the forwards; returns the requests whose output changed."""
        speculative, nudged = [], []
        for request, work in batch.work:
            if request in failed:
                self.finish(request, "error", failed[request])
                continue
            request.metrics.forward_passes += 1
            for seq, count, _ in work:
                seq.num_computed += count
                request.metrics.term_forward_passes[request.sequences.index(seq)] += 1
                if request.nudging is not None:
                    slot = request.sequences.index(seq)
                    settled = nudging.settled_length(request, slot)
                    self.block_manager.commit(seq, min(seq.num_computed, settled))
                elif request.speculation is None:
                    self.block_manager.commit(seq, seq.num_computed)
            if request.nudging is not None:
                nudged.append(request)
            if request.speculation is not None:
                store_logits(request, work, logits)
                speculative.append(request)
        sampling = [r for r in batch.sampling if not r.is_finished]
        rows = [DecodeRow(r.formula, r.plan, [logits[seq][-1] for seq in r.sequences], r.params,
                          r.seed, len(r.output_ids), r.classifier and r.classifier.at(r.output_ids))
                for r in sampling]
        for request, token in zip(sampling, self.decode(rows) if rows else []):
            self._take_token(request, token)
        if speculative:
            self._settle(speculative)
        if nudged:
            nudging.advance(nudged, logits, self._take_piece, self.finish)
        return [request for request, _ in batch.work]

    def _settle(self, requests: list[Request]) -> None:
        """Verify and draw for the speculative requests; hash only their verified pages."""
        proposed, accepted = settle(requests, self.block_manager, self._take_token)
        self.counters.proposed_tokens += proposed
        self.counters.accepted_tokens += accepted
        for request in requests:
            if request.is_finished:
                continue
            for seq in request.sequences:
                verified = seq.prompt_len + len(request.output_ids)
                self.block_manager.commit(seq, min(seq.num_computed, verified))

    def _take_token(self, request: Request, token) -> None:
        """Append a token, an int or a Sampled with its logprobs (or fail the request with
        the exception it raised)."""
        try:
            if isinstance(token, BaseException):
                raise token
            self.counters.tokens_generated += 1
            reason = (request.append_token(token.token, token) if isinstance(token, Sampled)
                      else request.append_token(token))
        except Exception as error:  # this request fails alone
            self.finish(request, "error", error)
            return
        if reason is not None:
            self.finish(request, reason)

    def _take_piece(self, request: Request, token_ids: list[int], text: str) -> None:
        """Append a piece of a nudging answer (or fail the request with what it raised)."""
        try:
            self.counters.tokens_generated += len(token_ids)
            reason = request.append_piece(token_ids, text)
        except Exception as error:  # this request fails alone
            self.finish(request, "error", error)
            return
        if reason is not None:
            self.finish(request, reason)

    def preempt(self, request: Request) -> None:
        """Free all the request's pages; it re-enters the queue first and recomputes later."""
        self._requeue(request)
        request.num_preemptions += 1
        self.counters.preemptions += 1

    def _requeue(self, request: Request) -> None:
        """Back to the head of the queue with no pages, to be recomputed when admitted."""
        for seq in request.sequences:
            if self.block_manager.is_live(seq):
                self.block_manager.preempt(seq)
            seq.reset(request.output_ids if request.nudging is None else [])
        if request.spec_state is not None:
            request.spec_state.reset()
        self.running.remove(request)
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)

    def finish(self, request: Request, reason: str, error: Optional[BaseException] = None) -> None:
        """Mark done and return every page (in reverse order, so prefixes stay cached longest)."""
        for seq in request.sequences:
            if self.block_manager.is_live(seq):
                self.block_manager.free(seq)
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.mark_finished(reason, error)
