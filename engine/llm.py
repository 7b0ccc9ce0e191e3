"""LLM: the public, vLLM-like entry point. generate() decodes batches, stream() yields text as
it comes, agenerate()/astream() are the asyncio faces; all of them, from any number of
threads or tasks, feed one engine loop, so concurrent callers are batched together."""
from __future__ import annotations

import asyncio
import itertools
import queue
import weakref
from typing import AsyncIterator, Callable, Iterator, Optional, Sequence, Union

from .config import EngineConfig, ModelSpec
from .core import EngineLoop, LLMEngine, NewRequest, RequestUpdate, Subscriber
from .core.request_builder import check_formula, check_prompt
from .errors import FormulaError, PromptError, SamplingParamsError
from .formula import Formula, Model
from .kv_cache import kv_budget
from .outputs import EngineStats, RequestOutput, StreamChunk
from .sampling_params import SamplingParams

Conversation = list[dict[str, str]]            # [{"role": "user", "content": "..."}, ...]
Prompt = Union[str, Conversation]
Prompts = Union[Prompt, Sequence[Prompt]]
Formulas = Union[Formula, Sequence[Formula]]
Params = Union[SamplingParams, Sequence[SamplingParams], None]


def _model_spec(model: Union[Model, ModelSpec, str]) -> ModelSpec:
    if isinstance(model, ModelSpec):
        return model
    if isinstance(model, Model):
        return model.spec
    return ModelSpec(model)


class LLM:
    """Serves formulas over several models with one shared paged KV cache.

    kv_cache_bytes: the KV budget shared by every model (None: kv_cache_fraction of the memory
    free now); max_num_seqs: running requests at once; max_num_batched_tokens: tokens computed
    per step (longer prompts are chunked); page_tokens: tokens per KV page of the largest
    model; models: models to load now, so the pool's pages are sized for all of them;
    tensor_parallel_size: ranks each model is sharded over (processes on CPU, one GPU each on
    CUDA); kv_cache_bytes and num_threads are then per rank; kv_cache_dtype: "auto" (each
    model's dtype), "float32" or "bfloat16" (half the KV bytes of a float32 model).
    """

    def __init__(self, kv_cache_bytes: Optional[int] = 1 << 30, max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 2048, page_tokens: int = 16, device: str = "cpu",
                 kv_cache_fraction: float = 0.2, models: Sequence[Union[Model, ModelSpec, str]] = (),
                 num_threads: Optional[int] = None, tensor_parallel_size: int = 1,
                 kv_cache_dtype: str = "auto") -> None:
        config = EngineConfig(kv_budget(kv_cache_bytes, kv_cache_fraction, device), max_num_seqs,
                              max_num_batched_tokens, page_tokens, device, num_threads,
                              tensor_parallel_size, kv_cache_dtype)
        self.config = config
        self.engine = LLMEngine(config, [_model_spec(m) for m in models])
        self._loop = EngineLoop(self.engine)
        self._ids = itertools.count()
        self._finalizer = weakref.finalize(self, self._loop.close)

    def close(self) -> None:
        """Stop the engine thread; unfinished requests fail with RequestAbortedError."""
        self._finalizer()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def stats(self) -> EngineStats:
        """Pages, queues and counters, read between two engine steps."""
        return self._loop.call(self.engine.stats).result()

    def _new_requests(self, prompts: Prompts, formula: Formulas,
                      params: Params) -> list[NewRequest]:
        """Check the call's inputs (types, formulas, prompts) before anything loads or queues."""
        if isinstance(prompts, str) or _is_conversation(prompts):
            prompts = [prompts]
        elif not isinstance(prompts, (list, tuple)):
            raise PromptError(f"prompts must be a str, a conversation (list of messages) or a "
                              f"list of them, got {type(prompts).__name__}")
        formulas = list(formula) if isinstance(formula, (list, tuple)) else [formula] * len(prompts)
        if len(formulas) != len(prompts):
            raise FormulaError(f"got {len(prompts)} prompts but {len(formulas)} formulas; give one "
                               "formula, or one per prompt")
        params = SamplingParams() if params is None else params
        many = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(many) != len(prompts):
            raise SamplingParamsError(f"got {len(prompts)} prompts but {len(many)} SamplingParams; "
                                      "give one, or one per prompt")
        for item in many:
            if not isinstance(item, SamplingParams):
                raise SamplingParamsError(f"params must be a SamplingParams (or one per prompt), "
                                          f"got {type(item).__name__}")
        max_terms = self.config.max_num_batched_tokens
        return [NewRequest(str(next(self._ids)), check_prompt(p), check_formula(f, max_terms), sp)
                for p, f, sp in zip(prompts, formulas, many)]

    def _abort_unfinished(self, requests) -> None:
        """Cancel the requests of a call that ended early (an error, an interrupt)."""
        for request in requests:
            if not request.is_finished:
                self._loop.abort(request)

    def _load(self, requests: list[NewRequest]) -> None:
        self.engine.load_models(t.spec for r in requests for t in r.formula.terms)

    def generate(self, prompts: Prompts, formula: Formulas,
                 params: Params = None) -> list[RequestOutput]:
        """Decode every prompt (each with its formula and params, or one for all) to completion."""
        news = self._new_requests(prompts, formula, params)
        if not news:
            return []
        self._load(news)
        inboxes = [queue.SimpleQueue() for _ in news]
        subscribers = [Subscriber(inbox.put, final_only=True) for inbox in inboxes]
        requests = self._loop.submit(news, subscribers).result()
        try:
            return [_final(inbox.get) for inbox in inboxes]
        finally:
            self._abort_unfinished(requests)

    def stream(self, prompt: Prompt, formula: Formula,
               params: Optional[SamplingParams] = None) -> Iterator[StreamChunk]:
        """Yield text as it is generated; the last chunk carries the finish reason. Checks and
        queues the request now; closing the iterator early cancels it."""
        news = self._new_requests(_one_prompt(prompt), _one_formula(formula), params)
        self._load(news)
        inbox: queue.SimpleQueue = queue.SimpleQueue()
        [request] = self._loop.submit(news, [Subscriber(inbox.put)]).result()
        return self._chunks(inbox, request)

    def _chunks(self, inbox: queue.SimpleQueue, request) -> Iterator[StreamChunk]:
        try:
            while True:
                update = inbox.get()
                yield _chunk(update)
                if update.output is not None:
                    return
        finally:
            self._loop.abort(request)

    async def agenerate(self, prompts: Prompts, formula: Formulas,
                        params: Params = None) -> list[RequestOutput]:
        """generate() for asyncio: waits without blocking the event loop; cancelling aborts."""
        news = self._new_requests(prompts, formula, params)
        if not news:
            return []
        await asyncio.to_thread(self._load, news)
        inboxes, sinks = _async_inboxes(len(news))
        subscribers = [Subscriber(sink, final_only=True) for sink in sinks]
        requests = await asyncio.wrap_future(self._loop.submit(news, subscribers))
        try:
            return [await _afinal(inbox) for inbox in inboxes]
        finally:
            self._abort_unfinished(requests)

    async def astream(self, prompt: Prompt, formula: Formula,
                      params: Optional[SamplingParams] = None) -> AsyncIterator[StreamChunk]:
        """stream() for asyncio (what the HTTP server uses); cancelling aborts the request."""
        news = self._new_requests(_one_prompt(prompt), _one_formula(formula), params)
        await asyncio.to_thread(self._load, news)
        [inbox], [sink] = _async_inboxes(1)
        [request] = await asyncio.wrap_future(self._loop.submit(news, [Subscriber(sink)]))
        try:
            while True:
                update = await inbox.get()
                yield _chunk(update)
                if update.output is not None:
                    return
        finally:
            self._loop.abort(request)


