"""Formula composition over stacked term logits: every row's formula turns its terms' raw
logits into normalised log-probs. Rows with a plan share one fused combine call (the kernel
dispatch picks C++ on CPU, Triton on CUDA); rows without one use Formula.log_probs, with their Classifier terms scored in one batched
classifier forward per spec (classifier.py)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..bindings.ops import combine
from ..formula import Formula, Plan, stack_plans
from .classifier import ClassifierInput, classifier_closures


def stack_term_logits(term_logits: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
    """Rows of per-term logits [V] -> [T_max, B, V]; missing slots are zeros (weight 0).
    Rows that are equally spaced rows of one logits tensor (one model's forward, in batch
    order: the usual case) give a view, not a copy: torch.stack of 16 vocabulary rows took
    1.3-1.6 ms here, and every vocabulary-sized torch op wakes the OpenMP team."""
    num_terms = max(len(row) for row in term_logits)
    if all(len(row) == num_terms for row in term_logits):
        slots = [_spaced_view([row[slot] for row in term_logits]) for slot in range(num_terms)]
        if all(slot is not None for slot in slots):
            stacked = _spaced_view(slots)
            return stacked if stacked is not None else torch.stack(slots)
    filler = torch.zeros_like(term_logits[0][0])
    return torch.stack([torch.stack([row[slot] if slot < len(row) else filler for row in term_logits])
                        for slot in range(num_terms)])


def _spaced_view(tensors: Sequence[torch.Tensor]) -> Optional[torch.Tensor]:
    """tensors (one shape, strides and dtype) as one view with a new leading dim when they
    sit at equally spaced offsets of one storage, else None."""
    first = tensors[0]
    step = tensors[1].storage_offset() - first.storage_offset() if len(tensors) > 1 else 0
    storage = first.untyped_storage().data_ptr()
    if step < 0 or any(
            t.shape != first.shape or t.stride() != first.stride() or t.dtype != first.dtype
            or t.untyped_storage().data_ptr() != storage
            or t.storage_offset() != first.storage_offset() + index * step
            for index, t in enumerate(tensors)):
        return None
    return first.as_strided((len(tensors),) + tuple(first.shape), (step,) + first.stride())


def compose(formulas: Sequence[Formula], plans: Sequence[Optional[Plan]],
            term_logits: Sequence[Sequence[torch.Tensor]],
            classifiers: Optional[Sequence[Optional[ClassifierInput]]] = None) -> torch.Tensor:
    """Normalised log-probs [B, V] (float32) of each row's formula on its terms' logits;
    classifiers[i] is what row i's Classifier terms need (None: the row has none), and every
    row's classifier texts are scored together, one forward per classifier."""
    stacked = stack_term_logits(term_logits)
    planned = [row for row, plan in enumerate(plans) if plan is not None]
    if len(planned) == len(plans):      # every row compiled: one kernel, no gather or scatter
        return combine(stacked.contiguous(), *stack_plans(plans, device=stacked.device))[0]
    result = torch.empty(stacked.shape[1], stacked.shape[-1], dtype=torch.float32, device=stacked.device)
    if planned:
        plan_tensors = stack_plans([plans[row] for row in planned], device=stacked.device)
        result[planned] = combine(stacked[:, planned].contiguous(), *plan_tensors)[0]
    general = [row for row, plan in enumerate(plans) if plan is None]
    rows_logits = [stacked[: len(term_logits[row]), row: row + 1] for row in general]
    inputs = [classifiers[row] if classifiers is not None else None for row in general]
    closures = classifier_closures([formulas[row] for row in general], rows_logits, inputs)
    for row, logits, closure in zip(general, rows_logits, closures):
        result[row] = formulas[row].log_probs(logits, classifier_scores=closure)[0]
    return result
