"""Engine results -> OpenAI bodies: the whole response of a non-streamed request, the SSE
chunks of a streamed one, logprobs in each endpoint's shape, and usage. One Formatter per
request; it fixes the response's id, creation time and model name for all its chunks."""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

from .protocol import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk,
                       ChatCompletionResponse, ChatLogprobs, ChatTokenLogprob, CompletionChoice,
                       CompletionChunk, CompletionLogprobs, CompletionResponse, Delta, TopLogprob,
                       Usage)

MIN_LOGPROB = -9999.0      # JSON has no -inf: forbidden tokens report this (as vLLM does)
DONE = "data: [DONE]\n\n"


def sse(payload: str) -> str:
    """One server-sent event carrying a JSON payload."""
    return f"data: {payload}\n\n"


def _finite(logprob: float) -> float:
    return logprob if logprob > MIN_LOGPROB else MIN_LOGPROB


def _bytes(text: str) -> Optional[list[int]]:
    """UTF-8 bytes of a token's text; None when the text is a replacement character standing
    for part of a multi-byte character (its real bytes are not known here)."""
    return None if "\ufffd" in text else list(text.encode())


def usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens)


def prompt_tokens_of(metrics: Sequence, n: int) -> int:
    """Prompt tokens of a request's outputs (one list entry per output, n outputs per prompt):
    each prompt counted once, its terms' contexts summed (RequestMetrics.prompt_tokens)."""
    return sum(getattr(m, "prompt_tokens", 0) for m in metrics[::n])


@dataclass
class Formatter:
    """Builds one request's bodies. kind: "completion" or "chat"; logprobs: None when the
    request did not ask for them."""

    kind: str
    model: str
    logprobs: Optional[int] = None
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    _offsets: dict = field(default_factory=dict)     # completions: text length so far per choice
    _started: set = field(default_factory=set)       # chat: choices whose role was sent

    def __post_init__(self) -> None:
        prefix = "cmpl-" if self.kind == "completion" else "chatcmpl-"
        self.id = self.id or prefix + uuid.uuid4().hex

    # -- logprobs -------------------------------------------------------------------------
    def _completion_logprobs(self, entries, index: int) -> Optional[CompletionLogprobs]:
        if self.logprobs is None or entries is None:
            return None
        result = CompletionLogprobs(top_logprobs=[])
        offset = self._offsets.get(index, 0)
        for entry in entries:
            result.tokens.append(entry.text)
            result.token_logprobs.append(_finite(entry.logprob))
            result.top_logprobs.append({text: _finite(lp) for _, text, lp in entry.top})
            result.text_offset.append(offset)
            offset += len(entry.text)
        return result

    def _chat_logprobs(self, entries) -> Optional[ChatLogprobs]:
        if self.logprobs is None or entries is None:
            return None
        return ChatLogprobs(content=[ChatTokenLogprob(
            token=entry.text, logprob=_finite(entry.logprob), bytes=_bytes(entry.text),
            top_logprobs=[TopLogprob(token=text, logprob=_finite(lp), bytes=_bytes(text))
                          for _, text, lp in entry.top]) for entry in entries])

    # -- whole responses ------------------------------------------------------------------
    def response(self, outputs: Sequence, n: int) -> Union[CompletionResponse, ChatCompletionResponse]:
        """The body of a finished request: one choice per output, in order."""
        completion = sum(len(o.token_ids) for o in outputs)
        total = usage(prompt_tokens_of([o.metrics for o in outputs], n), completion)
        if self.kind == "completion":
            choices = [CompletionChoice(index=i, text=o.text, finish_reason=o.finish_reason,
                                        logprobs=self._completion_logprobs(_logprobs(o), i))
                       for i, o in enumerate(outputs)]
            body = CompletionResponse(id=self.id, created=self.created, model=self.model,
                                      choices=choices, usage=total)
        else:
            choices = [ChatChoice(index=i, message=AssistantMessage(content=o.text),
                                  finish_reason=o.finish_reason,
                                  logprobs=self._chat_logprobs(_logprobs(o)))
                       for i, o in enumerate(outputs)]
            body = ChatCompletionResponse(id=self.id, created=self.created, model=self.model,
                                          choices=choices, usage=total)
        return body

    # -- stream chunks --------------------------------------------------------------------
    def says_nothing(self, index: int, chunk) -> bool:
        """A chunk with no text, no logprobs and no finish (the detokenizer is holding back a
        partial character): skipped, except a chat choice's first, which carries the role."""
        return (not chunk.text and chunk.finish_reason is None and not _logprobs(chunk)
                and (self.kind == "completion" or index in self._started))

    def chunk(self, index: int, chunk, with_usage: bool) -> str:
        """The SSE event for one StreamChunk of choice `index`."""
        entries = _logprobs(chunk)
        if self.kind == "completion":
            choice = CompletionChoice(index=index, text=chunk.text, finish_reason=chunk.finish_reason,
                                      logprobs=self._completion_logprobs(entries, index))
            self._offsets[index] = self._offsets.get(index, 0) + len(chunk.text)
            body = CompletionChunk(id=self.id, created=self.created, model=self.model,
                                   choices=[choice])
        else:
            role = None if index in self._started else "assistant"
            self._started.add(index)
            choice = ChatChunkChoice(index=index, delta=Delta(role=role, content=chunk.text),
                                     finish_reason=chunk.finish_reason,
                                     logprobs=self._chat_logprobs(entries))
            body = ChatCompletionChunk(id=self.id, created=self.created, model=self.model,
                                       choices=[choice])
        return sse(body.model_dump_json(exclude={"usage"} if not with_usage else None))

    def usage_chunk(self, total: Usage) -> str:
        """The last event when stream_options.include_usage is set: usage, no choices."""
        cls = CompletionChunk if self.kind == "completion" else ChatCompletionChunk
        return sse(cls(id=self.id, created=self.created, model=self.model, choices=[],
                       usage=total).model_dump_json())

    @staticmethod
    def error_event(body: dict) -> str:
        """An error met after the stream started (the status line is already sent)."""
        return sse(json.dumps(body))


def _logprobs(item):
    """The logprobs list of a RequestOutput or StreamChunk (None when not requested)."""
    return getattr(item, "logprobs", None)
