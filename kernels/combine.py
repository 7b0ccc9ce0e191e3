"""Triton face of `combine`: evaluate a compiled formula plan on stacked raw logits.

Semantics are those of `lmarith.kernels.reference.combine`. The row's vocabulary is split
into `splits` chunks (one program per row x chunk) so that small batches still fill a GPU:

1. `_term_stats_kernel`: per chunk, an online (max, sum-exp) of every term, all terms at once
   as a [T_PAD, BLOCK_V] tile; with a plausibility mask (MASKED), also the chunk's max of
   the reference score on raw logits (combine_mask.py explains why that suffices).
2. `_plan_kernel`: merges the chunk stats into each term's LSE, evaluates the plan per tile
   (the R linear row-blocks as an [R_PAD, BLOCK_V] accumulator, then the max/min groups),
   sets -inf on the tokens the mask drops, and writes the scores and an online (max,
   sum-exp) of them per chunk.
3. `_normalize_kernel`: merges the score stats into the row's LSE and subtracts it in place.

No [T, B, V] intermediate is ever materialised; scratch is O(B * splits * T).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lmarith.kernels import combine_mask

NEG_INF: tl.constexpr = tl.constexpr(float("-inf"))


@triton.jit
def _finite_or_zero(x):
    """x where finite, else 0: a safe shift for exp() when the running max is +-inf."""
    return tl.where(tl.abs(x) < float("inf"), x, 0.0)


@triton.jit
def _lse_step(run_max, run_sum, x, AXIS: tl.constexpr):
    """Fold tile x into a running (max, sum exp(x - shift)) along AXIS; shift = finite max or 0."""
    new_max = tl.maximum(run_max, tl.max(x, axis=AXIS))
    shift = _finite_or_zero(new_max)
    tile_sum = tl.sum(tl.exp(x - tl.expand_dims(shift, AXIS)), axis=AXIS)
    return new_max, run_sum * tl.exp(run_max - shift) + tile_sum


@triton.jit
def _lse_merge(part_max, part_sum, AXIS: tl.constexpr):
    """LSE from per-chunk (max, sum) partials along AXIS; -inf for empty rows, +inf kept."""
    top = tl.max(part_max, axis=AXIS)
    shift = _finite_or_zero(top)
    total = tl.sum(part_sum * tl.exp(part_max - tl.expand_dims(shift, AXIS)), axis=AXIS)
    return shift + tl.log(total)


@triton.jit
def _pick(vec, idx, i):
    """Element i of a small vector, as a scalar (masked sum: no dynamic indexing in Triton)."""
    return tl.sum(tl.where(idx == i, vec, 0.0), axis=0)


@triton.jit
def _pick_row(tile, rows, r):
    """Row r of a [R_PAD, BLOCK_V] tile, as a [BLOCK_V] vector."""
    return tl.sum(tl.where(rows[:, None] == r, tile, 0.0), axis=0)


@triton.jit
def _term_stats_kernel(logits_ptr, max_ptr, sum_ptr, mask_w_ptr, mask_max_ptr, V, chunk,
                       stride_t, stride_b, stride_v, T: tl.constexpr, T_PAD: tl.constexpr,
                       BLOCK_V: tl.constexpr, MASKED: tl.constexpr):
    """Per (row, chunk): online max and sum-exp of every term's logits over the chunk, and
    (MASKED) the max of the mask's reference score Q over it."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    terms = tl.arange(0, T_PAD)
    term_ok = terms < T
    row_base = logits_ptr + row.to(tl.int64) * stride_b
    base = row_base + terms.to(tl.int64)[:, None] * stride_t
    if MASKED:
        mask_w = tl.load(mask_w_ptr + row * T + terms, mask=term_ok, other=0.0)
    start = split * chunk
    end = tl.minimum(start + chunk, V)
    run_max = tl.full([T_PAD], NEG_INF, tl.float32)
    run_sum = tl.zeros([T_PAD], tl.float32)
    q_max = tl.full([], NEG_INF, tl.float32)
    for v0 in range(start, end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask = term_ok[:, None] & (cols < end)[None, :]
        x = tl.load(base + cols.to(tl.int64)[None, :] * stride_v, mask=mask, other=NEG_INF)
        run_max, run_sum = _lse_step(run_max, run_sum, x.to(tl.float32), 1)
        if MASKED:
            q_max = combine_mask.chunk_max(row_base, cols, cols < end, stride_t, stride_v,
                                           mask_w, q_max, T, T_PAD)
    offs = (row * splits + split) * T + terms
    tl.store(max_ptr + offs, run_max, mask=term_ok)
    tl.store(sum_ptr + offs, run_sum, mask=term_ok)
    if MASKED:
        tl.store(mask_max_ptr + row * splits + split, q_max)


@triton.jit
def _term_lse(max_ptr, sum_ptr, row, splits, T: tl.constexpr, T_PAD: tl.constexpr,
              S_PAD: tl.constexpr):
    """Each term's log-sum-exp over the whole row, merged from the per-chunk stats: [T_PAD]."""
    parts = tl.arange(0, S_PAD)
    terms = tl.arange(0, T_PAD)
    offs = (row * splits + parts[:, None]) * T + terms[None, :]
    mask = (parts[:, None] < splits) & (terms[None, :] < T)
    part_max = tl.load(max_ptr + offs, mask=mask, other=NEG_INF)
    part_sum = tl.load(sum_ptr + offs, mask=mask, other=0.0)
    return _lse_merge(part_max, part_sum, 0)


@triton.jit
def _row_block_values(row_base, cols, mask, stride_t, stride_v, weights, consts, term_lse,
                      T: tl.constexpr, T_PAD: tl.constexpr, R_PAD: tl.constexpr,
                      BLOCK_V: tl.constexpr):
    """S_r = consts_r + sum_t W[r, t] * L_t over a tile, -inf where an active term is not finite."""
    terms = tl.arange(0, T_PAD)
    values = tl.zeros([R_PAD, BLOCK_V], tl.float32) + consts[:, None]
    forbidden = tl.zeros([R_PAD, BLOCK_V], tl.int1)
    for t in tl.static_range(T):
        x = tl.load(row_base + t * stride_t + cols.to(tl.int64) * stride_v, mask=mask, other=0.0)
        log_probs = x.to(tl.float32) - _pick(term_lse, terms, t)
        finite = tl.abs(log_probs) < float("inf")
        w = tl.sum(tl.where(terms[None, :] == t, weights, 0.0), axis=1)
        active = w != 0.0
        term = w[:, None] * tl.where(finite, log_probs, 0.0)[None, :]
        values += tl.where(active[:, None] & finite[None, :], term, 0.0)
        forbidden |= active[:, None] & ~finite[None, :]
    return tl.where(forbidden, NEG_INF, values)


@triton.jit
def _plan_scores(values, norms, coef_ptr, kind_ptr, row, keep, G: tl.constexpr,
                 R_PAD: tl.constexpr):
    """Fold the max/min groups into row-block 0, set -inf where keep is False (the
    plausibility mask), and divide by the per-token norm.

    Scalar plan entries are broadcast to vectors before comparing: the interpreter mistypes
    scalar comparison results when they are later broadcast.
    """
    rows = tl.arange(0, R_PAD)
    total = _pick_row(values, rows, 0)
    total_norm = tl.zeros_like(total) + _pick(norms, rows, 0)
    for g in tl.static_range(G):
        left = _pick_row(values, rows, 1 + 2 * g)
        right = _pick_row(values, rows, 2 + 2 * g)
        coef = tl.load(coef_ptr + row * G + g) + tl.zeros_like(total)
        is_max = (tl.load(kind_ptr + row * G + g) + tl.zeros_like(total).to(tl.int32)) > 0
        left_wins = tl.where(is_max, left >= right, left < right)
        picked = tl.where(left_wins, left, right)
        left_norm = _pick(norms, rows, 1 + 2 * g)
        picked_norm = tl.where(left_wins, left_norm, _pick(norms, rows, 2 + 2 * g))
        active = coef != 0.0
        shifted = total + tl.where(active, coef * picked, 0.0)
        total = tl.where(active & (picked == NEG_INF), NEG_INF, shifted)
        total_norm += tl.where(active, coef * picked_norm, 0.0)
    total = tl.where(keep, total, NEG_INF)
    nonzero = total_norm != 0.0
    scores = tl.where(nonzero, total / tl.where(nonzero, total_norm, 1.0), total)
    return tl.where(scores != scores, NEG_INF, scores)


@triton.jit
def _plan_kernel(logits_ptr, weights_ptr, consts_ptr, coef_ptr, kind_ptr, term_max_ptr,
                 term_sum_ptr, mask_w_ptr, alpha_ptr, mask_max_ptr, out_ptr, score_max_ptr,
                 score_sum_ptr, V, chunk, stride_t, stride_b, stride_v,
                 T: tl.constexpr, R: tl.constexpr, G: tl.constexpr, T_PAD: tl.constexpr,
                 R_PAD: tl.constexpr, S_PAD: tl.constexpr, BLOCK_V: tl.constexpr,
                 MASKED: tl.constexpr):
    """Per (row, chunk): evaluate the plan (and the mask), write raw scores and their
    (max, sum-exp)."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    term_lse = _term_lse(term_max_ptr, term_sum_ptr, row, splits, T, T_PAD, S_PAD)
    rows = tl.arange(0, R_PAD)
    terms = tl.arange(0, T_PAD)
    w_mask = (rows[:, None] < R) & (terms[None, :] < T)
    weights = tl.load(weights_ptr + row * R * T + rows[:, None] * T + terms[None, :],
                      mask=w_mask, other=0.0)
    consts = tl.load(consts_ptr + row * R + rows, mask=rows < R, other=0.0)
    norms = tl.sum(weights, axis=1) + consts
    row_base = logits_ptr + row.to(tl.int64) * stride_b
    out_base = out_ptr + row.to(tl.int64) * V
    start = split * chunk
    end = tl.minimum(start + chunk, V)
    run_max = tl.full([], NEG_INF, tl.float32)
    run_sum = tl.zeros([], tl.float32)
    zero = tl.zeros([BLOCK_V], tl.float32)
    if MASKED:
        mask_w = tl.load(mask_w_ptr + row * T + terms, mask=terms < T, other=0.0)
        threshold = combine_mask.threshold(mask_max_ptr, alpha_ptr, mask_w, term_lse, row,
                                           splits, zero, S_PAD)
    for v0 in range(start, end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask = cols < end
        values = _row_block_values(row_base, cols, mask, stride_t, stride_v, weights, consts,
                                   term_lse, T, T_PAD, R_PAD, BLOCK_V)
        keep = zero == 0.0
        if MASKED:
            q = combine_mask.reference_scores(row_base, cols, mask, stride_t, stride_v, mask_w,
                                              T, T_PAD)
            keep = q >= threshold
        scores = _plan_scores(values, norms, coef_ptr, kind_ptr, row, keep, G, R_PAD)
        scores = tl.where(mask, scores, NEG_INF)
        tl.store(out_base + cols, scores, mask=mask)
        run_max, run_sum = _lse_step(run_max, run_sum, scores, 0)
    tl.store(score_max_ptr + row * splits + split, run_max)
    tl.store(score_sum_ptr + row * splits + split, run_sum)


@triton.jit
def _normalize_kernel(out_ptr, lse_ptr, score_max_ptr, score_sum_ptr, V, chunk,
                      S_PAD: tl.constexpr, BLOCK_V: tl.constexpr):
    """Per (row, chunk): merge the score stats into the row LSE and subtract it in place."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    parts = tl.arange(0, S_PAD)
    part_mask = parts < splits
    part_max = tl.load(score_max_ptr + row * splits + parts, mask=part_mask, other=NEG_INF)
    part_sum = tl.load(score_sum_ptr + row * splits + parts, mask=part_mask, other=0.0)
    lse = _lse_merge(part_max, part_sum, 0)
    if split == 0:
        tl.store(lse_ptr + row, lse)
    out_base = out_ptr + row.to(tl.int64) * V
    start = split * chunk
    end = tl.minimum(start + chunk, V)
    for v0 in range(start, end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask = cols < end
        scores = tl.load(out_base + cols, mask=mask)
        tl.store(out_base + cols, scores - lse, mask=mask)


def _pad(n: int) -> int:
    """Power-of-two tile extent >= n (at least 2, so no axis is degenerate)."""
    return max(2, triton.next_power_of_2(n))


def _default_block(vocab: int, r_pad: int, device: torch.device) -> int:
    """Wide tiles for the interpreter (fewer loop trips); register-sized tiles on GPUs."""
    if device.type != "cuda":
        return min(_pad(vocab), 4096)
    return max(128, min(1024, 8192 // r_pad))


def _default_splits(rows: int, vocab: int, block_v: int, device: torch.device) -> int:
    """Enough vocabulary chunks per row for ~2 programs per SM; one on CPU."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(2 * sms, rows), triton.cdiv(vocab, 4 * block_v)))


def combine(logits: torch.Tensor, weights: torch.Tensor, consts: torch.Tensor,
            group_coefs: torch.Tensor, group_kinds: torch.Tensor,
            mask_weights: torch.Tensor | None = None, mask_log_alpha: torch.Tensor | None = None,
            *, block_v: int | None = None, splits: int | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluate a compiled formula plan on stacked raw logits (see `reference.combine`).

    logits [T, B, V] f32/f16/bf16 (any strides); weights [B, R, T]; consts [B, R];
    group_coefs [B, G]; group_kinds [B, G] (+1 max, -1 min); optional plausibility mask
    mask_weights [B, T], mask_log_alpha [B] (-inf: row unmasked). Returns (log_probs [B, V]
    f32, lse [B] f32). `block_v` (power of two) and `splits` (vocabulary chunks per row) are
    tuning knobs; the defaults suit the device.
    """
    num_terms, rows, vocab = logits.shape
    device = logits.device
    num_blocks = weights.shape[1]
    num_groups = group_coefs.shape[1]
    weights = weights.to(device=device, dtype=torch.float32).contiguous()
    consts = consts.to(device=device, dtype=torch.float32).contiguous()
    group_coefs = group_coefs.to(device=device, dtype=torch.float32).contiguous()
    group_kinds = group_kinds.to(device=device, dtype=torch.int32).contiguous()
    out = torch.empty(rows, vocab, dtype=torch.float32, device=device)
    lse = torch.full((rows,), float("-inf"), dtype=torch.float32, device=device)
    if rows == 0 or vocab == 0:
        return out, lse
    t_pad, r_pad = _pad(num_terms), _pad(num_blocks)
    block_v = block_v or _default_block(vocab, r_pad, device)
    splits = splits or _default_splits(rows, vocab, block_v, device)
    chunk = triton.cdiv(triton.cdiv(vocab, splits), block_v) * block_v
    splits = triton.cdiv(vocab, chunk)
    s_pad = _pad(splits)
    term_max = torch.empty(rows, splits, num_terms, dtype=torch.float32, device=device)
    term_sum = torch.empty_like(term_max)
    score_max = torch.empty(rows, splits, dtype=torch.float32, device=device)
    score_sum = torch.empty_like(score_max)
    masked = mask_weights is not None
    mask_w, log_alpha, mask_max = combine_mask.mask_inputs(mask_weights, mask_log_alpha, score_max)
    grid = (rows, splits)
    stride_t, stride_b, stride_v = logits.stride()
    _term_stats_kernel[grid](logits, term_max, term_sum, mask_w, mask_max, vocab, chunk,
                             stride_t, stride_b, stride_v, T=num_terms, T_PAD=t_pad,
                             BLOCK_V=block_v, MASKED=masked)
    _plan_kernel[grid](logits, weights, consts, group_coefs, group_kinds, term_max, term_sum,
                       mask_w, log_alpha, mask_max, out, score_max, score_sum, vocab, chunk,
                       stride_t, stride_b, stride_v, T=num_terms, R=num_blocks, G=num_groups,
                       T_PAD=t_pad, R_PAD=r_pad, S_PAD=s_pad, BLOCK_V=block_v, MASKED=masked)
    _normalize_kernel[grid](out, lse, score_max, score_sum, vocab, chunk, S_PAD=s_pad,
                            BLOCK_V=block_v)
    return out, lse
