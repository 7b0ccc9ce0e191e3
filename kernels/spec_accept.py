"""Triton face of `spec_accept`: exact speculative verification of a row's proposed tokens.

Semantics are those of `lmarith.kernels.reference_speculative.spec_accept`. One program per
row walks the proposals in order and stops at the first rejection: a sampled row accepts x_j
iff q(x_j) > 0 and u_j * q(x_j) < p(x_j) (two loads), a greedy row iff x_j is the argmax of
the target (one pass over the vocabulary). The settling position then costs one more pass:
the argmax for greedy rows, else the exponential race over the residual max(0, p - q) tiled
over the vocabulary, run together with the race over p that replaces it when the residual
is empty, so no pass is spent finding out whether it is.

The hash and the uniforms are bit-exact with the reference (uint32 arithmetic); exp/log may
differ from torch's by an ulp, which only matters on a knife edge (u * q within an ulp of p,
or two race keys within an ulp).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lmarith.kernels.sample import GOLDEN32, NEG_INF, _argmax_pass, _gumbel, _mix32, _row_key
from lmarith.kernels.sample import _uniform

STREAM_SALT: tl.constexpr = tl.constexpr(0x85EBCA6B)


@triton.jit
def _stream_key(key, stream):
    """Key of one random stream of the row: mix32(key ^ mix32((stream + 1) * GOLDEN32 ^ SALT))."""
    counter = (stream + 1).to(tl.uint32) * tl.full([], GOLDEN32, tl.uint32)
    return _mix32(key ^ _mix32(counter ^ tl.full([], STREAM_SALT, tl.uint32)))


@triton.jit
def _accepts(target_row, draft_row, token, key, greedy, V, BLOCK_V: tl.constexpr):
    """Whether proposal `token` passes: the target's argmax (greedy), else u * q < p, q > 0,
    with u = uniform_from_hash(mix32(key)) for the proposal's stream key."""
    if greedy:
        ok = _argmax_pass(target_row, V, BLOCK_V) == token
    else:
        target_prob = tl.exp(tl.load(target_row + token).to(tl.float32))
        draft_prob = tl.exp(tl.load(draft_row + token).to(tl.float32))
        u = _uniform(key, tl.zeros([], tl.uint32))
        ok = (draft_prob > 0) & (u * draft_prob < target_prob)
    return ok


@triton.jit
def _running_argmax(best, best_idx, keys, v0):
    """Fold one tile of keys into (best key, its index): lowest index among equal keys."""
    tile_best = tl.max(keys, axis=0)
    tile_idx = v0 + tl.argmax(keys, axis=0, tie_break_left=True)
    better = tile_best > best
    return tl.where(better, tile_best, best), tl.where(better, tile_idx, best_idx)


