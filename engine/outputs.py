"""What lmarith hands back: a RequestOutput per prompt (with its RequestMetrics), StreamChunks
while a request streams, and EngineStats for the engine as a whole."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class RequestMetrics:
    """Counts and timings of one request. Token counts add up over the formula's terms."""

    prompt_tokens: int = 0            # context tokens of all terms
    cached_prompt_tokens: int = 0     # of them, found in the prefix cache at admission
    forward_passes: int = 0           # steps in which any of the request's terms ran
    term_forward_passes: list[int] = field(default_factory=list)  # per term (formula.terms order)
    proposed_tokens: int = 0          # speculative tokens checked by a verification
    accepted_tokens: int = 0          # of them, accepted
    nudged_tokens: int = 0            # nudging: tokens of the answer the nudger wrote
    nudging_rounds: int = 0           # nudging: rounds in which the nudger drafted
    time_to_first_token: Optional[float] = None   # seconds from submission to the first token
    decode_time: Optional[float] = None           # seconds from the first token to the finish


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the formula's normalised law (before
    temperature and filters), with the `logprobs` most likely alternatives there."""

    token_id: int
    text: str
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)   # (token_id, text, logprob)


@dataclass
class RequestOutput:
    """The result of one prompt."""

    request_id: str
    prompt: Any                       # the text, or the conversation (a list of messages)
    text: str
    token_ids: list[int]
    finish_reason: Optional[str]
    num_preemptions: int = 0
    metrics: RequestMetrics = field(default_factory=RequestMetrics)
    logprobs: Optional[list[TokenLogprob]] = None    # one per token when params.logprobs is set


@dataclass
class StreamChunk:
    """New text and tokens since the previous chunk; finish_reason set on the last one."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: Optional[str] = None
    logprobs: Optional[list[TokenLogprob]] = None
    metrics: Optional[RequestMetrics] = None          # on the last chunk


@dataclass
class EngineStats:
    """A snapshot of the engine between two steps."""

    kv_pages_total: int = 0
    kv_pages_free: int = 0
    kv_pages_cached: int = 0          # free pages still holding a reusable prefix
    requests_running: int = 0
    requests_waiting: int = 0
    preemptions: int = 0
    tokens_generated: int = 0
    prefix_cache_hit_tokens: int = 0
    proposed_tokens: int = 0          # speculative tokens verified, over all requests
    accepted_tokens: int = 0
    forward_calls: dict[Any, int] = field(default_factory=dict)   # per ModelSpec
    kv_page_tokens: dict[Any, int] = field(default_factory=dict)  # tokens per page, per ModelSpec
