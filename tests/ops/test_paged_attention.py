"""paged_attention through every face against a dense float64 causal attention that gathers
each sequence's keys in position order. The cache is the NaN-poisoned strided arena of
conftest's paged_batch, so a read outside a sequence's causal range poisons the output."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from lmarith.bindings import ops
from lmarith.kernels.attention_metadata import AttentionMetadata, build_metadata

OP = "paged_attention"
# Absolute tolerance against the float64 reference: float32 caches, bfloat16 caches.
FLOAT32_ATOL, BFLOAT16_ATOL = 1e-4, 3e-2
# The mixed-batch test compares float32 faces with a float32 naive attention.
MIXED_ATOL = MIXED_RTOL = 1e-5

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array:DeprecationWarning")


def tolerance(dtype: torch.dtype) -> float:
    """Absolute tolerance against the float64 reference for a cache dtype."""
    return FLOAT32_ATOL if dtype == torch.float32 else BFLOAT16_ATOL


def dense_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    meta, scale: float, window: int | None = None) -> torch.Tensor:
    """Dense causal attention in float64, gathering each sequence's keys in position order."""
    group = query.shape[1] // key_cache.shape[2]
    out = torch.zeros(query.shape, dtype=torch.float64)
    for seq in range(len(meta.context_lens)):
        start, end = int(meta.query_start[seq]), int(meta.query_start[seq + 1])
        ctx = int(meta.context_lens[seq])
        positions = torch.arange(ctx)
        pages = meta.block_tables[seq, positions // meta.page_size]
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


def store_face(face: str) -> str:
    """The store_kv face paired with an attention face (the C++ one has none: torch's)."""
    return face if face in ops.faces("store_kv") else "torch"


def stored(face: str, batch, device: torch.device):
    """The batch on the face's device with its new tokens stored by that face's store_kv."""
    moved = batch.on(device)
    ops.run("store_kv", store_face(face), moved.new_keys, moved.new_values, moved.key_cache,
            moved.value_cache, moved.meta.slot_pages, moved.meta.slot_offsets)
    return moved


def check_attention(face: str, batch, device: torch.device, scale: float,
                    window: int | None = None, **knobs) -> torch.Tensor:
    """Store, run the face and compare it with the float64 reference; the output on CPU."""
    moved = stored(face, batch, device)
    kwargs = {} if window is None else {"sliding_window": window}
    out = ops.run(OP, face, moved.query, moved.key_cache, moved.value_cache, moved.meta, scale,
                  **kwargs, **knobs).cpu()
    on_cpu = moved.on(torch.device("cpu"))
    expected = dense_attention(on_cpu.query, on_cpu.key_cache, on_cpu.value_cache, on_cpu.meta,
                               scale, window)
    assert out.dtype == batch.query.dtype and out.shape == batch.query.shape
    atol = tolerance(batch.key_cache.dtype)
    torch.testing.assert_close(out.double(), expected, atol=atol, rtol=0)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [16, 32])
@pytest.mark.parametrize("ratio", [1, 3])
def test_paged_attention_matches_reference(face, device, paged_batch, ratio, head_dim, dtype):
    """Plain and grouped-query heads, two head sizes, float32 and bfloat16 caches."""
    check_attention(face, paged_batch(ratio, head_dim, dtype), device, head_dim ** -0.5)


@pytest.mark.faces("triton")
def test_paged_attention_small_tiles_cross_pages(face, device, paged_batch) -> None:
    """BLOCK_N smaller than the context: several online-softmax rescales per row."""
    check_attention(face, paged_batch(3, 16, torch.float32, seed=1), device, 0.3, block_n=4)


def test_paged_attention_sliding_window(face, device, paged_batch) -> None:
    """A window of 6 over contexts up to 13."""
    check_attention(face, paged_batch(3, 16, torch.float32, seed=4), device, 0.3, window=6)