@triton.jit
def _residual_race(target_row, draft_row, has_draft, key, V, BLOCK_V: tl.constexpr):
    """argmax_x log(max(0, p - q)(x)) + gumbel(x); over p itself if p > q nowhere. Without a
    draft (all proposals accepted) q = 0. NaN keys count as -inf; all -inf gives token 0."""
    best = tl.full([], NEG_INF, tl.float32)
    best_idx = tl.zeros([], tl.int32)
    fallback = tl.full([], NEG_INF, tl.float32)
    fallback_idx = tl.zeros([], tl.int32)
    nonempty = tl.zeros([], tl.int32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask = cols < V
        # has_draft is widened before use: the interpreter mistypes broadcast scalar bools.
        draft_mask = mask & (tl.zeros_like(cols) + has_draft.to(tl.int32) != 0)
        target_logp = tl.load(target_row + cols, mask=mask, other=NEG_INF).to(tl.float32)
        draft_logp = tl.load(draft_row + cols, mask=draft_mask, other=NEG_INF).to(tl.float32)
        residual = tl.exp(target_logp) - tl.exp(draft_logp)
        positive = residual > 0
        noise = _gumbel(key, cols)
        keys = tl.where(positive, tl.log(tl.where(positive, residual, 1.0)) + noise, NEG_INF)
        target_keys = target_logp + noise
        target_keys = tl.where(target_keys == target_keys, target_keys, NEG_INF)
        best, best_idx = _running_argmax(best, best_idx, keys, v0)
        fallback, fallback_idx = _running_argmax(fallback, fallback_idx, target_keys, v0)
        nonempty = tl.maximum(nonempty, tl.max(positive.to(tl.int32), axis=0))
    return tl.where(nonempty != 0, best_idx, fallback_idx)


@triton.jit
def _spec_accept_kernel(target_ptr, draft_ptr, tokens_ptr, num_drafts_ptr, seed_ptr, step_ptr,
                        greedy_ptr, accepted_ptr, next_token_ptr, V, K, target_row_stride,
                        target_pos_stride, draft_row_stride, draft_pos_stride,
                        BLOCK_V: tl.constexpr):
    """One row: walk proposals j = 0 .. n-1 until the first rejection r (or r = n), then the
    corrected or bonus token at r (stream 2r + 1); proposal j's test uses stream 2j."""
    row = tl.program_id(0)
    target = target_ptr + row.to(tl.int64) * target_row_stride
    draft = draft_ptr + row.to(tl.int64) * draft_row_stride
    tokens = tokens_ptr + row.to(tl.int64) * K
    num_drafts = tl.load(num_drafts_ptr + row)
    greedy = tl.load(greedy_ptr + row) != 0
    key = _row_key(tl.load(seed_ptr + row), tl.load(step_ptr + row))
    position = tl.zeros([], tl.int32)
    walking = num_drafts > 0
    while walking:
        ok = _accepts(target + position * target_pos_stride, draft + position * draft_pos_stride,
                      tl.load(tokens + position), _stream_key(key, 2 * position), greedy,
                      V, BLOCK_V)
        position += ok.to(tl.int32)
        walking = ok & (position < num_drafts)
    target_row = target + position * target_pos_stride
    if greedy:
        token = _argmax_pass(target_row, V, BLOCK_V)
    else:
        token = _residual_race(target_row, draft + position * draft_pos_stride,
                               position < num_drafts, _stream_key(key, 2 * position + 1),
                               V, BLOCK_V)
    tl.store(accepted_ptr + row, position)
    tl.store(next_token_ptr + row, token.to(tl.int64))


def _default_block(vocab: int, device: torch.device) -> int:
    """Wide tiles for the interpreter, whose cost is per op; register-sized ones on GPUs."""
    if device.type != "cuda":
        return min(max(16, triton.next_power_of_2(vocab)), 4096)
    return 1024


def _rows_contiguous(log_probs: torch.Tensor) -> torch.Tensor:
    """The tensor with a unit stride over the vocabulary (a copy only when it has none)."""
    return log_probs if log_probs.stride(-1) == 1 else log_probs.contiguous()


def spec_accept(target_log_probs: torch.Tensor, draft_log_probs: torch.Tensor,
                draft_tokens: torch.Tensor, num_drafts: torch.Tensor, seed: torch.Tensor,
                step: torch.Tensor, greedy: torch.Tensor, *,
                block_v: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Accepted counts (int32 [B]) and the corrected or bonus token (int64 [B]) per row; see
    `reference_speculative.spec_accept`. target [B, K+1, V], draft [B, K, V] float log-probs;
    draft_tokens [B, K], num_drafts, seed, step [B] int; greedy [B] bool. `block_v` (a power
    of two) is the vocabulary tile."""
    batch, positions, vocab = target_log_probs.shape
    device = target_log_probs.device
    num_accepted = torch.zeros(batch, dtype=torch.int32, device=device)
    next_token = torch.zeros(batch, dtype=torch.int64, device=device)
    if batch == 0:
        return num_accepted, next_token
    target = _rows_contiguous(target_log_probs)
    has_drafts = positions > 1  # with K = 0 nothing reads the draft tensors: pass stand-ins
    draft = _rows_contiguous(draft_log_probs) if has_drafts else target
    tokens = draft_tokens.to(torch.int64).contiguous() if has_drafts else next_token

    def per_row(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return x.to(device=device, dtype=dtype).reshape(batch).contiguous()

    _spec_accept_kernel[(batch,)](
        target, draft, tokens, per_row(num_drafts, torch.int32), per_row(seed, torch.int64),
        per_row(step, torch.int64), per_row(greedy, torch.int32), num_accepted, next_token,
        vocab, positions - 1, target.stride(0), target.stride(1), draft.stride(0), draft.stride(1),
        BLOCK_V=block_v or _default_block(vocab, device))
    return num_accepted, next_token
