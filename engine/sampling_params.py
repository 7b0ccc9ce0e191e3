"""SamplingParams: how one request picks its tokens and when it stops. Checked when made and
immutable afterwards (dataclasses.replace makes a changed, re-checked copy), so what the
engine reads, on its own thread, is always what was validated."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from .errors import SamplingParamsError

__all__ = ["SamplingParams", "SamplingParamsError"]
MAX_LOGPROBS = 20


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise SamplingParamsError(message)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _string_list(name: str, value: Any) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    _check(isinstance(items, (list, tuple)) and all(isinstance(s, str) and s for s in items),
           f"{name} must be a string or a list of non-empty strings, got {value!r}")
    return tuple(items)


@dataclass
class SamplingParams:
    """vLLM-like sampling settings. temperature 0 is greedy; top_k 0 (or above the
    vocabulary) and top_p 1 are off; stop strings end the text before them; stop_token_ids
    end generation like EOS (the token is kept in token_ids)."""

    temperature: float = 1.0
    max_tokens: int = 16
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: Optional[int] = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    logprobs: Optional[int] = None   # report each token's log-prob and this many alternatives

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", _string_list("stop", self.stop))
        ids = self.stop_token_ids
        _check(isinstance(ids, (list, tuple)) and all(_is_integer(t) and 0 <= t < 2 ** 31 for t in ids),
               f"stop_token_ids must be a list of token ids (integers >= 0), got {ids!r}")
        object.__setattr__(self, "stop_token_ids", tuple(ids))
        self.validate()
        object.__setattr__(self, "_checked", True)

    def __setattr__(self, name: str, value: Any) -> None:
        if getattr(self, "_checked", False):
            raise SamplingParamsError(f"SamplingParams cannot be changed after it is made; use "
                                      f"dataclasses.replace(params, {name}=...) for a checked copy")
        object.__setattr__(self, name, value)

    def validate(self) -> "SamplingParams":
        _check(_is_number(self.temperature) and math.isfinite(self.temperature)
               and self.temperature >= 0,
               f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        _check(_is_integer(self.max_tokens) and 1 <= self.max_tokens < 2 ** 31,
               f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        _check(_is_integer(self.top_k) and self.top_k >= 0,
               f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        _check(_is_number(self.top_p) and 0 < self.top_p <= 1,
               f"top_p must be a number in (0, 1] (1 = off), got {self.top_p!r}")
        _check(_is_number(self.min_p) and 0 <= self.min_p <= 1,
               f"min_p must be a number in [0, 1] (0 = off), got {self.min_p!r}")
        _check(self.seed is None or (_is_integer(self.seed) and 0 <= self.seed < 2 ** 63),
               f"seed must be None or an integer in [0, 2**63), got {self.seed!r}")
        _check(isinstance(self.ignore_eos, bool),
               f"ignore_eos must be True or False, got {self.ignore_eos!r}")
        _check(self.logprobs is None or (_is_integer(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
               f"logprobs must be None or an integer from 0 to {MAX_LOGPROBS}, got {self.logprobs!r}")
        return self
