"""What a request does on the engine: pick its formula (a preset, or the body's `formula`
parsed against the server's models), make one SamplingParams per sample (seed + i when n > 1),
then either await every output (`LLM.agenerate`) or open one `LLM.astream` per sample and
stream their chunks merged. A client that disconnects cancels its engine requests at once,
streamed or not, so its KV pages go back to everyone else."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Mapping, Optional, Sequence, TypeVar

import anyio
from starlette.requests import Request

from ...errors import LmarithError, SamplingParamsError
from ...formula import Formula, Model, parse_formula
from ...sampling_params import SamplingParams
from .errors import APIError, from_exception
from .protocol import DEFAULT_MAX_TOKENS, ChatCompletionRequest, SamplingFields

MAX_N = 128
T = TypeVar("T")


class ClientGone(Exception):
    """The client closed its connection before the answer was ready."""


@dataclass
class Target:
    """The formula a request runs and the name it answers with."""

    model: str
    formula: Formula
    formula_param: Optional[str]     # "formula" when the body gave one (names it in errors)


class FormulaResolver:
    """Presets by name, and body formulas parsed against the server's models (cached by text).
    A body formula may use only the server's models: a client cannot make it load files."""

    def __init__(self, models: Mapping[str, Model], presets: Mapping[str, Formula]) -> None:
        self.models, self.presets = dict(models), dict(presets)
        self.served = {model.spec for model in self.models.values()}
        self._parsed: dict[str, Formula] = {}

    def resolve(self, body: SamplingFields) -> Target:
        if body.model not in self.presets:
            raise APIError(404, f"the model {body.model!r} does not exist; this server serves "
                                f"{', '.join(sorted(self.presets)) or 'nothing'} (GET /v1/models)",
                           param="model", code="model_not_found")
        if body.formula is None:
            return Target(body.model, self.presets[body.model], None)
        return Target(body.model, self.parse(body.formula), "formula")

    def parse(self, text: str) -> Formula:
        formula = self._parsed.get(text)
        if formula is None:
            try:
                formula = parse_formula(text, self.models)
                unknown = sorted(str(spec) for spec in {t.spec for t in formula.terms} - self.served)
            except (LmarithError, ValueError, TypeError) as error:
                raise APIError(400, str(error), param="formula", code="invalid_formula") from None
            if unknown:
                raise APIError(400, f"formula: the model(s) {', '.join(unknown)} are not served here; "
                                    f"use one of {', '.join(self.models)}",
                               param="formula", code="model_not_served")
            if len(self._parsed) > 1024:
                self._parsed.clear()
            self._parsed[text] = formula
        return formula


def sampling_params(body: SamplingFields, logprobs: Optional[int]) -> list[SamplingParams]:
    """One SamplingParams per choice; with a seed, choice i gets seed + i."""
    if body.n < 1 or body.n > MAX_N:
        raise APIError(400, f"n must be an integer from 1 to {MAX_N}, got {body.n}", param="n")
    bad = body.unsupported()
    if bad is not None:
        raise APIError(400, f"{bad} is not supported by lmarith; leave it unset", param=bad,
                       code="unsupported_parameter")
    max_tokens = body.max_tokens
    if isinstance(body, ChatCompletionRequest) and body.max_completion_tokens is not None:
        max_tokens = body.max_completion_tokens
    fields = dict(
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k or 0, min_p=body.min_p or 0.0,
        max_tokens=DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens,
        stop=body.stop or (), stop_token_ids=tuple(body.stop_token_ids or ()),
        ignore_eos=body.ignore_eos, logprobs=logprobs)
    try:
        return [SamplingParams(**fields, seed=None if body.seed is None else body.seed + i)
                for i in range(body.n)]
    except SamplingParamsError as error:
        raise from_exception(error) from None


async def _wait_disconnect(request: Request) -> None:
    """Returns when the client has gone (the body is already read, so receive() waits)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await work, cancelling it (and so its engine requests) if the client disconnects."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise ClientGone()
    return task.result()


class StreamSet:
    """The engine streams of one streamed request (one per choice), first chunks in hand."""

    def __init__(self, streams: list, firsts: list) -> None:
        self.streams, self.firsts = streams, firsts
        self._pumps: list[asyncio.Task] = []

    @classmethod
    async def open(cls, llm, prompts: Sequence, formula: Formula,
                   params: Sequence[SamplingParams]) -> "StreamSet":
        """Start every stream and wait for each one's first chunk, so that errors (bad prompt,
        no room in the KV cache) surface before the response's status is sent."""
        streams = [llm.astream(p, formula, sp) for p, sp in zip(prompts, params)]
        try:
            results = await asyncio.gather(*(s.__anext__() for s in streams), return_exceptions=True)
        except BaseException:        # cancelled (the client left): abort the started ones
            await cls(streams, []).aclose()
            raise
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await cls(streams, []).aclose()
            raise errors[0]
        return cls(streams, list(results))

    async def chunks(self) -> AsyncIterator[tuple[int, object]]:
        """(choice index, StreamChunk) pairs: the first chunks, then the rest as they come."""
        for index, chunk in enumerate(self.firsts):
            yield index, chunk
        live = [i for i, c in enumerate(self.firsts) if c.finish_reason is None]
        if len(live) == 1:
            async for chunk in self.streams[live[0]]:
                yield live[0], chunk
        elif live:
            async for item in self._merged(live):
                yield item

    async def _merged(self, live: list[int]) -> AsyncIterator[tuple[int, object]]:
        inbox: asyncio.Queue = asyncio.Queue()

        async def pump(index: int) -> None:
            try:
                async for chunk in self.streams[index]:
                    inbox.put_nowait((index, chunk, None))
            except Exception as error:
                inbox.put_nowait((index, None, error))

        self._pumps = [asyncio.ensure_future(pump(i)) for i in live]
        remaining = len(live)
        while remaining:
            index, chunk, error = await inbox.get()
            if error is not None:
                raise error
            yield index, chunk
            remaining -= chunk.finish_reason is not None

    async def aclose(self) -> None:
        """Abort whatever still runs (pumps first, then each stream); safe to call twice."""
        with anyio.CancelScope(shield=True):
            for pump in self._pumps:
                pump.cancel()
            await asyncio.gather(*self._pumps, return_exceptions=True)
            for stream in self.streams:
                await stream.aclose()
