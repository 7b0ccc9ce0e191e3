"""Nudging (Fei, Razeghi, Singh, arXiv 2410.09300) as a formula node: a large base model
writes the answer, and whenever it is uncertain (top-1 probability < gamma) a small aligned
nudger writes the next words. It is a decoding program over two formulas, not a law over one
vocabulary, so the engine runs it (lmarith.core.nudging); the node carries its settings,
serialises to JSON and reads back from formula strings like every other node."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import FormulaError
from . import registry
from .node import EvalContext, Formula, as_formula, coefficient

MAX_NUDGE_TOKENS = 64
HANDOVERS = ("auto", "text", "tokens")


@registry.register("nudging")
@dataclass(frozen=True)
class Nudging(Formula):
    """Answer with `base`; `nudger` writes words where base's top-1 probability < gamma.

    A round: the nudger drafts up to max_nudge_tokens tokens greedily; its words are taken
    one at a time (the first always, further ones while base stays uncertain and does not
    already predict the word; a partial last word is dropped); then base continues, keeping
    its first token, until a token whose top-1 probability < gamma (dropped: a new round).
    full_drafts=True is the paper's rule (a whole draft, so an answer end inside it ends the
    answer); False stops drafting at the first word base takes over, which costs fewer
    nudger forwards but does not look past that word for the end of the answer.
    handover: "auto" hands tokens over when both sides share a tokenizer and text otherwise;
    "text" always re-encodes the answer (the paper's way, and a check of the fast path).
    """

    base: Formula
    nudger: Formula
    gamma: float = 0.4
    max_nudge_tokens: int = 16
    full_drafts: bool = True
    handover: str = "auto"

    def __post_init__(self) -> None:
        for name in ("base", "nudger"):
            value = getattr(self, name)
            if not isinstance(value, Formula):
                raise FormulaError(f"Nudging's {name} must be a formula, got {value!r}")
            if any(isinstance(node, Nudging) for node in value.nodes()):
                raise FormulaError(f"Nudging's {name} cannot itself contain Nudging")
            object.__setattr__(self, name, as_formula(value))
            getattr(self, name).validate()
        object.__setattr__(self, "gamma", coefficient(self.gamma, "Nudging's gamma"))
        if not 0 < self.gamma <= 1:
            raise FormulaError(f"Nudging's gamma is a probability threshold in (0, 1], got {self.gamma}")
        count = self.max_nudge_tokens
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_NUDGE_TOKENS:
            raise FormulaError(f"Nudging's max_nudge_tokens must be an integer from 1 to "
                               f"{MAX_NUDGE_TOKENS}, got {count!r}")
        if not isinstance(self.full_drafts, bool):
            raise FormulaError(f"Nudging's full_drafts must be True or False, got {self.full_drafts!r}")
        if self.handover not in HANDOVERS:
            raise FormulaError(f"Nudging's handover must be one of {', '.join(HANDOVERS)}, got "
                               f"{self.handover!r}")

    def children(self) -> tuple[Formula, ...]:
        return self.base, self.nudger

    def evaluate(self, ctx: EvalContext):
        raise FormulaError("Nudging is a decoding program (two formulas taking turns), not one "
                           "distribution; run it with LLM.generate or LLM.stream")

    def norm_bounds(self) -> tuple[float, float]:
        return self.base.norm_bounds()
