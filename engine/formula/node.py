"""The formula base class and the linear nodes. Every node evaluates to an unnormalised
(value, norm) pair per token, as in the paper's reference implementation (Dekoninck et al.,
ICLR 2024):
  model term      value = log_softmax(logits) in float32, norm 1
  Constant(c)     value c, norm c
  sum / scaling   values and norms combine linearly with the same coefficients
  output          log_softmax(value / norm) where norm != 0, log_softmax(value) elsewhere
A token some contributing term forbids (log-prob -inf) stays forbidden: -inf is absorbing
in sums instead of turning into +inf under a negative weight.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from typing import Any, Callable, Mapping, Optional, Union as TypingUnion

import torch

from ..errors import FormulaError
from . import registry

NEG_INF = float("-inf")
FLOAT32_MAX = 3.4028234663852886e38
Norm = TypingUnion[float, torch.Tensor]


@dataclass
class EvalContext:
    """What a node needs to evaluate: each term's log-probs and the classifier scorer."""

    term_log_probs: Mapping[Any, torch.Tensor]
    classifier_scores: Optional[Callable[["Formula", torch.Tensor], torch.Tensor]] = None


def coefficient(value: Any, what: str) -> float:
    """A real number usable in float32 kernels, or FormulaError naming what it was for."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FormulaError(f"{what} must be a number, not {value!r}; products of two formulas "
                           "are not part of model arithmetic")
    number = float(value)
    if not math.isfinite(number) or abs(number) > FLOAT32_MAX:
        raise FormulaError(f"{what} is {value!r}; use a finite number below 3.4e38 in magnitude "
                           "(weights are float32 in the kernels)")
    return number


def number_text(value: float) -> str:
    """The shortest text that parses back to the same float ("2" for 2.0)."""
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


def value_text(value: Any) -> str:
    """A field value in formula-string syntax: formulas as formulas, numbers, quoted strings."""
    if isinstance(value, Formula):
        return str(value)
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, (int, float)):
        return number_text(value)
    return repr(value)


def call_text(name: str, *args: Any, **kwargs: Any) -> str:
    """name(arg, ..., key=value, ...) in formula-string syntax."""
    parts = [value_text(a) for a in args] + [f"{k}={value_text(v)}" for k, v in kwargs.items()]
    return f"{name}({', '.join(parts)})"


class Formula:
    """Base of every formula node: arithmetic operators, leaves, evaluation, JSON."""

    def children(self) -> tuple["Formula", ...]:
        return ()

    def __str__(self) -> str:
        """Formula-string syntax (lmarith.parse_formula reads it back): sub-formulas as
        positional arguments, the other fields as keywords."""
        values = [(f.name, getattr(self, f.name)) for f in fields(self)]
        return call_text(type(self).__name__, *[v for _, v in values if isinstance(v, Formula)],
                         **{k: v for k, v in values if not isinstance(v, Formula)})

    def evaluate(self, ctx: EvalContext) -> tuple[TypingUnion[float, torch.Tensor], Norm]:
        """Unnormalised (value, norm) of this node; values are [B, V] tensors or floats."""
        raise NotImplementedError

    def norm_bounds(self) -> tuple[float, float]:
        """Smallest and largest norm this node can have on any token."""
        raise NotImplementedError

    def canonical(self) -> "Formula":
        """The node that stands for this one inside a sum (a bare model -> its term)."""
        return self

    @property
    def terms(self) -> tuple:
        """The distinct leaf terms in first-appearance (depth-first) order."""
        return tuple(dict.fromkeys(self._leaves()))

    def _leaves(self):
        for child in self.children():
            yield from child._leaves()

    def nodes(self):
        """Every node of the tree, depth-first, this one first."""
        yield self
        for child in self.children():
            yield from child.nodes()

    def validate(self) -> "Formula":
        """Reject a formula with no model term or whose total norm can be negative."""
        if not self.terms:
            raise FormulaError(f"the formula {self} has no model term with a non-zero weight; "
                               "add a model term such as M(path) or m.prompt(...)")
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

    def to_dict(self, encode: Callable[[Any], dict]) -> dict[str, Any]:
        """This node's fields for JSON; sub-formulas through encode."""
        return {f.name: encode(v) if isinstance(v, Formula) else v
                for f in fields(self) for v in [getattr(self, f.name)]}

    @classmethod
    def from_dict(cls, data: dict[str, Any], decode: Callable[[Any, str], Any]) -> "Formula":
        """The node from its JSON fields; sub-formulas (objects) through decode."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names - {"op"})
        if unknown:
            raise FormulaError(f"unknown field(s) {', '.join(unknown)} for op {data['op']!r}; "
                               f"expected {', '.join(sorted(names))}")
        return cls(**{name: decode(value, name) if isinstance(value, dict) else value
                      for name, value in data.items() if name in names})

    def to_json(self) -> str:
        return json.dumps(registry.encode(self), sort_keys=True)

    @staticmethod
    def from_json(text: str) -> "Formula":
        if not isinstance(text, (str, bytes, bytearray)):
            raise FormulaError(f"formula JSON must be a string, got {type(text).__name__}")
        try:
            data = json.loads(text, parse_constant=_reject_constant)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise FormulaError(f"malformed formula JSON: {error}") from error
        except RecursionError:
            raise FormulaError("formula JSON nests too deeply") from None
        return registry.decode(data)

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
        return Linear.of((self, coefficient(other, "a formula's multiplier")))

    __rmul__ = __mul__

    def __truediv__(self, other) -> "Formula":
        divisor = coefficient(other, "a formula's divisor")
        if divisor == 0:
            raise FormulaError(f"cannot divide {self} by zero")
        return Linear.of((self, 1.0 / divisor))


def _reject_constant(name: str):
    raise FormulaError(f"formula JSON contains {name}; weights must be finite numbers")


def as_formula(value) -> Formula:
    """Numbers become Constants; formulas pass through in canonical form (a bare Model as
    its Term), so that equal formulas compare equal however they were written."""
    if isinstance(value, Formula):
        return value.canonical()
    return Constant(coefficient(value, "a constant in a formula"))


def normalise(value, norm: Norm) -> torch.Tensor:
    """Final step: divide by the norm where it is non-zero, then log_softmax."""
    if not torch.is_tensor(value):
        raise FormulaError("a formula made only of constants has no distribution; add a model term")
    norm = torch.as_tensor(norm, dtype=value.dtype, device=value.device)
    scores = torch.where(norm != 0, value / torch.where(norm != 0, norm, 1.0), value)
    scores = torch.where(torch.isnan(scores), NEG_INF, scores)
    return torch.log_softmax(scores, dim=-1)


@registry.register("constant", plan_role="constant")
@dataclass(frozen=True)
class Constant(Formula):
    """A number inside a formula: value c and norm c, as in the reference."""

    value: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "value", coefficient(self.value, "Constant's value"))

    def evaluate(self, ctx: EvalContext):
        return self.value, self.value

    def norm_bounds(self) -> tuple[float, float]:
        return self.value, self.value

    def __str__(self) -> str:
        return call_text("Constant", self.value)


@registry.register("linear", plan_role="linear")
@dataclass(frozen=True)
class Linear(Formula):
    """A weighted sum of sub-formulas; built by +, -, * and /, flattened and merged."""

    items: tuple[tuple[Formula, float], ...]

    def __post_init__(self) -> None:
        if not isinstance(self.items, (tuple, list)):
            raise FormulaError(f"Linear items must be a list of [formula, weight] pairs, got {self.items!r}")
        checked = []
        for pair in self.items:
            if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not isinstance(pair[0], Formula):
                raise FormulaError(f"each Linear item must be a [formula, weight] pair, got {pair!r}")
            checked.append((pair[0], coefficient(pair[1], f"the weight of {pair[0]}")))
        object.__setattr__(self, "items", tuple(checked))

    @staticmethod
    def of(*weighted: tuple[Formula, float]) -> Formula:
        merged: dict[Formula, float] = {}
        for formula, weight in weighted:
            inner = formula.items if isinstance(formula, Linear) else ((formula, 1.0),)
            for child, child_weight in inner:
                key = child.canonical()
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

    def to_dict(self, encode) -> dict[str, Any]:
        return {"items": [[encode(child), weight] for child, weight in self.items]}

    @classmethod
    def from_dict(cls, data, decode) -> "Linear":
        items = data["items"]
        if not isinstance(items, list):
            raise FormulaError(f"\"items\" of a linear node must be a list, got {type(items).__name__}")
        pairs = []
        for index, pair in enumerate(items):
            if not isinstance(pair, list) or len(pair) != 2:
                raise FormulaError(f"item {index} of a linear node must be [formula, weight], got {pair!r}")
            pairs.append((decode(pair[0], f"items[{index}]"), pair[1]))
        return cls(tuple(pairs))

    def __str__(self) -> str:
        pieces = []
        for child, weight in self.items:
            size = abs(weight)
            alone = len(self.items) == 1       # "1*M()" keeps a one-item sum a sum when read back
            body = str(child) if size == 1 and not alone else f"{number_text(size)}*{_operand(child)}"
            pieces.append(("-" if weight < 0 else "+", body))
        if not pieces:           # an empty sum (m - m): "0*Constant(0)" reads back as one
            return "0*Constant(0)"
        first_sign, first = pieces[0]
        return ("-" if first_sign == "-" else "") + first + "".join(
            f" {sign} {body}" for sign, body in pieces[1:])


def _operand(child: Formula) -> str:
    """A child of a product, parenthesised when it is itself a sum."""
    return f"({child})" if isinstance(child, Linear) else str(child)
