"""Prefix cache of the paged KV pool: page records, chained page hashes, hash -> page lookup.

A full page is identified by page_hash(model, parent_hash, page tokens), where
parent_hash is the hash of the page before it in the sequence (None for the first page),
so equal hashes mean equal model and equal token history up to the end of the page.
The table keeps one page per hash (the newest registration wins); a page that loses its
table slot keeps its hash until it is reused, and is simply no longer findable.
"""
from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(eq=False)
class Page:
    """One page of the shared pool; hash, token_ids, model are set while it is committed."""

    page_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] = ()
    model: Any = None

    def holds(self, model: Any, tokens: tuple[int, ...]) -> bool:
        """True if this page is hashed with exactly these tokens of this model (collision guard)."""
        return self.hash is not None and self.model == model and self.token_ids == tokens


def page_hash(model: Any, parent: int | None, tokens: Sequence[int]) -> int:
    """Chained 128-bit hash of one full page, binding it to its model and every earlier token.

    The model enters through its repr (a ModelSpec's names its path and dtype)."""
    digest = hashlib.blake2b(digest_size=16)
    key = repr(model).encode()
    digest.update(len(key).to_bytes(4, "little") + key)
    digest.update(b"\x00" if parent is None else b"\x01" + parent.to_bytes(16, "little"))
    digest.update(array("q", tokens).tobytes())
    return int.from_bytes(digest.digest(), "little")


class PrefixCache:
    """Hash -> page id table for committed full pages."""

    def __init__(self) -> None:
        self._by_hash: dict[int, int] = {}

    def lookup(self, page_hash_value: int) -> int | None:
        """Page id registered under this hash, or None."""
        return self._by_hash.get(page_hash_value)

    def register(self, page: Page, page_hash_value: int, model: Any,
                 tokens: tuple[int, ...]) -> None:
        """Mark page as holding these committed tokens and make it the table entry for its hash."""
        page.hash = page_hash_value
        page.token_ids = tokens
        page.model = model
        self._by_hash[page_hash_value] = page.page_id

    def forget(self, page: Page) -> None:
        """Clear page's hash (its content is about to change) and drop its table slot, if any."""
        if page.hash is None:
            return
        if self._by_hash.get(page.hash) == page.page_id:
            del self._by_hash[page.hash]
        page.hash = None
        page.token_ids = ()
        page.model = None

    def entries(self) -> list[tuple[int, int]]:
        """All (hash, page id) pairs, for invariant checks and tests."""
        return list(self._by_hash.items())

    def __len__(self) -> int:
        return len(self._by_hash)
