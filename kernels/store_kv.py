"""Triton kernel writing new tokens' keys and values into a paged KV cache.

store_kv(key [N, KVH, D], value [N, KVH, D], key_cache, value_cache, slot_pages [N],
slot_offsets [N]) writes token n's rows to cache[slot_pages[n], slot_offsets[n]] for both
caches, casting to the cache dtype. Caches are [num_pages, page_size, KVH, D] and may be
arbitrary strided views (e.g. of one byte arena); every stride is honoured. Tokens whose
page id is negative are skipped (padding).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _copy_token(src_ptr, dst_ptr, token, page, offset,
                stride_sn, stride_sh, stride_sd,
                stride_dp, stride_do, stride_dh, stride_dd,
                KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                HEADS_P2: tl.constexpr, DIM_P2: tl.constexpr):
    """Copy one token's [KV_HEADS, HEAD_DIM] rows from src into the cache slot (page, offset)."""
    heads = tl.arange(0, HEADS_P2)[:, None]
    dims = tl.arange(0, DIM_P2)[None, :]
    mask = (heads < KV_HEADS) & (dims < HEAD_DIM) & (page >= 0)
    rows = tl.load(src_ptr + token * stride_sn + heads * stride_sh + dims * stride_sd, mask=mask)
    dst = dst_ptr + page * stride_dp + offset * stride_do + heads * stride_dh + dims * stride_dd
    tl.store(dst, rows.to(dst_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _store_kv_kernel(key_ptr, value_ptr, key_cache_ptr, value_cache_ptr,
                     slot_pages_ptr, slot_offsets_ptr,
                     stride_kn, stride_kh, stride_kd,
                     stride_vn, stride_vh, stride_vd,
                     stride_kcp, stride_kco, stride_kch, stride_kcd,
                     stride_vcp, stride_vco, stride_vch, stride_vcd,
                     KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                     HEADS_P2: tl.constexpr, DIM_P2: tl.constexpr):
    """One program per new token: scatter its key and value rows into their cache slot."""
    token = tl.program_id(0).to(tl.int64)
    page = tl.load(slot_pages_ptr + token).to(tl.int64)
    offset = tl.load(slot_offsets_ptr + token).to(tl.int64)
    _copy_token(key_ptr, key_cache_ptr, token, page, offset,
                stride_kn, stride_kh, stride_kd,
                stride_kcp, stride_kco, stride_kch, stride_kcd,
                KV_HEADS, HEAD_DIM, HEADS_P2, DIM_P2)
    _copy_token(value_ptr, value_cache_ptr, token, page, offset,
                stride_vn, stride_vh, stride_vd,
                stride_vcp, stride_vco, stride_vch, stride_vcd,
                KV_HEADS, HEAD_DIM, HEADS_P2, DIM_P2)


def store_kv(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
             value_cache: torch.Tensor, slot_pages: torch.Tensor,
             slot_offsets: torch.Tensor) -> None:
    """Write key/value [N, KVH, D] into the paged caches at (slot_pages, slot_offsets), in place;
    tokens whose page is negative are padding and skipped. Shapes are checked by the dispatch."""
    num_tokens, kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    slot_pages = slot_pages.contiguous()
    slot_offsets = slot_offsets.contiguous()
    _store_kv_kernel[(num_tokens,)](
        key, value, key_cache, value_cache, slot_pages, slot_offsets,
        *key.stride(), *value.stride(), *key_cache.stride(), *value_cache.stride(),
        KV_HEADS=kv_heads, HEAD_DIM=head_dim,
        HEADS_P2=triton.next_power_of_2(kv_heads), DIM_P2=triton.next_power_of_2(head_dim),
    )
