"""Triton helpers of `combine`'s plausibility mask (a Plausible formula; semantics in
`lmarith.kernels.reference.combine`): keep x iff M(x) >= max_x M + log(alpha), where
M = sum_t w_t * L_t is the reference's score.

Since L_t = x_t - lse_t, M(x) = Q(x) - sum_t w_t lse_t with Q(x) = sum_t w_t x_t on the raw
logits: the row-constant cancels in the comparison, so the kernels compare Q instead. That
lets the term-stats pass, which does not know the LSEs yet, also find each chunk's max of Q;
the plan pass merges those maxima and masks while it evaluates the plan. No extra pass over
the logits and no softmax of the reference. Both passes compute Q with `reference_scores`
(one code path, one summation order), so ties with the maximum are exact (alpha = 1).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

NEG_INF: tl.constexpr = tl.constexpr(float("-inf"))


@triton.jit
def reference_scores(row_base, cols, mask, stride_t, stride_v, mask_w,
                     T: tl.constexpr, T_PAD: tl.constexpr):
    """Q = sum_t w_t * x_t over a tile of raw logits, -inf where a term with w_t != 0 is
    not finite (its log-prob would not be); only the active terms' logits are read."""
    terms = tl.arange(0, T_PAD)
    zero = tl.zeros_like(cols).to(tl.float32)
    q = zero
    forbidden = cols < 0
    for t in tl.static_range(T):
        w = tl.sum(tl.where(terms == t, mask_w, 0.0), axis=0) + zero
        active = w != 0.0
        x = tl.load(row_base + t * stride_t + cols.to(tl.int64) * stride_v,
                    mask=mask & active, other=0.0).to(tl.float32)
        finite = tl.abs(x) < float("inf")
        q += tl.where(active & finite, w * tl.where(finite, x, 0.0), 0.0)
        forbidden |= active & ~finite
    return tl.where(forbidden, NEG_INF, q)


@triton.jit
def chunk_max(row_base, cols, mask, stride_t, stride_v, mask_w, run_max,
              T: tl.constexpr, T_PAD: tl.constexpr):
    """Fold a tile's max of Q (tokens outside the chunk excluded) into run_max."""
    q = reference_scores(row_base, cols, mask, stride_t, stride_v, mask_w, T, T_PAD)
    return tl.maximum(run_max, tl.max(tl.where(mask, q, NEG_INF), axis=0))


@triton.jit
def threshold(mask_max_ptr, alpha_ptr, mask_w, term_lse, row, splits, zero,
              S_PAD: tl.constexpr):
    """The row's threshold on Q, broadcast to zero's shape (a vector: the interpreter
    mistypes scalar comparisons that are later broadcast): -inf (keep all) for an unmasked row
    (log_alpha -inf); +inf (keep none) where M is -inf everywhere (no finite Q, or an active
    term whose LSE is not finite); else max Q + log(alpha)."""
    parts = tl.arange(0, S_PAD)
    part_max = tl.load(mask_max_ptr + row * splits + parts, mask=parts < splits, other=NEG_INF)
    q_max = tl.max(part_max, axis=0) + zero
    dead_terms = tl.sum(tl.where((mask_w != 0.0) & ~(tl.abs(term_lse) < float("inf")), 1, 0), axis=0)
    dead = ((dead_terms + zero) > 0.0) | (q_max == NEG_INF)
    log_alpha = tl.load(alpha_ptr + row) + zero
    return tl.where(log_alpha == NEG_INF, NEG_INF,
                    tl.where(dead, float("inf"), q_max + log_alpha))


def mask_inputs(mask_weights, mask_log_alpha, score_max: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(mask weights, log alpha, per-chunk max scratch) as kernel inputs; without a mask,
    placeholders the MASKED=False kernels never read."""
    if mask_weights is None:
        return score_max, score_max, score_max
    device = score_max.device
    return (mask_weights.to(device=device, dtype=torch.float32).contiguous(),
            mask_log_alpha.to(device=device, dtype=torch.float32).contiguous(),
            torch.empty_like(score_max))
