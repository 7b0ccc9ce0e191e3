"""Triton store_kv / paged_attention against a dense float64 reference (Triton interpreter).

Caches are strided views into one NaN-poisoned byte arena, so any read outside a sequence's
causal range, or any write outside the given slots, shows up as NaN or a changed byte.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from lmarith.kernels.paged_attention import paged_attention
from lmarith.models import attention as cpu_attention
from lmarith.kernels.store_kv import store_kv

PAGE_SIZE = 4
KV_HEADS = 2
CONTEXT_LENS = (1, 5, 13)
QUERY_LENS = (1, 1, 3)
SPARE_PAGES = 3
PAGE_GAP = 8


@dataclass
class Batch:
    """A filled paged cache plus the new tokens' queries/keys/values and metadata."""

    arena: torch.Tensor
    key_cache: torch.Tensor
    value_cache: torch.Tensor
    query: torch.Tensor
    new_keys: torch.Tensor
    new_values: torch.Tensor
    meta: cpu_attention.AttentionMetadata


def arena_caches(num_pages: int, kv_heads: int, head_dim: int, dtype: torch.dtype):
    """NaN-filled byte arena and non-contiguous key/value cache views into it."""
    page_elems = PAGE_SIZE * kv_heads * head_dim
    page_stride = 2 * page_elems + PAGE_GAP
    itemsize = torch.empty((), dtype=dtype).element_size()
    arena = torch.zeros(num_pages * page_stride * itemsize, dtype=torch.uint8)
    elems = arena.view(dtype)
    elems.fill_(float("nan"))
    shape = (num_pages, PAGE_SIZE, kv_heads, head_dim)
    strides = (page_stride, kv_heads * head_dim, head_dim, 1)
    key_cache = elems.as_strided(shape, strides, 0)
    value_cache = elems.as_strided(shape, strides, page_elems)
    return arena, key_cache, value_cache


def page_layout(generator: torch.Generator):
    """Scrambled page ids per sequence and a zero-padded block table."""
    pages_needed = [math.ceil(n / PAGE_SIZE) for n in CONTEXT_LENS]
    num_pages = sum(pages_needed) + SPARE_PAGES
    order = torch.randperm(num_pages, generator=generator).tolist()
    table = torch.zeros(len(CONTEXT_LENS), max(pages_needed) + 1, dtype=torch.int64)
    for s, count in enumerate(pages_needed):
        table[s, :count] = torch.tensor(order[:count])
        order = order[count:]
    return num_pages, table


def slots(block_tables: torch.Tensor, seq: int, positions: torch.Tensor):
    """(page ids, offsets) of the given cache positions of one sequence."""
    return block_tables[seq, positions // PAGE_SIZE], positions % PAGE_SIZE


def new_token_positions(seq: int) -> torch.Tensor:
    """Cache positions of one sequence's new tokens."""
    return torch.arange(CONTEXT_LENS[seq] - QUERY_LENS[seq], CONTEXT_LENS[seq])


def make_meta(**fields) -> object:
    """The engine's AttentionMetadata."""
    return cpu_attention.AttentionMetadata(**fields)


def make_batch(ratio: int, head_dim: int, dtype: torch.dtype, seed: int = 0) -> Batch:
    """Fill old context directly; return the batch with new tokens not yet stored."""
    generator = torch.Generator().manual_seed(seed)
    num_pages, table = page_layout(generator)
    arena, key_cache, value_cache = arena_caches(num_pages, KV_HEADS, head_dim, dtype)
    for s, (ctx, q_len) in enumerate(zip(CONTEXT_LENS, QUERY_LENS)):
        pages, offsets = slots(table, s, torch.arange(ctx - q_len))
        shape = (len(pages), KV_HEADS, head_dim)
        key_cache[pages, offsets] = torch.randn(shape, generator=generator).to(dtype)
        value_cache[pages, offsets] = torch.randn(shape, generator=generator).to(dtype)
    num_tokens = sum(QUERY_LENS)
    new_pages, new_offsets = zip(*(slots(table, s, new_token_positions(s))
                                   for s in range(len(CONTEXT_LENS))))
    qkv = torch.randn(num_tokens, KV_HEADS, 2, head_dim, generator=generator).to(dtype)
    query = torch.randn(num_tokens, KV_HEADS * ratio, head_dim, generator=generator).to(dtype)
    meta = make_meta(
        query_start=torch.tensor([0, *torch.tensor(QUERY_LENS).cumsum(0).tolist()]),
        context_lens=torch.tensor(CONTEXT_LENS),
        block_tables=table,
        slot_pages=torch.cat(new_pages),
        slot_offsets=torch.cat(new_offsets),
        page_size=PAGE_SIZE,
        max_query_len=max(QUERY_LENS),
        max_context_len=max(CONTEXT_LENS),
    )
    return Batch(arena, key_cache, value_cache, query, qkv[:, :, 0], qkv[:, :, 1], meta)


def store_new_tokens(batch: Batch) -> None:
    """Write the batch's new keys/values into the cache with the Triton kernel."""
    store_kv(batch.new_keys, batch.new_values, batch.key_cache, batch.value_cache,
             batch.meta.slot_pages, batch.meta.slot_offsets)


def reference_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                        meta: object, scale: float, window: int | None = None) -> torch.Tensor:
    """Dense causal attention in float64, gathering each sequence's keys in position order."""
    group = query.shape[1] // key_cache.shape[2]
    out = torch.zeros(query.shape, dtype=torch.float64)
    for s in range(len(meta.context_lens)):
        start, end = int(meta.query_start[s]), int(meta.query_start[s + 1])
        ctx = int(meta.context_lens[s])
        positions = torch.arange(ctx)
        pages = meta.block_tables[s, positions // meta.page_size]
        offsets = positions % meta.page_size
        keys = key_cache[pages, offsets].double().repeat_interleave(group, dim=1)
        values = value_cache[pages, offsets].double().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", query[start:end].double(), keys) * scale
        query_positions = ctx - (end - start) + torch.arange(end - start)
        visible = positions[None, :] <= query_positions[:, None]
        if window is not None:
            visible &= positions[None, :] > query_positions[:, None] - window
        scores = scores.masked_fill(~visible, float("-inf"))
        out[start:end] = torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), values)
    return out


