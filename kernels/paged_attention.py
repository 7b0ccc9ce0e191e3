"""Triton paged attention over a block-table KV cache (decode, prefill, chunked prefill).

paged_attention(query [N, H, D], key_cache, value_cache, meta, scale) -> out [N, H, D]

meta is any object with the AttentionMetadata attributes (query_start [S+1], context_lens [S],
block_tables [S, max_pages], page_size). New token n of sequence s sits at position
context_lens[s] - (query_start[s+1] - n) and attends to cache positions 0..that position
(only the last sliding_window of them when a window is given); query head h reads kv head
h // (H // KVH).

One program per (query token, kv head): it holds the token's whole GQA head group as the rows
of its tile, finds its sequence by binary search over query_start, and walks that sequence's
pages through the block table in BLOCK_N-key tiles with an online softmax accumulated in fp32.
Head groups of 16+ rows use tl.dot; smaller groups (the usual decode case) use broadcast
multiply-reduce, which wastes no MMA padding.
"""
from __future__ import annotations

import math
import os
from typing import Any

import torch
import triton
import triton.language as tl

LOG2E = 1.0 / math.log(2.0)
MAX_BLOCK_N = 64
MIN_DOT = 16


@triton.jit
def _find_sequence(query_start_ptr, num_seqs, token):
    """Largest s in [0, num_seqs) with query_start[s] <= token (binary search)."""
    lo = 0
    hi = num_seqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if tl.load(query_start_ptr + mid) <= token:
            lo = mid
        else:
            hi = mid - 1
    return lo


@triton.jit
def _tile_scores(q, k, USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr):
    """Scores q [G, D] x k [BLOCK_N, D] -> [G, BLOCK_N] in fp32."""
    if USE_DOT:
        if DOT_FP32:
            scores = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            scores = tl.dot(q.to(k.dtype), tl.trans(k))
    else:
        scores = tl.sum(q[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)
    return scores


@triton.jit
def _tile_values(p, v, USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr):
    """Weighted values p [G, BLOCK_N] x v [BLOCK_N, D] -> [G, D] in fp32."""
    if USE_DOT:
        if DOT_FP32:
            values = tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            values = tl.dot(p.to(v.dtype), v)
    else:
        values = tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
    return values


@triton.jit
def _paged_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
    query_start_ptr, context_lens_ptr, block_tables_ptr,
    num_seqs, scale_log2, window,
    stride_qn, stride_qh, stride_qd,
    stride_on, stride_oh, stride_od,
    stride_kp, stride_ko, stride_kh, stride_kd,
    stride_vp, stride_vo, stride_vh, stride_vd,
    stride_bs, stride_bp,
    PAGE_SIZE: tl.constexpr, GROUP: tl.constexpr, GROUP_P2: tl.constexpr,
    HEAD_DIM: tl.constexpr, DIM_P2: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """Attention of one new token's GQA head group over its sequence's cached keys."""
    token = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1).to(tl.int64)
    seq = _find_sequence(query_start_ptr, num_seqs, token).to(tl.int64)
    query_end = tl.load(query_start_ptr + seq + 1).to(tl.int64)
    kv_len = tl.load(context_lens_ptr + seq).to(tl.int64) - query_end + token + 1
    first = tl.where(window > 0, tl.maximum(kv_len - window, 0), 0)

    rows = tl.arange(0, GROUP_P2)
    heads = kv_head * GROUP + rows
    dims = tl.arange(0, DIM_P2)
    q_mask = (rows[:, None] < GROUP) & (dims[None, :] < HEAD_DIM)
    q = tl.load(q_ptr + token * stride_qn + heads[:, None] * stride_qh + dims[None, :] * stride_qd,
                mask=q_mask, other=0.0).to(tl.float32)

    m_i = tl.full([GROUP_P2], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_P2], tl.float32)
    acc = tl.zeros([GROUP_P2, DIM_P2], tl.float32)
    table_row = block_tables_ptr + seq * stride_bs
    for start in range((first // BLOCK_N) * BLOCK_N, kv_len, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        key_mask = (pos >= first) & (pos < kv_len)
        pages = tl.load(table_row + (pos // PAGE_SIZE) * stride_bp, mask=key_mask, other=0)
        slot = pages.to(tl.int64)[:, None]
        offset = (pos % PAGE_SIZE)[:, None]
        kv_mask = key_mask[:, None] & (dims[None, :] < HEAD_DIM)
        k = tl.load(k_cache_ptr + slot * stride_kp + offset * stride_ko + kv_head * stride_kh
                    + dims[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + slot * stride_vp + offset * stride_vo + kv_head * stride_vh
                    + dims[None, :] * stride_vd, mask=kv_mask, other=0.0)
        scores = _tile_scores(q, k, USE_DOT, DOT_FP32) * scale_log2
        scores = tl.where(key_mask[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _tile_values(p, v, USE_DOT, DOT_FP32)
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + token * stride_on + heads[:, None] * stride_oh + dims[None, :] * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=q_mask)


def _interpreting() -> bool:
    """True when Triton runs under its CPU interpreter (bf16 tl.dot is unusable there)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _default_block_n(page_size: int) -> int:
    """Key tile: a power of two covering a page, at least 16 (dot minimum), at most 64."""
    return min(MAX_BLOCK_N, max(MIN_DOT, triton.next_power_of_2(page_size)))


def paged_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    meta: Any, scale: float, sliding_window: int | None = None,
                    block_n: int | None = None) -> torch.Tensor:
    """Causal attention of new tokens query [N, H, D] over the paged cache; returns [N, H, D].
    Shapes are checked by the dispatch (lmarith.bindings.checks) before any face runs."""
    page_size = int(meta.page_size)
    num_tokens, num_heads, head_dim = query.shape
    kv_heads = key_cache.shape[2]
    out = torch.empty((num_tokens, num_heads, head_dim), dtype=query.dtype, device=query.device)
    if num_tokens == 0:
        return out
    group = num_heads // kv_heads
    group_p2 = triton.next_power_of_2(group)
    dim_p2 = triton.next_power_of_2(head_dim)
    block_n = block_n or _default_block_n(page_size)
    use_dot = min(group_p2, dim_p2, block_n) >= MIN_DOT
    dot_fp32 = _interpreting() or key_cache.dtype == torch.float32
    query_start = meta.query_start.contiguous()
    context_lens = meta.context_lens.contiguous()
    block_tables = meta.block_tables
    _paged_attention_kernel[(num_tokens, kv_heads)](
        query, key_cache, value_cache, out, query_start, context_lens, block_tables,
        context_lens.shape[0], float(scale) * LOG2E, sliding_window or 0,
        *query.stride(), *out.stride(), *key_cache.stride(), *value_cache.stride(),
        *block_tables.stride(),
        PAGE_SIZE=page_size, GROUP=group, GROUP_P2=group_p2, HEAD_DIM=head_dim, DIM_P2=dim_p2,
        BLOCK_N=block_n, USE_DOT=use_dot, DOT_FP32=dot_fp32,
    )
    return out
