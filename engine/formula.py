"""The formula algebra of model arithmetic: terms are values, operators build trees, and
every node evaluates to an unnormalised (value, norm) pair per token, as in the paper's
reference implementation (Dekoninck et al., ICLR 2024).

Evaluation rules (V = vocabulary):
  model term      value = log_softmax(logits) in float32, norm 1
  Constant(c)     value c, norm c
  sum / scaling   values and norms combine linearly with the same coefficients
  Union(a, b)     value max(va, vb), norm taken per token from the winner (ties: a)
  Intersection    value min(va, vb), norm from the winner (ties: b, as the reference)
  output          log_softmax(value / norm) where norm != 0, log_softmax(value) elsewhere
A token some contributing term forbids (log-prob -inf) stays forbidden: -inf is absorbing
in sums instead of turning into +inf under a negative weight.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Union as TypingUnion

import torch

NEG_INF = float("-inf")
Norm = TypingUnion[float, torch.Tensor]


class FormulaError(ValueError):
    """A formula that cannot be evaluated as written; the message says what to change."""


@dataclass
class EvalContext:
    """What a node needs to evaluate: each term's log-probs and the classifier scorer."""

    term_log_probs: Mapping["Term", torch.Tensor]
    classifier_scores: Optional[Callable[["Formula", torch.Tensor], torch.Tensor]] = None


class Formula:
    """Base of every formula node: arithmetic operators, leaf terms, evaluation."""

    def children(self) -> tuple["Formula", ...]:
        return ()

    def evaluate(self, ctx: EvalContext) -> tuple[TypingUnion[float, torch.Tensor], Norm]:
        """Unnormalised (value, norm) of this node; values are [B, V] tensors or floats."""
        raise NotImplementedError

    def norm_bounds(self) -> tuple[float, float]:
        """Smallest and largest norm this node can have on any token."""
        raise NotImplementedError

    @property
    def terms(self) -> tuple["Term", ...]:
        """The distinct leaf terms in first-appearance (depth-first) order."""
        seen: dict[Term, None] = {}
        for leaf in self._leaves():
            seen.setdefault(leaf, None)
        return tuple(seen)

    def _leaves(self):
        for child in self.children():
            yield from child._leaves()

    def nodes(self):
        """Every node of the tree, depth-first, this one first."""
        yield self
        for child in self.children():
            yield from child.nodes()

    def validate(self) -> "Formula":
        """Reject a formula whose total norm can be negative (the reference flips it silently)."""
        low, _ = self.norm_bounds()
        if low < -1e-9:
            raise FormulaError(
                f"the total weight (norm) of {self} can be {low:g} < 0, which would invert the "
                "distribution; give the positive terms more weight than the negative ones "
                "(e.g. M_a - 0.6*M_b has weight 0.4), or use weights summing to exactly 0 for "
                "a contrastive formula")
        return self

    def log_probs(self, stacked: torch.Tensor, classifier_scores=None) -> torch.Tensor:
        """Stacked raw logits [len(terms), B, V] -> normalised log-probs [B, V] (float32).

        classifier_scores(node, token_ids [B, k]) -> [B, k] gives each Classifier node's
        log P(class | prefix + t) - log P(class | prefix) for its top-k candidate tokens.
        """
        terms = self.validate().terms
        if stacked.shape[0] != len(terms):
            raise FormulaError(f"expected logits for {len(terms)} terms, got {stacked.shape[0]}")
        term_log_probs = {t: torch.log_softmax(stacked[i].float(), dim=-1) for i, t in enumerate(terms)}
        return normalise(*self.evaluate(EvalContext(term_log_probs, classifier_scores)))

    def to_json(self) -> str:
        from .formula_json import formula_to_json
        return formula_to_json(self)

    @staticmethod
    def from_json(text: str) -> "Formula":
        from .formula_json import formula_from_json
        return formula_from_json(text)

    def __add__(self, other) -> "Formula":
        return Linear.of((self, 1.0), (as_formula(other), 1.0))

    def __radd__(self, other) -> "Formula":
        return Linear.of((as_formula(other), 1.0), (self, 1.0))

    def __sub__(self, other) -> "Formula":
        return Linear.of((self, 1.0), (as_formula(other), -1.0))

    def __rsub__(self, other) -> "Formula":
        return Linear.of((as_formula(other), 1.0), (self, -1.0))

    def __neg__(self) -> "Formula":
        return Linear.of((self, -1.0))

    def __mul__(self, other) -> "Formula":
        return Linear.of((self, _coefficient(other, "multiply")))

    __rmul__ = __mul__

    def __truediv__(self, other) -> "Formula":
        divisor = _coefficient(other, "divide")
        if divisor == 0:
            raise FormulaError(f"cannot divide {self} by zero")
        return Linear.of((self, 1.0 / divisor))


def _coefficient(other, verb: str) -> float:
    if isinstance(other, Formula) or not isinstance(other, (int, float)) or isinstance(other, bool):
        raise FormulaError(f"can only {verb} a formula by a number, not by {other!r}; "
                           "products of two formulas are not part of model arithmetic")
    if not math.isfinite(other):
        raise FormulaError(f"cannot {verb} a formula by {other}")
    return float(other)


