"""Which law a speculative request draws from, given the terms computed at a position.

Two shapes of speculation share one machinery. Across terms (the paper's method): a term
with speculative_factor k runs every k tokens, and the law over a set of computed terms is
the formula with the others dropped (restrict_plan). Speculative(target, draft, k): the
draft's terms run every step, the target's every k+1 steps, and the law is the target's
once all its terms are computed, the draft's before. With an NgramDraft the proposals come
from the request's own tokens and every term runs every step.
"""
from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Optional

from ...errors import FormulaError
from ...formula import Formula, NgramDraft, Plan, Speculative, compile_plan
from ...formula.plan import plan_norm_bounds, restrict_plan
from ...formula.terms import AUTO, AUTO_MAX_FACTOR
from .auto_factor import PRIOR_ACCEPTANCE, choose_factor, smoothed_acceptance

MAX_SPECULATIVE_TERMS = 10   # the partial laws are checked for every subset of these


@dataclass(frozen=True)
class Law:
    """A formula to evaluate: its plan (or None), and for each of its terms (formula.terms
    order) the index of the request term whose logits it reads."""

    formula: Formula
    plan: Optional[Plan]
    slots: tuple[int, ...]


class SpeculationPlan:
    """A formula's speculation: each term's factor, the law over any set of computed terms,
    and the n-gram drafter (ngram, with k proposals per verification) when it has one."""

    def __init__(self, formula: Formula) -> None:
        self.formula = formula
        self.terms = formula.terms
        self.ngram: Optional[NgramDraft] = None
        self.k = 0
        self._laws: dict[tuple[bool, ...], Law] = {}
        if isinstance(formula, Speculative):
            self._init_speculative(formula)
        else:
            self._init_term_factors(formula)

    @property
    def base(self) -> tuple[bool, ...]:
        """The terms computed at every position (factor 1)."""
        return tuple(factor == 1 for factor in self.factors)

    def step_factors(self, accepted: int = 0, proposed: int = 0) -> list[int]:
        """Each term's factor now: "auto" ones chosen from the acceptance seen so far."""
        if AUTO not in self.factors:
            return list(self.factors)
        acceptance = smoothed_acceptance(accepted, proposed) if proposed else PRIOR_ACCEPTANCE
        auto = choose_factor(acceptance, float(sum(self.base)), AUTO_MAX_FACTOR)
        return [auto if factor == AUTO else factor for factor in self.factors]

    def law(self, present: tuple[bool, ...]) -> Law:
        """The law tokens are drawn from where exactly the `present` terms are computed."""
        if present not in self._laws:
            self._laws[present] = self._make_law(present)
        return self._laws[present]

    def _init_term_factors(self, formula: Formula) -> None:
        self.factors = tuple(term.speculative_factor for term in self.terms)
        self.full_plan = compile_plan(formula)
        if self.full_plan is None:
            raise FormulaError(f"speculative_factor > 1 needs a formula of weighted sums and "
                               f"Union/Intersection of terms; {formula} is not one")
        if self.full_plan.masked:
            raise FormulaError(f"speculative_factor > 1 cannot be used with Plausible (contrastive "
                               f"decoding's plausibility mask) in {formula}: its reference has no "
                               "law over a subset of the terms; drop speculative_factor, or speed "
                               "it up with Speculative(target, draft, k)")
        if 1 not in self.factors:  # "auto" terms may be slow too
            raise FormulaError(f"at least one term of {formula} needs speculative_factor 1: "
                               "the tokens in between are drawn from those terms")
        self._check_partial_laws()

    def _init_speculative(self, formula: Speculative) -> None:
        inner = [t for t in self.terms if t.speculative_factor != 1]
        if inner:
            raise FormulaError(f"inside Speculative the target's terms are verified every k "
                               f"tokens; drop speculative_factor from {inner[0]}")
        draft_terms = set() if formula.uses_ngram else set(formula.draft.terms)
        if formula.uses_ngram:
            self.ngram, self.k = formula.draft, formula.k
        step = 1 if formula.uses_ngram else formula.k + 1
        self.factors = tuple(1 if t in draft_terms else step for t in self.terms)
        self.target_slots = tuple(self.terms.index(t) for t in formula.target.terms)
        self.law(self.base)

    def _make_law(self, present: tuple[bool, ...]) -> Law:
        formula = self.formula
        if isinstance(formula, Speculative):
            done = all(present[slot] for slot in self.target_slots)
            chosen = formula.target if done or formula.uses_ngram else formula.draft
            return Law(chosen, compile_plan(chosen), tuple(self.terms.index(t) for t in chosen.terms))
        return Law(formula, restrict_plan(self.full_plan, present), tuple(range(len(self.terms))))

    def _check_partial_laws(self) -> None:
        """Every law the engine may draw from must be a distribution (a present term, norm >= 0)."""
        optional = [t for t, factor in enumerate(self.factors) if factor != 1]
        if len(optional) > MAX_SPECULATIVE_TERMS:
            raise FormulaError(f"at most {MAX_SPECULATIVE_TERMS} terms may have "
                               f"speculative_factor > 1, got {len(optional)}")
        for chosen in itertools.product((False, True), repeat=len(optional)):
            present = list(self.base)
            for slot, on in zip(optional, chosen):
                present[slot] = on
            plan = self.law(tuple(present)).plan
            low, _ = plan_norm_bounds(plan)
            if not any(w for row in plan.weights for w in row) or low < -1e-9:
                names = ", ".join(str(self.terms[t]) for t, on in enumerate(present) if on)
                raise FormulaError(f"with speculative_factor, {self.formula} is sampled from its "
                                   f"terms {names} alone in between, and that partial formula "
                                   "is not a distribution (negative or zero weight); give a "
                                   "positively weighted term speculative_factor 1")


@functools.lru_cache(maxsize=1024)
def speculation_plan(formula: Formula) -> Optional[SpeculationPlan]:
    """The formula's speculation, or None when it decodes one token per step. Cached per
    formula: checking its partial laws compiles a plan per subset of its slow terms, and
    every request is checked in its caller's thread and again when it is built."""
    for node in formula.nodes():
        if isinstance(node, Speculative) and node is not formula:
            raise FormulaError(f"Speculative must be the whole formula, not part of {formula}; "
                               "write Speculative(target, draft, k) around it")
        if isinstance(node, NgramDraft) and not (isinstance(formula, Speculative)
                                                  and node is formula.draft):
            raise FormulaError("NgramDraft can only be the draft of Speculative(target, draft, k)")
    if isinstance(formula, Speculative):
        return SpeculationPlan(formula)
    if all(term.speculative_factor == 1 for term in formula.terms):
        return None
    return SpeculationPlan(formula)