def _is_conversation(prompts) -> bool:
    """A list of message dicts is one conversation, not a batch of prompts."""
    return isinstance(prompts, list) and bool(prompts) and all(isinstance(m, dict) for m in prompts)


def _one_prompt(prompt):
    if not (isinstance(prompt, str) or _is_conversation(prompt)):
        raise PromptError(f"stream() takes one prompt (a string or a conversation), got "
                          f"{type(prompt).__name__}; use generate() for a batch")
    return prompt


def _one_formula(formula) -> Formula:
    if isinstance(formula, (list, tuple)):
        raise FormulaError("stream() takes one formula, not a list; use generate() for a batch")
    return formula


def _chunk(update: RequestUpdate) -> StreamChunk:
    """The update's chunk, or its request's error raised in the caller."""
    if update.error is not None and update.output.finish_reason != "abort":
        raise update.error
    return update.chunk


def _final(get: Callable[[], RequestUpdate]) -> RequestOutput:
    """The final output (the only update a final_only subscriber gets), or its error raised."""
    update = get()
    _chunk(update)
    return update.output


async def _afinal(inbox: asyncio.Queue) -> RequestOutput:
    update = await inbox.get()
    _chunk(update)
    return update.output


def _async_inboxes(count: int) -> tuple[list[asyncio.Queue], list[Callable[[RequestUpdate], None]]]:
    """asyncio queues for updates posted from the engine thread."""
    loop = asyncio.get_running_loop()
    inboxes = [asyncio.Queue() for _ in range(count)]
    return inboxes, [lambda update, q=inbox: loop.call_soon_threadsafe(q.put_nowait, update)
                     for inbox in inboxes]
