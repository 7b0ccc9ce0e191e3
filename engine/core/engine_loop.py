"""EngineLoop: the one thread that owns the engine. Callers on any thread (and the asyncio
face) post commands: submit requests, abort one, read stats. Between commands the thread runs
engine steps while any request is unfinished, and hands each request's new text and tokens to
the sink its caller gave (a thread queue, or an asyncio queue via call_soon_threadsafe);
callers that want only the final output are not woken before it.
Requests of all callers are batched together: continuous batching across callers."""
from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence as Seq, TypeVar

from ..errors import EngineError, RequestAbortedError
from ..outputs import RequestOutput, StreamChunk
from .engine import LLMEngine, Submission
from .request import Request
from .request_builder import NewRequest

T = TypeVar("T")
_STOP = object()


@dataclass
class RequestUpdate:
    """What a caller receives: a chunk; with the final output (and error, if it failed) last."""

    chunk: StreamChunk
    output: Optional[RequestOutput] = None
    error: Optional[BaseException] = None


Sink = Callable[[RequestUpdate], None]


@dataclass
class Subscriber:
    """Where a request's updates go; final_only callers (generate) get one update, the final
    output, instead of one per step."""

    sink: Sink
    final_only: bool = False


class EngineLoop:
    """A daemon thread running the engine; every method here is safe to call from any thread."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._subscribers: dict[Request, Subscriber] = {}
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="lmarith-engine", daemon=True)
        self._thread.start()

    def call(self, fn: Callable[[], T]) -> "Future[T]":
        """Run fn on the loop thread between two steps; the future holds its result."""
        if self._closed:
            raise RequestAbortedError("this LLM was closed; make a new one")
        future: Future = Future()
        self._commands.put((fn, future))
        return future

    def submit(self, requests: Seq[NewRequest], subscribers: Seq[Subscriber]) -> "Future[list[Request]]":
        """Queue requests together (all or none); the future raises the validation error."""
        accepted_future: Future = Future()

        def accepted(result: Any) -> None:
            if isinstance(result, BaseException):
                accepted_future.set_exception(result)
                return
            self._subscribers.update(zip(result, subscribers))
            accepted_future.set_result(result)

        def never_ran(posted: Future) -> None:
            if posted.exception() is not None and not accepted_future.done():
                accepted_future.set_exception(posted.exception())
        posted = self.call(lambda: self.engine.submit(Submission(list(requests), accepted)))
        posted.add_done_callback(never_ran)
        return accepted_future

    def abort(self, request: Request) -> None:
        """Cancel a request; its sink gets a final update with finish_reason 'abort'."""
        def command() -> None:
            self.engine.abort(request)
            self._deliver([request])
        if not self._closed:
            self.call(command)

    def shutdown(self) -> None:
        """Fail every unfinished request with RequestAbortedError and stop the thread."""
        if not self._closed:
            self._closed = True
            self._commands.put((_STOP, None))

    def close(self, timeout: float = 60.0) -> None:
        """shutdown(), then wait for the thread to end (so no kernel runs at interpreter exit)."""
        self.shutdown()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            commands = [] if self.engine.has_unfinished() else [self._commands.get()]
            while True:
                try:
                    commands.append(self._commands.get_nowait())
                except queue.Empty:
                    break
            for index, (fn, future) in enumerate(commands):
                if fn is _STOP:
                    self._stop(commands[index + 1:])
                    return
                try:
                    future.set_result(fn())
                except BaseException as error:
                    future.set_exception(error)
            if self.engine.has_unfinished():
                self._step()

    def _stop(self, leftover: list) -> None:
        """Fail what is in flight and every command that arrived after the stop."""
        closed = RequestAbortedError("the LLM was shut down")
        self._deliver(self.engine.fail_all(closed))
        self.engine.close()
        while True:
            try:
                leftover.append(self._commands.get_nowait())
            except queue.Empty:
                break
        for _, future in leftover:
            future.set_exception(closed)

    def _step(self) -> None:
        try:
            changed = self.engine.step()
        except Exception as error:  # a bug: fail what is in flight, keep serving
            failure = EngineError(f"an engine step failed ({type(error).__name__}: {error}); "
                                  "the requests in flight were failed")
            failure.__cause__ = error
            changed = self.engine.fail_all(failure)
        self._deliver(changed)

    def _deliver(self, requests: Seq[Request]) -> None:
        """Hand each request's news to its subscriber; a sink that fails cancels its request."""
        for request in requests:
            subscriber = self._subscribers.get(request)
            if subscriber is None or (subscriber.final_only and not request.is_finished):
                continue
            chunk = request.take_chunk()
            if request.is_finished:
                del self._subscribers[request]
                update = RequestUpdate(chunk, request.output(), request.error)
            elif chunk.text or chunk.token_ids:
                update = RequestUpdate(chunk)
            else:
                continue
            try:
                subscriber.sink(update)
            except Exception:  # the caller is gone (e.g. its event loop closed)
                self._subscribers.pop(request, None)
                self.engine.abort(request)
