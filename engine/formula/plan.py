"""Compile a formula into the flat plan the fused combine kernels evaluate.

A plan has R = 1 + 2G linear row-blocks over the formula's T terms: row-block 0 is the
top-level weighted sum, and each Union/Intersection group g combines row-blocks 1+2g and
2+2g, scaled by its coefficient. A Plausible node around the whole formula adds a
plausibility mask: one more linear row over the terms (its reference, divided by the
reference's norm) and log(alpha); the kernels set -inf on the tokens whose reference score
is below the row's maximum + log(alpha), which is p_ref < alpha * max p_ref because the
softmax's normaliser shifts every token alike. Which node plays which part is read from the
registry (plan_role); formulas outside this shape (TopPTopK, SelfDebias, Indicator,
Classifier, nested groups, a nested or non-linear-reference Plausible) have no plan and are
evaluated by Formula.log_probs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import math

import torch

from .node import Formula
from .registry import node_info

GROUP_KINDS = {"max": 1, "min": -1}
NO_MASK = float("-inf")   # mask_log_alpha of a plan without a plausibility mask: keeps every token


@dataclass(frozen=True)
class Plan:
    """Weights [R][T], constants [R], group coefficients [G] and kinds (+1 max, -1 min),
    and the plausibility mask: mask_weights [T] (the reference's weights over the terms,
    divided by its norm when that is nonzero) and mask_log_alpha = log(alpha); a token is
    kept iff sum_t mask_weights[t] * L_t >= its row maximum + mask_log_alpha. No mask (every
    plan but a Plausible one): mask_weights () and mask_log_alpha NO_MASK (-inf)."""

    terms: tuple
    weights: tuple[tuple[float, ...], ...]
    consts: tuple[float, ...]
    group_coefs: tuple[float, ...]
    group_kinds: tuple[int, ...]
    mask_weights: tuple[float, ...] = ()
    mask_log_alpha: float = NO_MASK

    @property
    def num_row_blocks(self) -> int:
        return len(self.consts)

    @property
    def masked(self) -> bool:
        """True when the plan carries a plausibility mask (a top-level Plausible)."""
        return self.mask_log_alpha > NO_MASK

    def tensors(self, batch_size: int = 1, device="cpu"):
        """The plan as kernel inputs for batch_size rows: see stack_plans."""
        return stack_plans([self] * batch_size, device=device)


class _LinearBuilder:
    """Accumulates one row-block: a weight per term and a constant."""

    def __init__(self, terms: dict) -> None:
        self.terms = terms
        self.weights: dict[int, float] = {}
        self.const = 0.0

    def add(self, node: Formula, weight: float) -> bool:
        """Add weight*node; False when node is not a plain linear combination of terms."""
        role = node_info(node).plan_role
        if role == "term":
            index = self.terms.setdefault(node.canonical(), len(self.terms))
            self.weights[index] = self.weights.get(index, 0.0) + weight
            return True
        if role == "constant":
            self.const += weight * node.value
            return True
        if role == "linear":
            return all(self.add(child, weight * child_weight) for child, child_weight in node.items)
        return False

    def row(self, num_terms: int) -> tuple[float, ...]:
        return tuple(self.weights.get(t, 0.0) for t in range(num_terms))


def _body(formula: Formula, terms: dict):
    """The row-blocks (top, then each group's two sides), group coefficients and kinds of a
    weighted sum of terms and Union/Intersection groups; None for any other shape."""
    top = _LinearBuilder(terms)
    sides: list[_LinearBuilder] = []
    coefs: list[float] = []
    kinds: list[int] = []
    linear = node_info(formula).plan_role == "linear"
    for node, weight in (formula.items if linear else ((formula, 1.0),)):
        role = node_info(node).plan_role
        if role in GROUP_KINDS:
            left, right = _LinearBuilder(terms), _LinearBuilder(terms)
            if not (left.add(node.left, 1.0) and right.add(node.right, 1.0)):
                return None
            sides += [left, right]
            coefs.append(weight)
            kinds.append(GROUP_KINDS[role])
        elif not top.add(node, weight):
            return None
    return [top] + sides, tuple(coefs), tuple(kinds)


def _mask(plausible: Formula, terms: dict) -> Optional[_LinearBuilder]:
    """The reference of a Plausible node as a row over the terms, divided by its norm (as
    normalise does); None unless it is a linear combination of terms with norm >= 0."""
    reference = _LinearBuilder(terms)
    if not reference.add(plausible.reference, 1.0) or not reference.weights:
        return None
    norm = sum(reference.weights.values()) + reference.const
    if norm < 0:  # dividing by it would flip -inf to +inf: leave it to Formula.log_probs
        return None
    if norm != 0:
        reference.weights = {t: w / norm for t, w in reference.weights.items()}
    return reference


def compile_plan(formula: Formula) -> Optional[Plan]:
    """The fused-kernel plan of a formula, or None when it needs the general evaluator."""
    formula.validate()
    terms: dict = {leaf: i for i, leaf in enumerate(formula.terms)}
    mask, mask_log_alpha = None, NO_MASK
    if node_info(formula).plan_role == "mask":
        mask, mask_log_alpha = _mask(formula, terms), math.log(formula.alpha)
        if mask is None:
            return None
        formula = formula.formula
    body = _body(formula, terms)
    if body is None:
        return None
    blocks, coefs, kinds = body
    num_terms = len(terms)
    return Plan(terms=tuple(terms), weights=tuple(b.row(num_terms) for b in blocks),
                consts=tuple(b.const for b in blocks), group_coefs=coefs, group_kinds=kinds,
                mask_weights=mask.row(num_terms) if mask else (), mask_log_alpha=mask_log_alpha)


def stack_plans(plans: Sequence[Plan], device="cpu"):
    """Per-row plans padded to a common shape: (weights [B,R,T], consts [B,R], coefs [B,G],
    kinds [B,G], mask_weights [B,T], mask_log_alpha [B]); the two mask tensors are None when
    no row is masked (the kernels then skip the mask), else unmasked rows get weights 0 and
    log_alpha -inf, so one batch mixes masked and unmasked rows.

    Row b's terms occupy the first len(plans[b].terms) slots of the stacked logits; padding
    slots get weight 0 (the kernels ignore their logits) and padding groups coefficient 0.
    """
    num_terms = max(len(p.terms) for p in plans)
    num_groups = max(len(p.group_coefs) for p in plans)
    num_blocks = 1 + 2 * num_groups
    weights = [_padded([_padded(list(block), num_terms) for block in plan.weights], num_blocks,
                       [0.0] * num_terms) for plan in plans]
    consts = [_padded(list(plan.consts), num_blocks) for plan in plans]
    coefs = [_padded(list(plan.group_coefs), num_groups) for plan in plans]
    kinds = [_padded(list(plan.group_kinds), num_groups, 1) for plan in plans]
    tensors = (torch.tensor(weights, dtype=torch.float32).reshape(len(plans), num_blocks, num_terms),
               torch.tensor(consts, dtype=torch.float32).reshape(len(plans), num_blocks),
               torch.tensor(coefs, dtype=torch.float32).reshape(len(plans), num_groups),
               torch.tensor(kinds, dtype=torch.int32).reshape(len(plans), num_groups))
    tensors += _stack_masks(plans, num_terms)
    return tuple(t if t is None else t.to(device) for t in tensors)


def _padded(values: list, length: int, filler=0.0) -> list:
    """values extended with filler to length (the plans' common shape); one Python list per
    field, then one tensor, costs a tenth of filling a tensor row by row at batch 16."""
    return values + [filler] * (length - len(values))


def _stack_masks(plans: Sequence[Plan], num_terms: int):
    """(mask_weights [B,T], mask_log_alpha [B]) of the plans, or (None, None) when none is masked."""
    if not any(plan.masked for plan in plans):
        return None, None
    mask_weights = [_padded(list(plan.mask_weights) if plan.masked else [], num_terms)
                    for plan in plans]
    mask_log_alpha = [plan.mask_log_alpha if plan.masked else NO_MASK for plan in plans]
    return (torch.tensor(mask_weights, dtype=torch.float32).reshape(len(plans), num_terms),
            torch.tensor(mask_log_alpha, dtype=torch.float32))


def served_by_engine(formula: Formula) -> Optional[str]:
    """The op name of the first node the engine cannot serve, or None when it serves them all."""
    for node in formula.nodes():
        info = node_info(node)
        if not info.engine:
            return info.op
    return None


def restrict_plan(plan: Plan, present: Sequence[bool]) -> Plan:
    """The plan over only the present terms (speculation's partial formula): absent terms get
    weight 0, and a Union/Intersection side left without any of its terms drops out, so the
    group becomes its other side (added to the top-level block). A masked plan has no partial
    law (its reference may lose terms), so speculation rejects Plausible formulas up front."""
    if plan.masked:
        raise ValueError("restrict_plan: a plan with a plausibility mask (Plausible) has no "
                         "partial law over a subset of its terms")

    def keep(row):
        return tuple(w if present[t] else 0.0 for t, w in enumerate(row))

    def emptied(row):
        return any(row) and not any(keep(row))

    top, top_const = list(keep(plan.weights[0])), plan.consts[0]
    blocks, consts, coefs, kinds = [], [], [], []
    for g, (coef, kind) in enumerate(zip(plan.group_coefs, plan.group_kinds)):
        sides = [(plan.weights[1 + 2 * g + s], plan.consts[1 + 2 * g + s]) for s in (0, 1)]
        alive = [(keep(row), const) for row, const in sides if not emptied(row)]
        if len(alive) == 2:
            blocks += [alive[0][0], alive[1][0]]
            consts += [alive[0][1], alive[1][1]]
            coefs.append(coef)
            kinds.append(kind)
        elif alive:
            top = [a + coef * b for a, b in zip(top, alive[0][0])]
            top_const += coef * alive[0][1]
    return Plan(terms=plan.terms, weights=(tuple(top), *blocks), consts=(top_const, *consts),
                group_coefs=tuple(coefs), group_kinds=tuple(kinds))


def plan_norm_bounds(plan: Plan) -> tuple[float, float]:
    """Smallest and largest total norm the plan can give a token (a mask changes no norm)."""
    norms = [sum(row) + const for row, const in zip(plan.weights, plan.consts)]
    low = high = norms[0]
    for g, coef in enumerate(plan.group_coefs):
        options = (coef * norms[1 + 2 * g], coef * norms[2 + 2 * g])
        low, high = low + min(options), high + max(options)
    return low, high
