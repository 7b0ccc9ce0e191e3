"""store_kv through every face: each new token's key and value land in exactly their
(page, offset) slots of the strided, NaN-poisoned cache arena, bit for bit, and nothing else
in the arena changes."""
from __future__ import annotations

import pytest
import torch

from lmarith.bindings import ops

OP = "store_kv"


def expected_arena(batch) -> torch.Tensor:
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


def store(face: str, batch, device: torch.device) -> torch.Tensor:
    """Run the face's store_kv on the batch moved to device; the arena's bytes afterwards."""
    moved = batch.on(device)
    ops.run(OP, face, moved.new_keys, moved.new_values, moved.key_cache, moved.value_cache,
            moved.meta.slot_pages, moved.meta.slot_offsets)
    return moved.arena.cpu()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_kv_writes_exactly_the_slots(face, device, paged_batch, dtype) -> None:
    """float32 keys/values into a float32 or bfloat16 cache (cast on the way in)."""
    batch = paged_batch(ratio=1, head_dim=16, dtype=dtype)
    batch.new_keys, batch.new_values = batch.new_keys.float(), batch.new_values.float()
    expected = expected_arena(batch)
    assert not torch.equal(expected, batch.arena)
    assert torch.equal(store(face, batch, device), expected)


def test_store_kv_odd_head_dim(face, device, paged_batch) -> None:
    """A head_dim that is not a power of two (masked tail columns)."""
    batch = paged_batch(ratio=1, head_dim=24, dtype=torch.float32, seed=5)
    assert torch.equal(store(face, batch, device), expected_arena(batch))


def test_store_kv_skips_negative_pages(face, device, paged_batch) -> None:
    """Tokens whose page id is negative (padding) are not written anywhere."""
    batch = paged_batch(ratio=1, head_dim=16, dtype=torch.float32)
    before = batch.arena.clone()
    batch.meta.slot_pages = torch.full_like(batch.meta.slot_pages, -1)
    assert torch.equal(store(face, batch, device), before)


def test_store_kv_rejects_bad_shapes(face, paged_batch) -> None:
    """Every face is behind the same checks (bindings/checks.py)."""
    batch = paged_batch(ratio=1, head_dim=16, dtype=torch.float32)
    caches, meta = (batch.key_cache, batch.value_cache), batch.meta
    with pytest.raises(ValueError, match="key/value must both be"):
        ops.run(OP, face, batch.new_keys, batch.new_values[:, :1], *caches,
                meta.slot_pages, meta.slot_offsets)
    with pytest.raises(ValueError, match="slot_pages must have shape"):
        ops.run(OP, face, batch.new_keys, batch.new_values, *caches, meta.slot_pages[:1],
                meta.slot_offsets)


def test_dispatch_picks_the_face_for_the_device() -> None:
    """CPU -> cpp (when the extension built), CUDA -> triton; an unknown face is a ValueError."""
    assert ops.faces(OP)[:2] == ["torch", "triton"]
    assert ops.face_for(OP, torch.device("cpu")) == ("cpp" if ops.cpp_available() else "torch")
    assert ops.face_for(OP, torch.device("cuda")) == "triton"
    with pytest.raises(ValueError, match="no 'cuda' face"):
        ops.run(OP, "cuda", *(torch.zeros(1, 1, 1),) * 2, *(torch.zeros(1, 1, 1, 1),) * 2,
                torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64))


def test_store_kv_from_strided_qkv_rows(face, device, paged_batch) -> None:
    """K and V as the model passes them: views into one wider qkv row per token."""
    batch = paged_batch(ratio=1, head_dim=16, dtype=torch.float32, seed=3)
    tokens, heads, dim = batch.new_keys.shape
    qkv = torch.cat([torch.randn(tokens, 5), batch.new_keys.reshape(tokens, -1),
                     batch.new_values.reshape(tokens, -1)], dim=1)
    batch.new_keys = qkv[:, 5: 5 + heads * dim].view(tokens, heads, dim)
    batch.new_values = qkv[:, 5 + heads * dim:].view(tokens, heads, dim)
    assert torch.equal(store(face, batch, device), expected_arena(batch))


@pytest.mark.faces("torch", "cpp")
def test_store_kv_refuses_slots_outside_the_cache(face, paged_batch) -> None:
    """A page past the cache raises before anything is written (no stray write). The Triton
    face trusts the engine's slots, as a CUDA kernel does (no bounds check per token)."""
    batch = paged_batch(ratio=1, head_dim=16, dtype=torch.float32)
    before = batch.arena.clone()
    pages = batch.meta.slot_pages.clone()
    pages[-1] = batch.key_cache.shape[0]
    with pytest.raises((ValueError, IndexError)):
        ops.run(OP, face, batch.new_keys, batch.new_values, batch.key_cache, batch.value_cache,
                pages, batch.meta.slot_offsets)
    if face == "cpp":
        assert torch.equal(batch.arena, before)