def as_formula(value) -> Formula:
    """Numbers become Constants; formulas pass through."""
    if isinstance(value, Formula):
        return value
    return Constant(_coefficient(value, "combine"))


def normalise(value, norm: Norm) -> torch.Tensor:
    """Final step: divide by the norm where it is non-zero, then log_softmax."""
    if not torch.is_tensor(value):
        raise FormulaError("a formula made only of constants has no distribution; add a model term")
    norm = torch.as_tensor(norm, dtype=value.dtype, device=value.device)
    scores = torch.where(norm != 0, value / torch.where(norm != 0, norm, 1.0), value)
    scores = torch.where(torch.isnan(scores), NEG_INF, scores)
    return torch.log_softmax(scores, dim=-1)


@dataclass(frozen=True)
class Model(Formula):
    """A model spec (nothing loads yet): a Hugging Face directory or a .gguf file.

    Used bare, it is the term whose context is the user text, tokenised as tokenizer(text).
    """

    path: str
    dtype: str = "float32"

    def prompt(self, system: str, template: str = "{system}\n{input}") -> "Term":
        """A term whose context is tokenizer(template.format(system=system, input=text))."""
        if "{input}" not in template:
            raise FormulaError(f"template {template!r} must contain '{{input}}'")
        return Term(self, system, template)

    def chat(self, system: Optional[str] = None) -> "Term":
        """A term whose context is the tokenizer's chat template with this system prompt."""
        return Term(self, system, None, chat=True)

    def as_term(self) -> "Term":
        return Term(self)

    def _leaves(self):
        yield self.as_term()

    def evaluate(self, ctx: EvalContext):
        return self.as_term().evaluate(ctx)

    def norm_bounds(self) -> tuple[float, float]:
        return 1.0, 1.0

    def __str__(self) -> str:
        return f"M({self.path})"


@dataclass(frozen=True)
class Term(Formula):
    """A leaf: one model run on one context (bare text, a prompt template, or chat)."""

    model: Model
    system: Optional[str] = None
    template: Optional[str] = None
    chat: bool = False

    def _leaves(self):
        yield self

    def evaluate(self, ctx: EvalContext):
        try:
            return ctx.term_log_probs[self], 1.0
        except KeyError:
            raise FormulaError(f"no logits were given for term {self}") from None

    def norm_bounds(self) -> tuple[float, float]:
        return 1.0, 1.0

    def context_text(self, text: str) -> str:
        """The text this term's model reads for a user input (chat handled by the caller)."""
        if self.template is None:
            return text
        return self.template.format(system=self.system or "", input=text)

    def __str__(self) -> str:
        if self.system is None and not self.chat:
            return str(self.model)
        kind = "chat" if self.chat else "prompt"
        return f"M({self.model.path}, {kind}={self.system!r})"


@dataclass(frozen=True)
class Constant(Formula):
    """A number inside a formula: value c and norm c, as in the reference."""

    value: float

    def evaluate(self, ctx: EvalContext):
        return self.value, self.value

    def norm_bounds(self) -> tuple[float, float]:
        return self.value, self.value

    def __str__(self) -> str:
        return f"{self.value:g}"


@dataclass(frozen=True)
class Linear(Formula):
    """A weighted sum of sub-formulas; built by +, -, * and /, flattened and merged."""

    items: tuple[tuple[Formula, float], ...]

    @staticmethod
    def of(*weighted: tuple[Formula, float]) -> Formula:
        merged: dict[Formula, float] = {}
        for formula, weight in weighted:
            inner = formula.items if isinstance(formula, Linear) else ((formula, 1.0),)
            for child, child_weight in inner:
                key = child.as_term() if isinstance(child, Model) else child
                merged[key] = merged.get(key, 0.0) + weight * child_weight
        return Linear(tuple((child, weight) for child, weight in merged.items() if weight != 0))

    def children(self) -> tuple[Formula, ...]:
        return tuple(child for child, _ in self.items)

    def evaluate(self, ctx: EvalContext):
        value, norm, forbidden = 0.0, 0.0, None
        for child, weight in self.items:
            child_value, child_norm = child.evaluate(ctx)
            norm = norm + weight * child_norm
            if torch.is_tensor(child_value):
                neg_inf = torch.isneginf(child_value)
                forbidden = neg_inf if forbidden is None else forbidden | neg_inf
                child_value = torch.where(neg_inf, 0.0, child_value)
            value = value + weight * child_value
        if forbidden is not None:
            value = value.masked_fill(forbidden, NEG_INF)
        return value, norm

    def norm_bounds(self) -> tuple[float, float]:
        low = high = 0.0
        for child, weight in self.items:
            child_low, child_high = child.norm_bounds()
            low += min(weight * child_low, weight * child_high)
            high += max(weight * child_low, weight * child_high)
        return low, high

    def __str__(self) -> str:
        text = ""
        for child, weight in self.items:
            sign = " - " if weight < 0 else " + "
            size = abs(weight)
            text += sign + (str(child) if size == 1 else f"{size:g}*{child}")
        return text.removeprefix(" + ").replace(" - ", "-", 1) if text.startswith(" - ") \
            else text.removeprefix(" + ") or "0"
