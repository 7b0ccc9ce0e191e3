"""Plain-torch faces of store-KV and paged attention: the specification the Triton kernels
(`store_kv.py`, `paged_attention.py`) are tested against, and the CPU path.

Cache layout per layer: key_cache, value_cache [num_pages, page_size, kv_heads, head_dim],
possibly strided views of a larger arena, so they are indexed by page or by (page, offset),
never flattened. Paged attention gathers each sequence's pages, zeroes slots past its end
and runs SDPA with a causal (and optional sliding-window) mask; the gather indices and mask
are derived once per step and window and kept in meta.scratch for the other layers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmarith.kernels.attention_metadata import AttentionMetadata


@dataclass
class AttentionPlan:
    """Gather indices and mask derived once per step and shared by every layer."""

    pages: torch.Tensor   # [S * P] the first P block-table pages of each sequence
    stale: torch.Tensor   # flat slots of the gathered [S * P * page_size] past each sequence's end
    mask: torch.Tensor    # [S, 1, Q, P * page_size] True where query row i may attend to slot j
    rows: tuple[torch.Tensor, torch.Tensor] | None  # (sequence, row) per token; None if all equal


def store_kv(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
             value_cache: torch.Tensor, slot_pages: torch.Tensor,
             slot_offsets: torch.Tensor) -> None:
    """Write new tokens' K/V [N, kv_heads, head_dim] into their (page, offset) slots; tokens
    whose page is negative are padding and skipped (as in the Triton face)."""
    real = slot_pages >= 0
    if not bool(real.all()):
        key, value, slot_pages, slot_offsets = key[real], value[real], slot_pages[real], slot_offsets[real]
    key_cache[slot_pages, slot_offsets] = key.to(key_cache.dtype)
    value_cache[slot_pages, slot_offsets] = value.to(value_cache.dtype)


def plan_attention(meta: AttentionMetadata, sliding_window: int | None = None) -> AttentionPlan:
    """Gather indices, causal/padding mask and row placement for one step, without Python loops."""
    device = meta.context_lens.device
    num_seqs = meta.context_lens.shape[0]
    num_pages = min(-(-meta.max_context_len // meta.page_size), meta.block_tables.shape[1])
    ctx = meta.context_lens[:, None]
    q_lens = (meta.query_start[1:] - meta.query_start[:-1])[:, None]
    cols = torch.arange(num_pages * meta.page_size, device=device)[None, :]
    stale = torch.nonzero((cols >= ctx).reshape(-1)).reshape(-1)
    query_pos = ctx - q_lens + torch.arange(meta.max_query_len, device=device)[None, :]
    mask = cols[:, None, :] <= query_pos[:, :, None]
    if sliding_window is not None:
        mask &= cols[:, None, :] > query_pos[:, :, None] - sliding_window
    rows = None
    num_tokens = meta.slot_pages.shape[0]
    if num_tokens != num_seqs * meta.max_query_len:  # otherwise every sequence has q_max tokens
        token = torch.arange(num_tokens, device=device)
        seq = torch.searchsorted(meta.query_start[1:], token, right=True)
        rows = (seq, token - meta.query_start[seq])
    pages = meta.block_tables[:, :num_pages].reshape(-1)
    return AttentionPlan(pages, stale, mask[:, None], rows)


def step_plan(meta: AttentionMetadata, sliding_window: int | None) -> AttentionPlan:
    """The step's plan for this window, derived on the first layer and reused by the rest."""
    key = ("torch_attention_plan", sliding_window)
    if key not in meta.scratch:
        meta.scratch[key] = plan_attention(meta, sliding_window)
    return meta.scratch[key]


def gather_context(cache: torch.Tensor, plan: AttentionPlan, dtype: torch.dtype) -> torch.Tensor:
    """Each sequence's cached K or V as [S, P * page_size, kv_heads, head_dim], zero past its end.

    Whole pages are copied (fast contiguous blocks); slots past a sequence's end may hold stale
    or never-written values (even NaN), which would leak through a masked softmax, so they are
    zeroed.
    """
    gathered = cache.index_select(0, plan.pages).to(dtype)
    slots = gathered.view(-1, *cache.shape[2:])
    slots.index_fill_(0, plan.stale, 0.0)
    return slots.view(plan.mask.shape[0], -1, *cache.shape[2:])


def attend(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
           plan: AttentionPlan, scale: float) -> torch.Tensor:
    """Attention of query [N, H, D] over the cached context described by plan; returns [N, H, D]."""
    num_tokens, num_heads, head_dim = query.shape
    num_seqs, _, q_max, _ = plan.mask.shape
    kv_heads = key_cache.shape[2]
    group = num_heads // kv_heads
    if plan.rows is None:
        padded = query.view(num_seqs, q_max, num_heads, head_dim)
    else:
        padded = query.new_zeros(num_seqs, q_max, num_heads, head_dim)
        padded[plan.rows] = query
    # Fold each KV head's query group into the query-length axis: GQA without copying K/V.
    q = padded.view(num_seqs, q_max, kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
    q = q.reshape(num_seqs, kv_heads, group * q_max, head_dim)
    k = gather_context(key_cache, plan, query.dtype).transpose(1, 2)
    v = gather_context(value_cache, plan, query.dtype).transpose(1, 2)
    mask = plan.mask.repeat(1, 1, group, 1) if group > 1 else plan.mask
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    out = out.view(num_seqs, kv_heads, group, q_max, head_dim).permute(0, 3, 1, 2, 4)
    if plan.rows is not None:
        out = out[plan.rows]
    return out.reshape(num_tokens, num_heads, head_dim)


def paged_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float,
                    sliding_window: int | None = None) -> torch.Tensor:
    """Causal attention of this step's queries over their sequences' paged K/V (already stored)."""
    if query.shape[0] == 0:
        return query.new_empty(query.shape)
    return attend(query, key_cache, value_cache, step_plan(meta, sliding_window), scale)
