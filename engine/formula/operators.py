"""Formula nodes beyond linear arithmetic: Union/Intersection, filtering, self-debiasing,
indicators, the plausibility constraint and classifier guidance. Each evaluates to an unnormalised (value, norm) pair
(conventions in node.py) and registers itself with its capabilities."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from ..errors import FormulaError
from . import registry
from .node import NEG_INF, EvalContext, Formula, as_formula, call_text, coefficient, normalise


def _integer(value, what: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise FormulaError(f"{what} must be an integer >= {low}, got {value!r}")
    return value


@registry.register("union", plan_role="max")
@dataclass(frozen=True, init=False)
class Union(Formula):
    """max(a, b) per token, norm of the winner: tokens likely under either side."""

    left: Formula
    right: Formula

    def __init__(self, left=None, right=None, *more) -> None:
        if left is None or right is None:
            raise FormulaError(f"{type(self).__name__} needs at least two formulas, got "
                               f"{sum(side is not None for side in (left, right))}")
        if more:
            left, right = type(self)(left, right), type(self)(*more) if len(more) > 1 else more[0]
        object.__setattr__(self, "left", as_formula(left))
        object.__setattr__(self, "right", as_formula(right))

    def children(self) -> tuple[Formula, ...]:
        return self.left, self.right

    def left_wins(self, left_value, right_value):
        return left_value >= right_value

    def evaluate(self, ctx: EvalContext):
        left_value, left_norm = self.left.evaluate(ctx)
        right_value, right_norm = self.right.evaluate(ctx)
        left_value, right_value = _broadcast(left_value, right_value)
        wins = self.left_wins(left_value, right_value)
        value = torch.where(wins, left_value, right_value)
        norm = torch.where(wins, torch.as_tensor(left_norm, device=value.device),
                           torch.as_tensor(right_norm, device=value.device))
        return value, norm.float()

    def norm_bounds(self) -> tuple[float, float]:
        (a_low, a_high), (b_low, b_high) = self.left.norm_bounds(), self.right.norm_bounds()
        return min(a_low, b_low), max(a_high, b_high)

    def __str__(self) -> str:
        return call_text(type(self).__name__, self.left, self.right)


@registry.register("intersection", plan_role="min")
@dataclass(frozen=True, init=False)
class Intersection(Union):
    """min(a, b) per token, norm of the winner: tokens likely under both sides."""

    def left_wins(self, left_value, right_value):
        return left_value < right_value


Max = Union
Min = Intersection


def _broadcast(left, right):
    """Make two values tensors of one shape (a Constant side is a float)."""
    if not torch.is_tensor(left) and not torch.is_tensor(right):
        raise FormulaError("Union/Intersection of two constants has no distribution")
    like = left if torch.is_tensor(left) else right
    return torch.as_tensor(left, dtype=like.dtype, device=like.device).expand_as(like), \
        torch.as_tensor(right, dtype=like.dtype, device=like.device).expand_as(like)


def _filter_top_k_top_p(scores: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set scores outside the top-k and outside the top-p nucleus to -inf."""
    if 0 < top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, NEG_INF)
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        mass_before = torch.cumsum(torch.softmax(sorted_scores, dim=-1), dim=-1)
        mass_before = mass_before - torch.softmax(sorted_scores, dim=-1)
        drop_sorted = mass_before > top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, NEG_INF)
    return scores


@registry.register("top_p_top_k")
@dataclass(frozen=True)
class TopPTopK(Formula):
    """Normalise f, divide by temperature, keep its top-k / top-p tokens, re-normalise.

    value = log_softmax(filter(normalise(f) / T)) * norm(f), norm = norm(f): the filtered
    distribution enters its parent with f's weight. Filtered tokens are -inf (forbidden),
    where the reference uses -1e8 (which a negative weight turns into a huge bonus).
    """

    formula: Formula
    top_k: int = 0
    top_p: float = 1.0
    temperature: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "formula", as_formula(self.formula))
        object.__setattr__(self, "top_k", _integer(self.top_k, "TopPTopK's top_k", 0))
        object.__setattr__(self, "top_p", coefficient(self.top_p, "TopPTopK's top_p"))
        object.__setattr__(self, "temperature", coefficient(self.temperature, "TopPTopK's temperature"))
        if not 0 < self.top_p <= 1 or self.temperature <= 0:
            raise FormulaError(f"TopPTopK needs 0 < top_p <= 1 and temperature > 0; "
                               f"got top_p={self.top_p}, temperature={self.temperature}")

    def children(self):
        return (self.formula,)

    def evaluate(self, ctx: EvalContext):
        value, norm = self.formula.evaluate(ctx)
        scores = normalise(value, norm) / self.temperature
        filtered = torch.log_softmax(_filter_top_k_top_p(scores, self.top_k, self.top_p), dim=-1)
        norm_tensor = torch.as_tensor(norm, dtype=filtered.dtype, device=filtered.device)
        scaled = torch.where(norm_tensor != 0, filtered * norm_tensor, filtered)
        return torch.where(torch.isneginf(filtered), NEG_INF, scaled), norm

    def norm_bounds(self):
        return self.formula.norm_bounds()


