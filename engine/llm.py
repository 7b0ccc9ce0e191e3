"""LLM: the public, vLLM-like entry point: generate() for batches, stream() for one prompt."""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence, Union

from .engine import LLMEngine
from .kv_cache import kv_budget
from .formula import Formula
from .request import Request
from .sampling_params import SamplingParams


@dataclass
class RequestOutput:
    """The result of one prompt."""

    request_id: str
    prompt: str
    text: str
    token_ids: list[int]
    finish_reason: Optional[str]
    num_preemptions: int = 0


@dataclass
class StreamChunk:
    """New text and tokens since the previous chunk; finish_reason set on the last one."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: Optional[str] = None


def _output(request: Request) -> RequestOutput:
    return RequestOutput(request.request_id, request.prompt, request.text, list(request.output_ids),
                         request.finish_reason, request.num_preemptions)


class LLM:
    """Serves formulas over several models with one shared paged KV cache.

    kv_cache_bytes: the KV budget shared by every model (None: kv_cache_fraction of the memory
    free when the LLM is made); max_num_seqs: running requests at
    once; max_num_batched_tokens: tokens computed per step (longer prompts are chunked).
    """

    def __init__(self, kv_cache_bytes: Optional[int] = 1 << 30, max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 2048, page_tokens: int = 16, device: str = "cpu",
                 kv_cache_fraction: float = 0.2) -> None:
        if max_num_seqs < 1 or max_num_batched_tokens < 1 or page_tokens < 1:
            raise ValueError("max_num_seqs, max_num_batched_tokens and page_tokens must be >= 1")
        budget = kv_budget(kv_cache_bytes, kv_cache_fraction, device)
        self.engine = LLMEngine(budget, max_num_seqs, max_num_batched_tokens, page_tokens, device)
        self._ids = itertools.count()

    def generate(self, prompts: Union[str, Sequence[str]], formula: Union[Formula, Sequence[Formula]],
                 params: Optional[SamplingParams] = None) -> list[RequestOutput]:
        """Decode every prompt (each with its formula, or one formula for all) to completion."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        formulas = list(formula) if isinstance(formula, (list, tuple)) else [formula] * len(prompts)
        if len(formulas) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(formulas)} formulas")
        params = params or SamplingParams()
        self.engine.prepare_models(formulas)
        requests = [self.engine.build_request(str(next(self._ids)), p, f, params)
                    for p, f in zip(prompts, formulas)]
        for request in requests:
            self.engine.scheduler.add(request)
        try:
            while any(not r.is_finished for r in requests):
                self.engine.step()
        finally:
            for request in requests:
                self.engine.abort(request)
        return [_output(r) for r in requests]

    def stream(self, prompt: str, formula: Formula,
               params: Optional[SamplingParams] = None) -> Iterator[StreamChunk]:
        """Yield text as it is generated; the last chunk carries the finish reason.

        Text that could be the start of a stop string is held back until it is not."""
        request = self.engine.add_request(str(next(self._ids)), prompt, formula,
                                          params or SamplingParams())
        held_back = max((len(stop) - 1 for stop in request.params.stop), default=0)
        sent_chars, sent_tokens = 0, 0
        try:
            while not request.is_finished:
                self.engine.step()
                done = request.is_finished
                if request.text.endswith("\ufffd") and not done:
                    continue
                ready = len(request.text) if done else max(sent_chars, len(request.text) - held_back)
                if len(request.output_ids) > sent_tokens or done:
                    yield StreamChunk(request.text[sent_chars:ready], request.output_ids[sent_tokens:],
                                      request.finish_reason)
                    sent_chars, sent_tokens = ready, len(request.output_ids)
        finally:
            self.engine.abort(request)
