"""LLMEngine: one step is schedule -> execute (one forward per model) -> postprocess, with
all bookkeeping in the scheduler. The engine also admits submissions (a batch of requests,
validated all-or-none) and owns the KV pool's life: a model loaded while requests run joins
the existing pool when its KV fits a page; otherwise the submission waits until the running
requests finish and the pool is rebuilt, so no running request ever loses its cache.
Everything but load_models runs on the engine loop's thread."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence as Seq, Union

import torch

from ..config import EngineConfig, ModelSpec
from ..decoding import next_tokens
from ..decoding.vocab_shards import can_shard
from ..errors import CacheExhaustedError, RequestAbortedError
from ..kv_cache import BlockManager
from ..outputs import EngineStats
from ..worker import ForwardItem, ParallelWorker, Worker
from .request import Request
from .request_builder import NewRequest, RequestBuilder
from .scheduler import ScheduledBatch, Scheduler
from .sequence import Sequence

Accepted = Callable[[Union[list[Request], BaseException]], None]


def needs_full_logits(request: Request) -> bool:
    """With tensor parallelism: True when a request's logits must be gathered whole (its
    draw uses more than the per-row statistics the shards reduce: speculation, nudging,
    formulas without a fused plan, classifiers, top-p, logprobs)."""
    return (request.speculation is not None or request.nudging is not None
            or request.classifier is not None or not can_shard(request.plan, request.params))


@dataclass
class Submission:
    """Requests that are queued together or not at all; `accepted` gets the Requests or the
    validation error, on the loop thread."""

    requests: list[NewRequest]
    accepted: Accepted


class LLMEngine:
    """Models, KV pool, scheduler and the step loop behind lmarith.LLM."""

    def __init__(self, config: EngineConfig, models: Seq[ModelSpec] = ()) -> None:
        self.config = config
        self.worker = ParallelWorker(config) if config.tensor_parallel_size > 1 else Worker(config)
        self.builder = RequestBuilder(self.worker)
        self.scheduler: Optional[Scheduler] = None
        self._deferred: deque[Submission] = deque()
        if models:
            try:
                self.load_models(models)
                self._new_pool()
            except BaseException:
                self.worker.shutdown()
                raise

    def load_models(self, specs: Iterable[ModelSpec]) -> None:
        """Load models (all or none); any thread, without stalling the running requests."""
        self.worker.load(specs)

    def has_unfinished(self) -> bool:
        return bool(self._deferred) or (self.scheduler is not None and self.scheduler.has_unfinished())

    def submit(self, submission: Submission) -> None:
        """Validate and queue a submission now, or once a needed pool rebuild can happen."""
        try:
            ready = not self._deferred and self._pool_ready(submission)
        except Exception as error:  # e.g. a model that fails to load: nothing was queued
            submission.accepted(error)
            return
        if ready:
            self._accept(submission)
        else:
            self._deferred.append(submission)
            self._admit_deferred()

    def _pool_ready(self, submission: Submission) -> bool:
        """Load the submission's models; True when the current pool can hold their KV."""
        specs = [t.spec for r in submission.requests for t in r.formula.terms]
        self.worker.load(specs)
        if self.worker.needs_new_pool(specs):
            return False
        self.worker.attach(specs)
        return True

    def _accept(self, submission: Submission) -> None:
        try:
            requests = [self.builder.build(new) for new in submission.requests]
        except Exception as error:  # nothing of the submission was queued
            submission.accepted(error)
            return
        for request in requests:
            self.scheduler.add(request)
        submission.accepted(requests)

    def _admit_deferred(self) -> None:
        """Rebuild the pool for waiting submissions once no request holds pages."""
        if self.scheduler is not None and self.scheduler.has_unfinished():
            return
        while self._deferred:
            submission = self._deferred.popleft()
            try:
                if not self._pool_ready(submission):
                    self._new_pool()
            except Exception as error:
                submission.accepted(error)
                continue
            self._accept(submission)

    def _new_pool(self) -> None:
        """A new arena and a scheduler over it (the running totals carry over)."""
        pool = self.worker.build_pool()
        counters = self.scheduler.counters if self.scheduler is not None else None
        decode = self.worker.next_tokens if isinstance(self.worker, ParallelWorker) else next_tokens
        self.scheduler = Scheduler(BlockManager(pool.num_pages), self.worker.copy_page,
                                   self.config.max_num_seqs, self.config.max_num_batched_tokens,
                                   counters, decode)

    def step(self) -> list[Request]:
        """Run one step; returns the requests whose output changed."""
        batch = self.scheduler.schedule() if self.scheduler is not None else ScheduledBatch()
        changed: list[Request] = []
        if not batch.is_empty:
            logits, failed = self._execute(batch)
            changed = self.scheduler.postprocess(batch, logits, failed)
        elif self.scheduler is not None and self.scheduler.waiting:
            changed = self._fail_unschedulable()
        self._admit_deferred()
        return changed

    def _execute(self, batch: ScheduledBatch
                 ) -> tuple[dict[Sequence, torch.Tensor], dict[Request, BaseException]]:
        """One forward per model; each sequence that wants logits gets its rows, and every
        request with a term on a model whose forward raised is reported as failed."""
        work: dict[ModelSpec, list[tuple[Request, Sequence, ForwardItem]]] = {}
        parallel = self.config.tensor_parallel_size > 1
        for request, pieces in batch.work:
            full = not parallel or needs_full_logits(request)
            for seq, count, wanted in pieces:
                item = ForwardItem(seq.token_ids, seq.block_table, seq.num_computed, count,
                                   num_logits=wanted, full_logits=full)
                work.setdefault(seq.model, []).append((request, seq, item))
        results = self.worker.execute_items({spec: [item for _, _, item in entries]
                                             for spec, entries in work.items()})
        logits: dict[Sequence, torch.Tensor] = {}
        failed: dict[Request, BaseException] = {}
        for spec, entries in work.items():
            blocks = results[spec]
            if isinstance(blocks, BaseException):
                failed.update((request, blocks) for request, _, _ in entries)
                continue
            for (_, seq, item), block in zip(entries, blocks):
                if item.num_logits:
                    logits[seq] = block
        return logits, failed

    def _fail_unschedulable(self) -> list[Request]:
        """The oldest waiting request cannot get pages even with nothing else running."""
        if self.scheduler.running:
            return []
        request = self.scheduler.waiting[0]
        self.scheduler.finish(request, "error", CacheExhaustedError(
            f"request {request.request_id} could not be scheduled: the KV pool is too small; "
            "raise kv_cache_bytes"))
        return [request]

    def close(self) -> None:
        """Release the worker (stops tensor-parallel ranks); after fail_all."""
        self.worker.shutdown()

    def abort(self, request: Request) -> None:
        """Drop a request and free its pages (a client went away)."""
        if not request.is_finished:
            self.scheduler.finish(request, "abort", RequestAbortedError(
                f"request {request.request_id} was aborted"))

    def fail_all(self, error: BaseException) -> list[Request]:
        """Fail every queued and running request (after an unexpected engine failure)."""
        scheduler = self.scheduler
        doomed = [] if scheduler is None else list(scheduler.running) + list(scheduler.waiting)
        for request in doomed:
            scheduler.finish(request, "error", error)
        while self._deferred:
            self._deferred.popleft().accepted(error)
        return doomed

    def stats(self) -> EngineStats:
        """A snapshot of pages, queues and counters."""
        stats = EngineStats(forward_calls=dict(self.worker.forward_calls))
        if self.scheduler is None:
            return stats
        manager, pool = self.scheduler.block_manager, self.worker.pool
        stats.kv_pages_total, stats.kv_pages_free = manager.num_pages, manager.num_free_pages
        stats.kv_pages_cached = manager.num_cached_free_pages
        stats.requests_running = len(self.scheduler.running)
        deferred = sum(len(submission.requests) for submission in self._deferred)
        stats.requests_waiting = len(self.scheduler.waiting) + deferred
        counters = self.scheduler.counters
        stats.preemptions, stats.tokens_generated = counters.preemptions, counters.tokens_generated
        stats.prefix_cache_hit_tokens = counters.prefix_cache_hit_tokens
        stats.proposed_tokens, stats.accepted_tokens = counters.proposed_tokens, counters.accepted_tokens
        stats.kv_page_tokens = {spec: view.page_size for spec, view in pool.views.items()}
        return stats
