"""composer.stack_term_logits gives views of the logits rows when they are equally spaced in
one tensor (and copies otherwise), always equal to the plain torch.stack; stack_plans pads
mixed plans exactly as a row-by-row fill does."""
import pytest
import torch

from lmarith.decoding.composer import stack_term_logits
from lmarith.formula import Plan, stack_plans
from lmarith.formula.plan import NO_MASK

VOCAB = 37


def reference_stack(term_logits):
    """[T_max, B, V] with zeros for missing slots, by plain copies."""
    num_terms = max(len(row) for row in term_logits)
    filler = torch.zeros_like(term_logits[0][0])
    return torch.stack([torch.stack([row[slot] if slot < len(row) else filler for row in term_logits])
                        for slot in range(num_terms)])


def shares_storage(view, base):
    return view.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()


@pytest.mark.parametrize("batch,terms", [(1, 1), (5, 1), (1, 3), (4, 3), (7, 2)])
def test_rows_of_one_forward_are_viewed(batch, terms):
    base = torch.randn(batch * terms + 2, VOCAB)[1:-1]          # request-major, offset rows
    rows = [[base[r * terms + t] for t in range(terms)] for r in range(batch)]
    stacked = stack_term_logits(rows)
    assert torch.equal(stacked, reference_stack(rows))
    assert shares_storage(stacked, base)
    base.add_(1.0)                                             # a view follows its base
    assert torch.equal(stacked, reference_stack(rows))


def test_terms_on_different_models_copy_once_per_slot():
    first, second = torch.randn(3, VOCAB), torch.randn(3, VOCAB)
    rows = [[first[r], second[r]] for r in range(3)]
    stacked = stack_term_logits(rows)
    assert stacked.shape == (2, 3, VOCAB)
    assert torch.equal(stacked, reference_stack(rows))


@pytest.mark.parametrize("order", [[0, 2, 1], [0, 1, 3], [1, 1, 1]])
def test_unevenly_spaced_or_repeated_rows(order):
    base = torch.randn(4, VOCAB)
    rows = [[base[index]] for index in order]
    assert torch.equal(stack_term_logits(rows), reference_stack(rows))


def test_mixed_term_counts_and_strided_rows():
    base = torch.randn(6, 2 * VOCAB)
    rows = [[base[0, ::2], base[1, ::2]], [base[2, :VOCAB]], [base[3, VOCAB:], base[4, VOCAB:]]]
    stacked = stack_term_logits(rows)
    assert torch.equal(stacked, reference_stack(rows))
    assert torch.equal(stacked[1, 1], torch.zeros(VOCAB))


def test_bfloat16_rows_beside_float_rows_are_not_viewed_together():
    base = torch.randn(2, VOCAB)
    rows = [[base[0]], [base[1].bfloat16().float()]]
    assert torch.equal(stack_term_logits(rows), reference_stack(rows))


def fill_row_by_row(plans):
    """stack_plans' specification: zero tensors of the common shape, each row filled in."""
    num_terms = max(len(p.terms) for p in plans)
    num_groups = max(len(p.group_coefs) for p in plans)
    weights = torch.zeros(len(plans), 1 + 2 * num_groups, num_terms)
    consts = torch.zeros(len(plans), 1 + 2 * num_groups)
    coefs = torch.zeros(len(plans), num_groups)
    kinds = torch.ones(len(plans), num_groups, dtype=torch.int32)
    mask_weights = torch.zeros(len(plans), num_terms)
    log_alpha = torch.full((len(plans),), NO_MASK)
    for row, plan in enumerate(plans):
        weights[row, : len(plan.consts), : len(plan.terms)] = torch.tensor(plan.weights)
        consts[row, : len(plan.consts)] = torch.tensor(plan.consts)
        coefs[row, : len(plan.group_coefs)] = torch.tensor(plan.group_coefs)
        kinds[row, : len(plan.group_kinds)] = torch.tensor(plan.group_kinds, dtype=torch.int32)
        if plan.masked:
            mask_weights[row, : len(plan.terms)] = torch.tensor(plan.mask_weights)
            log_alpha[row] = plan.mask_log_alpha
    masked = any(plan.masked for plan in plans)
    return weights, consts, coefs, kinds, mask_weights if masked else None, log_alpha if masked else None


def random_plan(generator, masked):
    terms = int(torch.randint(1, 4, (1,), generator=generator))
    groups = int(torch.randint(0, 3, (1,), generator=generator))
    blocks = 1 + 2 * groups

    def values(count):
        return tuple(torch.randn(count, generator=generator).tolist())

    return Plan(terms=tuple(range(terms)), weights=tuple(values(terms) for _ in range(blocks)),
                consts=values(blocks), group_coefs=values(groups),
                group_kinds=tuple(int(k) for k in torch.randint(0, 2, (groups,), generator=generator) * 2 - 1),
                mask_weights=values(terms) if masked else (),
                mask_log_alpha=-1.5 if masked else NO_MASK)


@pytest.mark.parametrize("seed", range(6))
def test_stack_plans_matches_row_by_row_fill(seed):
    generator = torch.Generator().manual_seed(seed)
    plans = [random_plan(generator, masked=seed % 2 == 1 and row % 2 == 0) for row in range(5)]
    for got, want in zip(stack_plans(plans), fill_row_by_row(plans)):
        if want is None:
            assert got is None
        else:
            assert got.dtype == want.dtype and torch.equal(got, want)