@pytest.mark.faces("triton")
@pytest.mark.parametrize("block_n", [4, 16])
def test_paged_attention_sliding_window_tiles(face, device, paged_batch, block_n: int) -> None:
    """A window of 6 skips whole tiles (block 4) or masks inside one (block 16)."""
    batch = paged_batch(3, 16, torch.float32, seed=4)
    check_attention(face, batch, device, 0.3, window=6, block_n=block_n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_attention_wide_group_uses_dot(face, device, paged_batch, dtype) -> None:
    """A 16-head group per kv head (Triton takes its tl.dot path)."""
    check_attention(face, paged_batch(16, 16, dtype, seed=2), device, 0.25)


def test_paged_attention_no_tokens(face, device, paged_batch) -> None:
    """A step without new tokens (every query length 0) gives an empty [0, H, D] output."""
    moved = paged_batch(1, 16, torch.float32).on(device)
    meta = dataclasses.replace(moved.meta, query_start=torch.zeros_like(moved.meta.query_start),
                               slot_pages=moved.meta.slot_pages[:0],
                               slot_offsets=moved.meta.slot_offsets[:0], max_query_len=0)
    out = ops.run(OP, face, moved.query[:0], moved.key_cache, moved.value_cache, meta, 1.0)
    assert out.shape == (0, moved.key_cache.shape[2], 16)


@pytest.mark.faces("triton")  # every face but the torch one, which it is measured against
@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ratio", [1, 3])
def test_matches_torch_face(face, device, paged_batch, ratio, dtype, window) -> None:
    """The face's store_kv writes the same bytes as the torch face's, and its attention agrees
    with the torch face's (both also within tolerance of the float64 reference)."""
    batch = paged_batch(ratio, 16, dtype, seed=3)
    torch_batch = stored("torch", paged_batch(ratio, 16, dtype, seed=3), torch.device("cpu"))
    assert torch.equal(stored(face, batch, device).arena.cpu(), torch_batch.arena)
    kwargs = {} if window is None else {"sliding_window": window}
    torch_out = ops.run(OP, "torch", torch_batch.query, torch_batch.key_cache,
                        torch_batch.value_cache, torch_batch.meta, 0.25, **kwargs)
    out = check_attention(face, batch, device, 0.25, window=window)
    torch.testing.assert_close(out.double(), torch_out.double(), atol=tolerance(dtype), rtol=0)


def naive_attention(query, keys, values, scale: float, window: int | None) -> torch.Tensor:
    """Causal attention of the last len(query) positions of one sequence, K/V heads repeated."""
    group = query.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
    scores = torch.einsum("thd,lhd->htl", query, keys) * scale
    positions = torch.arange(keys.shape[0] - query.shape[0], keys.shape[0])[:, None]
    cols = torch.arange(keys.shape[0])[None, :]
    allowed = (cols <= positions) & ((cols > positions - window) if window else True)
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return torch.einsum("htl,lhd->thd", weights, values)


@pytest.mark.parametrize("window", [None, 3])
def test_paged_attention_mixed_batch(face, device, window) -> None:
    """Five sequences mixing prefill, chunks and decode (metadata from build_metadata), then a
    decode step of each, against per-sequence naive attention."""
    gen = torch.Generator().manual_seed(0)
    heads, kv_heads, dim, page_size = 6, 2, 8, 4
    q_lens, ctx = [5, 1, 3, 1, 4], [5, 9, 11, 2, 7]
    arena = torch.full((20, 3, page_size, kv_heads, dim), float("nan"), device=device)
    key_cache, value_cache = arena[:, 0], arena[:, 2]
    free = torch.randperm(20, generator=gen).tolist()
    tables = [[free.pop() for _ in range(-(-c // page_size))] for c in ctx]
    keys = [torch.randn(c, kv_heads, dim, generator=gen) for c in ctx]
    values = [torch.randn(c, kv_heads, dim, generator=gen) for c in ctx]
    queries = [torch.randn(q, heads, dim, generator=gen) for q in q_lens]
    full = build_metadata(ctx, ctx, tables, page_size, device=device)
    ops.run("store_kv", store_face(face), torch.cat(keys).to(device), torch.cat(values).to(device),
            key_cache, value_cache, full.slot_pages, full.slot_offsets)
    for step_queries, step_lens in ((queries, q_lens), ([q[-1:] for q in queries], [1] * 5)):
        meta = build_metadata(step_lens, ctx, tables, page_size, device=device)
        out = ops.run(OP, face, torch.cat(step_queries).to(device), key_cache, value_cache, meta,
                      0.3, sliding_window=window).cpu()
        expected = [naive_attention(q, k, v, 0.3, window)
                    for q, k, v in zip(step_queries, keys, values)]
        torch.testing.assert_close(out, torch.cat(expected), atol=MIXED_ATOL, rtol=MIXED_RTOL)


def test_dispatch_picks_the_face_for_the_device() -> None:
    """CPU -> cpp when the extension built (else torch), CUDA -> triton."""
    with_cpp = ops.cpp_available()
    assert ops.faces(OP) == ["torch", "triton"] + (["cpp"] if with_cpp else [])
    assert ops.face_for(OP, torch.device("cpu")) == ("cpp" if with_cpp else "torch")
    assert ops.face_for(OP, torch.device("cuda")) == "triton"


@pytest.mark.parametrize("window", [0, -2, 1.5])
def test_paged_attention_rejects_a_bad_window(face, paged_batch, window) -> None:
    """sliding_window is checked on every path, keyword or positional, dispatch or named face."""
    batch = paged_batch(ratio=1, head_dim=16, dtype=torch.float32)
    args = (batch.query, batch.key_cache, batch.value_cache, batch.meta, 0.25)
    with pytest.raises(ValueError, match="sliding_window"):
        ops.run(OP, face, *args, sliding_window=window)
    with pytest.raises(ValueError, match="sliding_window"):
        ops.paged_attention(*args, sliding_window=window)


# Odd shapes: (head_dim, page_size, group, query_lens, context_lens, window). Contexts are
# rarely page multiples; 1100 and 1500 tokens at batch 1-2 make the C++ face split the context
# (flash-decoding merge); 17 rows is a speculative verification; 80 rows spans several of the
# C++ face's row blocks.
ODD_SHAPES = {
    "d8-page1-mha": (8, 1, 1, [1, 3], [1, 7], None),
    "d64-page4-gqa2": (64, 4, 2, [1, 5, 17], [5, 30, 17], None),
    "d80-page16-gqa4-window": (80, 16, 4, [2, 1, 17], [33, 300, 40], 7),
    "d64-page16-split-decode": (64, 16, 3, [1], [1100], None),
    "d64-page4-split-window": (64, 4, 2, [1, 3], [1500, 700], 300),
    "d256-page16-verify": (256, 16, 2, [17, 1], [60, 19], None),
    "d64-page16-long-chunk": (64, 16, 2, [80, 1], [200, 90], 50),
    "d32-page8-gqa8-decode": (32, 8, 8, [1, 1, 3], [300, 45, 70], None),
}


def odd_batch(head_dim: int, page_size: int, group: int, q_lens: list[int], ctx: list[int],
              dtype: torch.dtype, seed: int = 0):
    """(query, key_cache, value_cache, meta): caches are strided views of a NaN arena (K and
    V interleaved per page, a NaN gap between pages, scrambled page ids, one spare page per
    sequence), every slot a sequence does not own NaN, including the tail of its last page;
    the query is a strided slice of a wider tensor."""
    gen = torch.Generator().manual_seed(seed)
    kv_heads = 2
    pages = [-(-c // page_size) + 1 for c in ctx]
    page_elems = page_size * kv_heads * head_dim
    arena = torch.full((sum(pages), 2 * page_elems + 8), float("nan")).to(dtype)
    shape = (sum(pages), page_size, kv_heads, head_dim)
    strides = (arena.stride(0), kv_heads * head_dim, head_dim, 1)
    key_cache = arena.as_strided(shape, strides, 0)
    value_cache = arena.as_strided(shape, strides, page_elems)
    order = torch.randperm(sum(pages), generator=gen).tolist()
    tables = [[order.pop() for _ in range(count)] for count in pages]
    meta = build_metadata(ctx, ctx, tables, page_size)
    for cache in (key_cache, value_cache):
        values = torch.randn(sum(ctx), kv_heads, head_dim, generator=gen).to(dtype)
        cache[meta.slot_pages, meta.slot_offsets] = values
    wide = torch.randn(sum(q_lens), kv_heads * group + 1, head_dim, generator=gen).to(dtype)
    return wide[:, 1:], key_cache, value_cache, build_metadata(q_lens, ctx, tables, page_size)


@pytest.mark.faces("torch", "cpp")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", ODD_SHAPES.values(), ids=ODD_SHAPES.keys())
def test_paged_attention_odd_shapes(face, shape, dtype) -> None:
    """Against the float64 dense reference (tolerance(dtype)); NaN in stale slots must not leak."""
    head_dim, page_size, group, q_lens, ctx, window = shape
    query, key_cache, value_cache, meta = odd_batch(head_dim, page_size, group, q_lens, ctx, dtype)
    out = ops.run(OP, face, query, key_cache, value_cache, meta, head_dim ** -0.5,
                  sliding_window=window)
    expected = dense_attention(query, key_cache, value_cache, meta, head_dim ** -0.5, window)
    assert out.dtype == dtype and out.shape == query.shape
    torch.testing.assert_close(out.double(), expected, atol=tolerance(dtype), rtol=0)


@pytest.mark.faces("cpp")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_face_hands_long_chunks_to_torch_when_asked(face, monkeypatch, dtype) -> None:
    """With a row threshold set (cpp.ATTENTION_MAX_QUERY_ROWS), a step with an 80-row chunk
    runs the torch reference (and stays correct); a decode step still runs the kernel."""
    from lmarith.bindings import cpp
    from lmarith.kernels import reference_attention
    calls = []
    torch_face = reference_attention.paged_attention
    monkeypatch.setattr(cpp, "ATTENTION_MAX_QUERY_ROWS", 64)
    monkeypatch.setattr(reference_attention, "paged_attention",
                        lambda *args: calls.append(1) or torch_face(*args))
    for q_lens, expected_calls in (([80, 1], 1), ([1, 1], 1)):
        query, key_cache, value_cache, meta = odd_batch(64, 16, 4, q_lens, [130, 70], dtype, seed=5)
        out = ops.run(OP, face, query, key_cache, value_cache, meta, 0.125, sliding_window=40)
        expected = dense_attention(query, key_cache, value_cache, meta, 0.125, 40)
        torch.testing.assert_close(out.double(), expected, atol=tolerance(dtype), rtol=0)
        assert len(calls) == expected_calls


def test_paged_attention_empty_batch(face, device) -> None:
    """No sequences at all (N = 0, S = 0): an empty [0, H, D] output in the query's dtype."""
    query, key_cache, value_cache, _ = odd_batch(8, 4, 2, [1], [3], torch.float32)
    empty = torch.zeros(0, dtype=torch.int64, device=device)
    meta = AttentionMetadata(query_start=torch.zeros(1, dtype=torch.int64, device=device),
                             context_lens=empty, block_tables=empty.view(0, 1), slot_pages=empty,
                             slot_offsets=empty, page_size=4, max_query_len=0, max_context_len=0)
    out = ops.run(OP, face, query[:0].to(device), key_cache.to(device), value_cache.to(device),
                  meta, 1.0)
    assert out.shape == (0, 4, 8) and out.dtype == torch.float32


@pytest.mark.faces("cpp")
def test_per_lane_path_matches_reference(face) -> None:
    """LMARITH_ATTENTION_GROUPS=0 sends every shape through the one-lane-at-a-time path
    (csrc/attention_simd.h) instead of the grouped tiles: the odd shapes still pass. The knob
    is read once per process, so the check runs in a child pytest."""
    env = {**os.environ, "LMARITH_ATTENTION_GROUPS": "0"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             f"{__file__}::test_paged_attention_odd_shapes", "-k", "cpp"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "failed" not in result.stdout
