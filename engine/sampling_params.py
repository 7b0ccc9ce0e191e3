"""SamplingParams: how one request picks its tokens and when it stops."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional


class SamplingParamsError(ValueError):
    """Sampling parameters out of range; the message names the field and its valid range."""


@dataclass
class SamplingParams:
    """vLLM-like sampling settings. temperature 0 is greedy; top_k 0 and top_p 1 are off."""

    temperature: float = 1.0
    max_tokens: int = 16
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: Optional[int] = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        self.stop = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        self.validate()

    def validate(self) -> "SamplingParams":
        _check(math.isfinite(self.temperature) and self.temperature >= 0,
               f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        _check(isinstance(self.max_tokens, int) and self.max_tokens >= 1,
               f"max_tokens must be an integer >= 1, got {self.max_tokens}")
        _check(isinstance(self.top_k, int) and self.top_k >= 0,
               f"top_k must be an integer >= 0 (0 = off), got {self.top_k}")
        _check(0 < self.top_p <= 1, f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        _check(0 <= self.min_p <= 1, f"min_p must be in [0, 1] (0 = off), got {self.min_p}")
        _check(self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < 2 ** 63),
               f"seed must be None or an integer in [0, 2**63), got {self.seed}")
        _check(all(isinstance(s, str) and s for s in self.stop),
               f"stop must be a list of non-empty strings, got {self.stop!r}")
        return self


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise SamplingParamsError(message)
