"""Speculative decoding as formula nodes. `Speculative(target, draft, k)` has exactly the law
of `target`; the engine lets `draft` (a formula over the same vocabulary, or the model-free
`NgramDraft`) propose k tokens that every term of the target then verifies in one forward,
accepting or resampling each so that the output law is unchanged."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import FormulaError
from . import registry
from .node import EvalContext, Formula
from .terms import MAX_FACTOR


def _count(value, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise FormulaError(f"{what} must be an integer from {low} to {high}, got {value!r}")
    return value


@registry.register("ngram_draft")
@dataclass(frozen=True)
class NgramDraft(Formula):
    """Prompt-lookup drafting: propose the tokens that followed the most recent earlier
    occurrence of the last n tokens (n from `n` down to `min_n`) in the request's context and
    output. No weights and no KV; usable only as Speculative's draft."""

    n: int = 3
    min_n: int = 1

    def __post_init__(self) -> None:
        _count(self.n, "NgramDraft's n", 1, 64)
        _count(self.min_n, "NgramDraft's min_n", 1, self.n)

    def evaluate(self, ctx: EvalContext):
        raise FormulaError("NgramDraft proposes tokens but has no distribution; use it as the "
                           "draft of Speculative(target, NgramDraft(), k)")

    def norm_bounds(self) -> tuple[float, float]:
        return 0.0, 0.0



@registry.register("speculative")
@dataclass(frozen=True)
class Speculative(Formula):
    """target's law, sampled faster: draft proposes k tokens, target verifies them exactly."""

    target: Formula
    draft: Formula
    k: int = 4

    def __post_init__(self) -> None:
        for name in ("target", "draft"):
            if not isinstance(getattr(self, name), Formula):
                raise FormulaError(f"Speculative's {name} must be a formula, got "
                                   f"{getattr(self, name)!r}")
        object.__setattr__(self, "target", self.target.canonical())
        object.__setattr__(self, "draft", self.draft.canonical())
        _count(self.k, "Speculative's k", 1, MAX_FACTOR - 1)
        if isinstance(self.target, (NgramDraft, Speculative)):
            raise FormulaError(f"Speculative's target must be a formula of models, got {self.target}")
        if isinstance(self.draft, Speculative):
            raise FormulaError("Speculative's draft cannot itself be Speculative; nest the "
                               "speculation in the target's terms with speculative_factor instead")
        self.target.validate()
        if not self.uses_ngram:
            self.draft.validate()

    @property
    def uses_ngram(self) -> bool:
        return isinstance(self.draft, NgramDraft)

    def children(self) -> tuple[Formula, ...]:
        return self.target, self.draft

    def evaluate(self, ctx: EvalContext):
        return self.target.evaluate(ctx)

    def norm_bounds(self) -> tuple[float, float]:
        return self.target.norm_bounds()
