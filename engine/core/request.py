"""Request: one prompt decoded under one formula. Its terms' Sequences all receive the same
sampled tokens; the request keeps the output, its text (through the detokenizer), its status
and metrics, and hands out what is new since the last look as StreamChunks."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from ..decoding.classifier import ClassifierInput
from ..decoding.nudging import NudgingState
from ..decoding.speculative import SpeculationPlan, SpeculationState
from ..formula import Formula, Plan
from ..outputs import RequestMetrics, RequestOutput, StreamChunk, TokenLogprob
from ..sampling_params import SamplingParams
from .detokenizer import Detokenizer
from .sequence import Sequence


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """Scheduler-facing state of one request (owned by the engine loop's thread)."""

    request_id: str
    prompt: Any                       # text, or a conversation (list of messages)
    formula: Formula
    plan: Optional[Plan]
    params: SamplingParams
    seed: int
    sequences: list[Sequence]
    eos_token_ids: frozenset[int]
    arrival: int
    detokenizer: Detokenizer
    output_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: Optional[str] = None
    error: Optional[BaseException] = None
    num_preemptions: int = 0
    metrics: RequestMetrics = field(default_factory=RequestMetrics)
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: Optional[float] = None
    sent_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    speculation: Optional[SpeculationPlan] = None    # None: one token per step
    spec_state: Optional[SpeculationState] = None
    nudging: Optional[NudgingState] = None           # a Nudging formula's rounds
    classifier: Optional[ClassifierInput] = None     # what its Classifier terms read, if any

    @property
    def drawn_ids(self) -> list[int]:
        """Verified tokens, then those drawn but not yet verified by every term."""
        pending = self.spec_state.tokens if self.spec_state is not None else []
        return self.output_ids + pending if pending else self.output_ids

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def is_end_token(self, token: int) -> bool:
        """True for a stop token id, or EOS unless ignore_eos."""
        return token in self.params.stop_token_ids or (
            token in self.eos_token_ids and not self.params.ignore_eos)

    def pages_needed(self) -> int:
        """Pages all terms need for their prompt plus max_tokens (the request's worst case;
        a nudging side may also hold a draft)."""
        extra = self.nudging.max_nudge_tokens + 1 if self.nudging is not None else 0
        return sum(seq.pages_needed(seq.prompt_len + self.params.max_tokens + extra)
                   for seq in self.sequences)

    def append_token(self, token: int, sampled=None) -> Optional[str]:
        """Record a sampled token (and its logprobs, from a decoding.Sampled, when asked
        for); the finish reason it causes (EOS, stop, length), if any."""
        if self.params.logprobs is not None and sampled is not None:
            self.logprobs.append(self._token_logprob(token, sampled))
        self._note_first_token()
        self.output_ids.append(token)
        stopped = self.detokenizer.append(token)
        if stopped or self.is_end_token(token):
            return "stop"
        if len(self.output_ids) >= self.params.max_tokens:
            return "length"
        return None

    def append_piece(self, token_ids: list[int], text: str) -> Optional[str]:
        """Record a piece of a nudging answer (its base-tokenizer ids and its exact text,
        which may join the two sides' tokens differently); the finish reason it causes."""
        self._note_first_token()
        self.output_ids.extend(token_ids)
        stopped = self.detokenizer.append_text(text)
        if stopped or (token_ids and self.is_end_token(token_ids[-1])):
            return "stop"
        if len(self.output_ids) >= self.params.max_tokens:
            return "length"
        return None

    def _note_first_token(self) -> None:
        if self.first_token_time is None:
            self.first_token_time = time.monotonic()
            self.metrics.time_to_first_token = self.first_token_time - self.arrival_time

    def _token_logprob(self, token: int, sampled) -> TokenLogprob:
        decode = self.detokenizer.tokenizer.decode
        return TokenLogprob(token, decode([token]), sampled.logprob,
                            [(t, decode([t]), lp) for t, lp in sampled.top or []])

    def mark_finished(self, reason: str, error: Optional[BaseException] = None) -> None:
        """Final status; the detokenizer releases the text it held back."""
        self.status = RequestStatus.FINISHED
        self.finish_reason = reason
        self.error = error
        self.detokenizer.finish()
        if self.first_token_time is not None:
            self.metrics.decode_time = time.monotonic() - self.first_token_time

    def take_chunk(self) -> StreamChunk:
        """Text and tokens not handed out yet (finish_reason once finished)."""
        tokens = self.output_ids[self.sent_tokens:]
        logprobs = self.logprobs[self.sent_tokens:] if self.params.logprobs is not None else None
        self.sent_tokens = len(self.output_ids)
        done = self.is_finished
        return StreamChunk(self.detokenizer.take_ready(), tokens, self.finish_reason if done else None,
                           logprobs, self.metrics if done else None)

    def output(self) -> RequestOutput:
        return RequestOutput(self.request_id, self.prompt, self.detokenizer.text,
                             list(self.output_ids), self.finish_reason, self.num_preemptions,
                             self.metrics,
                             list(self.logprobs) if self.params.logprobs is not None else None)
