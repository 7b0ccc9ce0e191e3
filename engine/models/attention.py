"""Attention as the models call it: write this step's K/V into the paged cache, then attend
over each sequence's cached context. Both go through the ops dispatch
(lmarith.bindings.ops), so a model never chooses a kernel: CPU runs the torch (or C++) face,
CUDA the Triton kernels."""
from __future__ import annotations

import torch

from lmarith.bindings import ops
from lmarith.kernels.attention_metadata import AttentionMetadata, build_metadata

KVCache = tuple[torch.Tensor, torch.Tensor]

__all__ = ["AttentionMetadata", "KVCache", "build_metadata", "paged_self_attention"]


def paged_self_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         cache: KVCache, meta: AttentionMetadata, scale: float,
                         sliding_window: int | None = None) -> torch.Tensor:
    """Store key/value [N, KVH, D] in their slots, then attend query [N, H, D] -> [N, H, D]."""
    ops.store_kv(key, value, cache[0], cache[1], meta.slot_pages, meta.slot_offsets)
    return ops.paged_attention(query, cache[0], cache[1], meta, scale, sliding_window)
