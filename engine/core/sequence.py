"""Sequence: one term of one request on one model. It owns everything the KV cache and the
runner need: token ids (context, then the generated tokens it has been given), the block
table of pages holding their KV, and how many of them are computed. Ids come from the engine."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Hashable, Optional

if TYPE_CHECKING:
    from ..formula import Term


@dataclass(eq=False)
class Sequence:
    """token_ids[:num_computed] have KV in the cache; the rest is scheduled work. The first
    prompt_len ids are the term's context; later ones are the request's generated tokens."""

    seq_id: int
    model: Hashable                  # the ModelSpec whose KV the pages hold
    page_size: int                   # tokens per page for that model
    token_ids: list[int]
    prompt_len: int = 0
    term: Optional["Term"] = None    # the formula Term this sequence computes
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0
    num_cached_tokens: int = 0       # prefix-cache hit at the last allocation
    num_hashed_pages: int = 0        # leading pages committed to the prefix cache

    def __post_init__(self) -> None:
        if self.page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {self.page_size}")

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed

    @property
    def num_generated(self) -> int:
        """Generated tokens this sequence holds (computed or not)."""
        return len(self.token_ids) - self.prompt_len

    def pages_needed(self, num_tokens: int) -> int:
        """Pages needed to hold num_tokens tokens."""
        return -(-num_tokens // self.page_size)

    def page_tokens(self, index: int) -> tuple[int, ...]:
        """Token ids stored in page `index` of this sequence."""
        start = index * self.page_size
        return tuple(self.token_ids[start:start + self.page_size])

    def reset(self, generated: list[int]) -> None:
        """Back to a fresh prefill over context + all generated tokens (after preemption)."""
        self.token_ids = self.token_ids[: self.prompt_len] + list(generated)
        self.num_computed = 0
