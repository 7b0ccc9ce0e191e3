"""The OpenAI-compatible app. `build_app(llm, models, presets, api_key)` serves one shared
`LLM` to every connection, so concurrent clients are batched into the same forward passes;
`run_server` runs it with uvicorn. Routes: POST /v1/completions and /v1/chat/completions
(streamed as server-sent events when `stream` is set), GET /v1/models (the presets),
/health and /metrics (Prometheus). With an api_key, /v1/* needs `Authorization: Bearer KEY`.

`model` names a preset; the body's `formula` (parsed with `lmarith.parse_formula` against
`models`) overrides the preset's formula for that request. Every failure answers with
OpenAI's error body and a 4xx/5xx status; the server keeps serving everyone else."""
from __future__ import annotations

import secrets
import time
from typing import Callable, Mapping, Optional

import anyio
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ...formula import Formula, Model
from .errors import APIError, from_exception, install_handlers
from .formatting import DONE, Formatter, usage
from .metrics import CONTENT_TYPE, ServerMetrics
from .protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList, SamplingFields
from .serving import ClientGone, FormulaResolver, StreamSet, sampling_params, unless_disconnected

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class EventStream(StreamingResponse):
    """An SSE response that always closes its body generator, however the stream ends (done,
    client gone mid-send, server shutdown), so the engine requests behind it are aborted."""

    media_type = "text/event-stream"

    def __init__(self, body, streams: StreamSet) -> None:
        super().__init__(body, headers=SSE_HEADERS)
        self.streams = streams

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()
                await self.streams.aclose()       # in case the body never started


class Server:
    """What the routes share: the engine, the formulas, the metrics, the start time."""

    def __init__(self, llm, models: Mapping[str, Model], presets: Mapping[str, Formula]) -> None:
        self.llm = llm
        self.resolver = FormulaResolver(models, presets)
        self.metrics = ServerMetrics(llm, models)
        self.created = int(time.time())

    async def generate(self, request: Request, body: SamplingFields, kind: str, prompts: list,
                       logprobs: Optional[int]) -> Response:
        """Run one completions or chat request, streamed or whole."""
        start = time.perf_counter()
        endpoint = "completions" if kind == "completion" else "chat_completions"
        param = "formula" if body.formula is not None else None
        try:
            target = self.resolver.resolve(body)
            per_prompt = sampling_params(body, logprobs)
            expanded = [p for p in prompts for _ in per_prompt]
            params = per_prompt * len(prompts)
            formatter = Formatter(kind, target.model, logprobs)
            if body.stream:
                streams = await unless_disconnected(
                    request, StreamSet.open(self.llm, expanded, target.formula, params))
                include_usage = bool(body.stream_options and body.stream_options.include_usage)
                done = self._recorder(endpoint, start)
                return EventStream(_events(streams, formatter, body.n, include_usage, param, done),
                                   streams)
            outputs = await unless_disconnected(
                request, self.llm.agenerate(expanded, target.formula, params))
        except ClientGone:
            self.metrics.finished(endpoint, "disconnected", time.perf_counter() - start)
            return Response(status_code=499)
        except Exception as error:
            self.metrics.finished(endpoint, "error", time.perf_counter() - start)
            raise from_exception(error, param, _prompt_field(kind)) from None
        response = formatter.response(outputs, body.n)
        self.metrics.finished(endpoint, "ok", time.perf_counter() - start,
                              response.usage.prompt_tokens, response.usage.completion_tokens)
        return Response(response.model_dump_json(), media_type="application/json")

    def _recorder(self, endpoint: str, start: float) -> Callable[[str, int, int], None]:
        def done(outcome: str, prompt: int, completion: int) -> None:
            self.metrics.finished(endpoint, outcome, time.perf_counter() - start, prompt, completion)
        return done


async def _events(streams: StreamSet, formatter: Formatter, n: int, include_usage: bool,
                  param: Optional[str], done: Callable[[str, int, int], None]):
    """The SSE body: one event per chunk, a usage event if asked, then [DONE]. An error after
    the stream started is sent as an error event. Closing it aborts the engine requests."""
    prompt = completion = 0
    outcome = "disconnected"
    try:
        async for index, chunk in streams.chunks():
            completion += len(chunk.token_ids)
            if chunk.finish_reason is not None and index % n == 0:
                prompt += getattr(getattr(chunk, "metrics", None), "prompt_tokens", 0)
            if formatter.says_nothing(index, chunk):
                continue
            yield formatter.chunk(index, chunk, include_usage)
        if include_usage:
            yield formatter.usage_chunk(usage(prompt, completion))
        outcome = "ok"
        yield DONE
    except Exception as error:
        outcome = "error"
        yield formatter.error_event(from_exception(error, param, _prompt_field(formatter.kind)).body())
        yield DONE
    finally:
        await streams.aclose()
        done(outcome, prompt, completion)


def _prompt_field(kind: str) -> str:
    return "prompt" if kind == "completion" else "messages"


def _auth(api_key: Optional[str]):
    """The dependency that checks `Authorization: Bearer KEY` (nothing when no key is set)."""
    async def check(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(),
                                                                    api_key.encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                           code="invalid_api_key")
    return check


def build_app(llm, models: Mapping[str, Model], presets: Mapping[str, Formula],
              api_key: Optional[str] = None) -> FastAPI:
    """The app serving `llm` with these models (formula names) and presets (model names)."""
    server = Server(llm, models, presets)
    app = FastAPI(title="lmarith", summary="OpenAI-compatible server with per-request formulas")
    app.state.server = server
    install_handlers(app)
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(_auth(api_key))])

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(await run_in_threadpool(server.metrics.scrape), media_type=CONTENT_TYPE)

    @v1.get("/models")
    async def list_models() -> ModelList:
        return ModelList(data=[ModelCard(id=name, created=server.created, formula=str(formula))
                               for name, formula in server.resolver.presets.items()])

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        if not prompts:
            raise APIError(400, "prompt is an empty list; give a string or a list of strings",
                           param="prompt", code="invalid_prompt")
        return await server.generate(request, body, "completion", prompts, body.logprobs)

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        conversation = [message.as_dict() for message in body.messages]
        return await server.generate(request, body, "chat", [conversation], logprobs)

    app.include_router(v1)
    return app


def run_server(llm, models: Mapping[str, Model], presets: Mapping[str, Formula], host: str,
               port: int, api_key: Optional[str] = None, log_level: str = "info") -> None:
    """Serve until interrupted (blocking)."""
    import uvicorn

    uvicorn.run(build_app(llm, models, presets, api_key), host=host, port=port,
                log_level=log_level, timeout_graceful_shutdown=5)