def expected_arena(batch: Batch) -> torch.Tensor:
    """Arena bytes after a correct store_kv, computed with torch indexing on a copy."""
    arena = batch.arena.clone()
    dtype = batch.key_cache.dtype
    key_cache, value_cache = (
        arena.view(dtype).as_strided(cache.shape, cache.stride(), cache.storage_offset())
        for cache in (batch.key_cache, batch.value_cache))
    pages, offsets = batch.meta.slot_pages, batch.meta.slot_offsets
    key_cache[pages, offsets] = batch.new_keys.to(dtype)
    value_cache[pages, offsets] = batch.new_values.to(dtype)
    return arena


def tolerance(dtype: torch.dtype) -> float:
    """Absolute tolerance against the float64 reference."""
    return 1e-4 if dtype == torch.float32 else 3e-2


def check_attention(batch: Batch, scale: float, window: int | None = None,
                    block_n: int | None = None) -> torch.Tensor:
    """Run the Triton kernel on a stored batch and compare it with the float64 reference."""
    out = paged_attention(batch.query, batch.key_cache, batch.value_cache, batch.meta, scale,
                          sliding_window=window, block_n=block_n)
    expected = reference_attention(batch.query, batch.key_cache, batch.value_cache, batch.meta,
                                   scale, window)
    assert out.dtype == batch.query.dtype and out.shape == batch.query.shape
    tol = tolerance(batch.key_cache.dtype)
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=0)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_kv_writes_exactly_the_slots(dtype: torch.dtype) -> None:
    batch = make_batch(ratio=1, head_dim=16, dtype=dtype)
    batch.new_keys = batch.new_keys.float()
    batch.new_values = batch.new_values.float()
    expected = expected_arena(batch)
    store_new_tokens(batch)
    assert torch.equal(batch.arena, expected)


def test_store_kv_skips_negative_pages() -> None:
    batch = make_batch(ratio=1, head_dim=16, dtype=torch.float32)
    before = batch.arena.clone()
    batch.meta.slot_pages = torch.full_like(batch.meta.slot_pages, -1)
    store_new_tokens(batch)
    assert torch.equal(batch.arena, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [16, 32])
@pytest.mark.parametrize("ratio", [1, 3])
def test_paged_attention_matches_reference(ratio: int, head_dim: int, dtype: torch.dtype) -> None:
    batch = make_batch(ratio, head_dim, dtype)
    store_new_tokens(batch)
    check_attention(batch, head_dim ** -0.5)


def test_paged_attention_small_tiles_cross_pages() -> None:
    """BLOCK_N smaller than the context: several online-softmax rescales per row."""
    batch = make_batch(ratio=3, head_dim=16, dtype=torch.float32, seed=1)
    store_new_tokens(batch)
    check_attention(batch, 0.3, block_n=4)


@pytest.mark.parametrize("block_n", [4, 16])
def test_paged_attention_sliding_window(block_n: int) -> None:
    """A window of 6 skips whole tiles (block 4) or masks inside one (block 16)."""
    batch = make_batch(ratio=3, head_dim=16, dtype=torch.float32, seed=4)
    store_new_tokens(batch)
    check_attention(batch, 0.3, window=6, block_n=block_n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_attention_wide_group_uses_dot(dtype: torch.dtype) -> None:
    """A 16-head group per kv head takes the tl.dot path."""
    batch = make_batch(ratio=16, head_dim=16, dtype=dtype, seed=2)
    store_new_tokens(batch)
    check_attention(batch, 0.25)


def test_paged_attention_no_tokens() -> None:
    batch = make_batch(ratio=1, head_dim=16, dtype=torch.float32)
    out = paged_attention(batch.query[:0], batch.key_cache, batch.value_cache, batch.meta, 1.0)
    assert out.shape == (0, KV_HEADS, 16)


@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ratio", [1, 3])
def test_matches_cpu_attention(ratio: int, dtype: torch.dtype, window: int | None) -> None:
    """The Triton ops agree with lmarith.models.attention's torch path."""
    module = cpu_attention
    batch = make_batch(ratio, 16, dtype, seed=3)
    cpu_batch = make_batch(ratio, 16, dtype, seed=3)
    store_new_tokens(batch)
    module.store_kv(cpu_batch.new_keys, cpu_batch.new_values, cpu_batch.key_cache,
                    cpu_batch.value_cache, cpu_batch.meta.slot_pages, cpu_batch.meta.slot_offsets)
    assert torch.equal(cpu_batch.arena, batch.arena)
    kwargs = {} if window is None else {"sliding_window": window}
    cpu_out = module.paged_attention(cpu_batch.query, cpu_batch.key_cache,
                                     cpu_batch.value_cache, cpu_batch.meta, 0.25, **kwargs)
    out = check_attention(batch, 0.25, window=window)
    tol = tolerance(dtype)
    torch.testing.assert_close(out.double(), cpu_out.double(), atol=tol, rtol=0)
