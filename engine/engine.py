"""LLMEngine: loads models, owns the shared KV pool, validates and admits requests, and runs
steps: one batched forward per model, then the fused combine and sample kernels."""
from __future__ import annotations

import itertools
import random
from typing import Iterable, Optional

import torch

from .block_manager import BlockManager, CacheExhaustedError, PagedSequence
from .formula import Formula, FormulaError, Model
from .formula_ops import Classifier
from .kv_cache import KVCachePool
from .model_runner import ForwardItem, ModelRunner
from .plan import compile_plan, stack_plans
from .request import Request, TermSequence
from .sampler import combine_and_sample
from .sampling_params import SamplingParams
from .scheduler import Scheduler
from .tokenization import check_same_vocabulary, eos_token_ids, term_context_ids


class PromptError(ValueError):
    """A prompt the engine cannot serve (empty, or longer than a model's context)."""


def model_key(model: Model) -> str:
    return f"{model.path}|{model.dtype}"


class LLMEngine:
    """The engine loop behind lmarith.LLM."""

    def __init__(self, kv_cache_bytes: int, max_num_seqs: int, max_num_batched_tokens: int,
                 page_tokens: int = 16, device: str = "cpu") -> None:
        self.kv_cache_bytes = kv_cache_bytes
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.page_tokens = page_tokens
        self.device = device
        self.runners: dict[str, ModelRunner] = {}
        self.pool: Optional[KVCachePool] = None
        self.block_manager: Optional[BlockManager] = None
        self.scheduler: Optional[Scheduler] = None
        self._arrivals = itertools.count()
        self._seed_source = random.Random()
        self._vocabulary_checked: set[tuple[Model, ...]] = set()

    def prepare_models(self, formulas: Iterable[Formula]) -> None:
        """Load every model the formulas use; (re)build the KV pool while the engine is idle."""
        missing = {t.model for f in formulas for t in f.terms if model_key(t.model) not in self.runners}
        if not missing and self.pool is not None:
            return
        if self.scheduler is not None and self.scheduler.has_unfinished():
            raise RuntimeError("new models can only be loaded while no request is running; "
                               "finish the running requests first")
        for model in sorted(missing, key=model_key):
            self.runners[model_key(model)] = ModelRunner(model, self.device)
        configs = {key: runner.config for key, runner in self.runners.items()}
        self.pool = KVCachePool(self.kv_cache_bytes, configs, self.page_tokens, self.device)
        self.block_manager = BlockManager(self.pool.num_pages)
        self.scheduler = Scheduler(self.block_manager, self.pool.copy_page, self.max_num_seqs,
                                   self.max_num_batched_tokens)

    def add_request(self, request_id: str, prompt: str, formula: Formula,
                    params: SamplingParams) -> Request:
        """Validate everything a user can get wrong, then queue the request."""
        request = self.build_request(request_id, prompt, formula, params)
        self.scheduler.add(request)
        return request

    def build_request(self, request_id: str, prompt: str, formula: Formula,
                       params: SamplingParams) -> Request:
        """A validated Request, not yet queued: callers can check a whole batch before queueing any."""
        params.validate()
        formula.validate()
        if any(isinstance(node, Classifier) for node in formula.nodes()):
            raise FormulaError("Classifier formulas run in lmarith.reference.generate only for now")
        if not isinstance(prompt, str) or not prompt:
            raise PromptError("the prompt is empty; give at least one character of text")
        if len(formula.terms) > self.max_num_batched_tokens:
            raise ValueError(f"the formula has {len(formula.terms)} terms but max_num_batched_tokens is "
                             f"{self.max_num_batched_tokens}; raise it to at least the number of terms")
        self.prepare_models([formula])
        runners = {t.model: self.runners[model_key(t.model)] for t in formula.terms}
        models = tuple(sorted(runners, key=model_key))
        if models not in self._vocabulary_checked:
            check_same_vocabulary({model: runners[model].tokenizer for model in models})
            self._vocabulary_checked.add(models)
        sequences = [self._term_sequence(term, runners[term.model], prompt, params)
                     for term in formula.terms]
        first = runners[formula.terms[0].model]
        seed = params.seed if params.seed is not None else self._seed_source.getrandbits(63)
        request = Request(request_id, prompt, formula, compile_plan(formula), params, seed, sequences,
                          frozenset(eos_token_ids(first.tokenizer, None) | set(first.config.eos_token_ids)),
                          next(self._arrivals))
        if request.pages_needed() > self.pool.num_pages:
            raise CacheExhaustedError(
                f"request {request_id} needs {request.pages_needed()} KV pages for its prompt and "
                f"max_tokens across {len(sequences)} terms, but the pool has {self.pool.num_pages}; "
                "raise kv_cache_bytes or lower max_tokens")
        return request

    def _term_sequence(self, term, runner: ModelRunner, prompt: str,
                       params: SamplingParams) -> TermSequence:
        context = term_context_ids(term, runner.tokenizer, prompt)
        if len(context) + params.max_tokens > runner.max_context:
            raise PromptError(
                f"term {term} has a {len(context)}-token context; with max_tokens="
                f"{params.max_tokens} it exceeds the model's {runner.max_context}-token window; "
                "shorten the prompt or lower max_tokens")
        key = model_key(term.model)
        paged = PagedSequence(key, self.pool.views[key].page_size, list(context))
        return TermSequence(term, key, paged, prompt_len=len(context))

    def has_unfinished(self) -> bool:
        return self.scheduler is not None and self.scheduler.has_unfinished()

    def step(self) -> list[Request]:
        """Run one step; returns the requests that sampled a token in it."""
        batch = self.scheduler.schedule()
        if batch.is_empty:
            raise CacheExhaustedError("no request could be scheduled: the KV pool is too small for "
                                      "the waiting request; raise kv_cache_bytes")
        logits = self._forward_all(batch)
        for _, work in batch.work:
            for seq, count in work:
                seq.num_computed += count
                self.block_manager.commit(seq.paged, seq.num_computed)
        if batch.sampling:
            tokens = combine_and_sample(batch.sampling, logits)
            for request, token in zip(batch.sampling, tokens):
                self._append(request, token)
        return batch.sampling

    def _forward_all(self, batch) -> dict[TermSequence, torch.Tensor]:
        """One batched forward per model over every scheduled sequence using it."""
        by_model: dict[str, list[tuple[TermSequence, ForwardItem]]] = {}
        sampling = set(map(id, batch.sampling))
        for request, work in batch.work:
            for seq, count in work:
                item = ForwardItem(seq.paged.token_ids, seq.paged.block_table, seq.num_computed,
                                   count, num_logits=1 if id(request) in sampling else 0)
                by_model.setdefault(seq.model_key, []).append((seq, item))
        logits: dict[TermSequence, torch.Tensor] = {}
        for key, pairs in by_model.items():
            rows = self.runners[key].execute([item for _, item in pairs], self.pool.views[key])
            wanting = [seq for seq, item in pairs if item.num_logits]
            logits.update(zip(wanting, rows))
        return logits

    def _append(self, request: Request, token: int) -> None:
        """Every term appends the sampled token; check EOS, stop strings and max_tokens."""
        request.output_ids.append(token)
        for seq in request.sequences:
            seq.pending = token
        tokenizer = self.runners[request.sequences[0].model_key].tokenizer
        request.text = tokenizer.decode(request.output_ids, skip_special_tokens=True)
        reason = None
        if token in request.eos_token_ids and not request.params.ignore_eos:
            reason = "stop"
        for stop in request.params.stop:
            cut = request.text.find(stop)
            if cut >= 0:
                request.text, reason = request.text[:cut], "stop"
        if reason is None and len(request.output_ids) >= request.params.max_tokens:
            reason = "length"
        if reason is not None:
            self.scheduler.finish(request, reason)

    def abort(self, request: Request) -> None:
        """Drop a request and free its pages (a client went away)."""
        if not request.is_finished:
            self.scheduler.finish(request, "abort")