@registry.register("self_debias")
@dataclass(frozen=True)
class SelfDebias(Formula):
    """Push down tokens the biased formula likes more than f (Schick et al., 2021).

    value = log_softmax(f + strength * min(exp(f) - exp(bias), 0)), norm 1; f and bias are
    their unnormalised values, as in the reference.
    """

    formula: Formula
    bias: Formula
    strength: float = 50.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "formula", as_formula(self.formula))
        object.__setattr__(self, "bias", as_formula(self.bias))
        object.__setattr__(self, "strength", coefficient(self.strength, "SelfDebias's strength"))

    def children(self):
        return self.formula, self.bias

    def evaluate(self, ctx: EvalContext):
        value, _ = self.formula.evaluate(ctx)
        bias, _ = self.bias.evaluate(ctx)
        penalty = torch.clamp(torch.exp(torch.as_tensor(value)) - torch.exp(torch.as_tensor(bias)), max=0)
        return torch.log_softmax(value + self.strength * penalty, dim=-1), 1.0

    def norm_bounds(self):
        return 1.0, 1.0


@registry.register("indicator")
@dataclass(frozen=True)
class Indicator(Formula):
    """1[f >= 0] per token as both value and norm, as in the reference (a mask)."""

    formula: Formula

    def __post_init__(self) -> None:
        object.__setattr__(self, "formula", as_formula(self.formula))

    def children(self):
        return (self.formula,)

    def evaluate(self, ctx: EvalContext):
        value, _ = self.formula.evaluate(ctx)
        mask = (torch.as_tensor(value) >= 0).float()
        return mask, mask

    def norm_bounds(self):
        return 0.0, 1.0


@registry.register("plausible", plan_role="mask")
@dataclass(frozen=True)
class Plausible(Formula):
    """f restricted to the tokens `reference` finds plausible, p_ref(x) >= alpha * max p_ref
    (contrastive decoding's adaptive plausibility constraint); -inf elsewhere, norm(f).
    Around a whole plannable formula with a linear reference it compiles into the fused
    combine kernel's plausibility mask (plan.py)."""

    formula: Formula
    reference: Formula
    alpha: float = 0.1

    def __post_init__(self) -> None:
        object.__setattr__(self, "formula", as_formula(self.formula))
        object.__setattr__(self, "reference", as_formula(self.reference))
        object.__setattr__(self, "alpha", coefficient(self.alpha, "Plausible's alpha"))
        if not 0 < self.alpha <= 1:
            raise FormulaError(f"Plausible needs 0 < alpha <= 1, got {self.alpha}")

    def children(self):
        return self.formula, self.reference

    def evaluate(self, ctx: EvalContext):
        value, norm = self.formula.evaluate(ctx)
        reference = normalise(*self.reference.evaluate(ctx))
        threshold = reference.max(dim=-1, keepdim=True).values + math.log(self.alpha)
        value = torch.as_tensor(value, device=reference.device).expand_as(reference)
        return torch.where(reference >= threshold, value, NEG_INF), norm

    def norm_bounds(self):
        return self.formula.norm_bounds()


@dataclass(frozen=True)
class ClassifierSpec:
    """A sequence-classification model scoring text: P(label | template.format(input=text))."""

    path: str
    label: int = 1
    template: str = "{input}"
    dtype: str = "float32"


@registry.register("classifier")
@dataclass(frozen=True)
class Classifier(Formula):
    """Guide by a classifier on the top-k tokens of a base formula (FUDGE-style, Bayes rule).

    value = log P(label | prefix + t) - log P(label | prefix) for the k most likely tokens t
    of normalise(base), 0 elsewhere; norm 0, so it biases without entering the normaliser.
    Scores come from EvalContext.classifier_scores(node, top_token_ids [B, k]) -> [B, k]: the
    engine scores a step's texts in one batched forward per classifier (decoding/classifier.py).
    """

    base: Formula
    classifier: ClassifierSpec
    k: int = 50

    def __post_init__(self) -> None:
        object.__setattr__(self, "base", as_formula(self.base))
        if isinstance(self.classifier, str):
            object.__setattr__(self, "classifier", ClassifierSpec(self.classifier))
        _integer(self.k, "Classifier's k", 1)

    def children(self):
        return (self.base,)

    def top_tokens(self, ctx: EvalContext) -> torch.Tensor:
        """The k candidate token ids [B, k] the classifier scores."""
        base_log_probs = normalise(*self.base.evaluate(ctx))
        return torch.topk(base_log_probs, min(self.k, base_log_probs.shape[-1]), dim=-1).indices

    def evaluate(self, ctx: EvalContext):
        if ctx.classifier_scores is None:
            raise FormulaError("this formula has a Classifier: pass classifier_scores to log_probs "
                               "(lmarith.reference.generate does this for you)")
        candidates = self.top_tokens(ctx)
        base_value, _ = self.base.evaluate(ctx)
        value = torch.zeros_like(torch.as_tensor(base_value, dtype=torch.float32))
        scores = ctx.classifier_scores(self, candidates).to(value.dtype)
        return value.scatter(-1, candidates, scores), 0.0

    def norm_bounds(self):
        return 0.0, 0.0

    def to_dict(self, encode):
        return {"base": encode(self.base), "k": self.k, "classifier": asdict(self.classifier)}

    @classmethod
    def from_dict(cls, data, decode):
        return cls(decode(data["base"], "base"), ClassifierSpec(**data["classifier"]), data["k"])
