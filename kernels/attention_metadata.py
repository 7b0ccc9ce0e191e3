"""AttentionMetadata: where one step's new tokens go in the paged KV cache and what each
sequence attends to. Built once per step and model by the runner, read by every face of the
store-KV and paged-attention ops (torch, Triton), so it lives beside the kernels."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class AttentionMetadata:
    """Per step: query_start [S+1] (each sequence's first row in the flat token batch),
    context_lens [S] (tokens in the cache after this step), block_tables [S, P] (page ids,
    padded), slot_pages / slot_offsets [N] (where each new token's K/V goes)."""

    query_start: torch.Tensor
    context_lens: torch.Tensor
    block_tables: torch.Tensor
    slot_pages: torch.Tensor
    slot_offsets: torch.Tensor
    page_size: int
    max_query_len: int
    max_context_len: int
    scratch: dict[Any, Any] = field(default_factory=dict)  # per-step values a face derives once


def build_metadata(query_lens: list[int], context_lens: list[int], block_tables: list[list[int]],
                   page_size: int, device: str | torch.device = "cpu") -> AttentionMetadata:
    """AttentionMetadata from plain lists (each sequence's new tokens are its last ones)."""
    slot_pages: list[int] = []
    slot_offsets: list[int] = []
    for q_len, ctx, table in zip(query_lens, context_lens, block_tables):
        for pos in range(ctx - q_len, ctx):
            slot_pages.append(table[pos // page_size])
            slot_offsets.append(pos % page_size)
    width = max(len(t) for t in block_tables)
    padded = [list(t) + [0] * (width - len(t)) for t in block_tables]
    starts = [0]
    for q_len in query_lens:
        starts.append(starts[-1] + q_len)

    def tensor(values: list) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=device)

    return AttentionMetadata(
        query_start=tensor(starts), context_lens=tensor(list(context_lens)),
        block_tables=tensor(padded), slot_pages=tensor(slot_pages),
        slot_offsets=tensor(slot_offsets), page_size=page_size,
        max_query_len=max(query_lens), max_context_len=max(context_lens))
