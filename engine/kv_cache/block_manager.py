"""Paged KV-cache bookkeeping for several models sharing one pool of equally sized pages.

Every page has the same byte size; each model fits its own number of tokens in a page
(seq.page_size), so sequences of different models draw from one free list.

The manager works on the engine's sequences (lmarith.core.sequence.Sequence), or anything
with the fields of PagedSequence below; it never sees KV data, only page ids. Protocol:
- can_allocate(seqs, extra) then allocate(seq, extra) for each seq in the same order;
  the prefill computes tokens from seq.num_cached_tokens on.
- Before writing any new position, call ensure_capacity(seq, n): it appends pages and
  returns (src, dst) page copies to perform first (copy-on-write of shared pages).
- commit(seq, n) once the first n tokens are verified and their KV written: full pages
  among them enter the prefix cache. Speculative (unverified) pages are never hashed.
- truncate(seq, n) rolls back rejected tokens; free / preempt release the sequence.
"""
from __future__ import annotations

import dataclasses
from collections import Counter, OrderedDict
from typing import Any, Protocol

from ..errors import CacheExhaustedError
from .prefix_cache import Page, PrefixCache, page_hash


class PagedSequence(Protocol):
    """What the block manager reads and writes on a sequence."""

    seq_id: int
    model: Any              # hashable key of the model whose KV the pages hold
    page_size: int          # tokens per page for that model
    token_ids: list[int]
    block_table: list[int]
    num_cached_tokens: int
    num_hashed_pages: int

    def pages_needed(self, num_tokens: int) -> int: ...

    def page_tokens(self, index: int) -> tuple[int, ...]: ...


class BlockManager:
    """Allocates, shares, hashes and frees pages of one pool across sequences of several models."""

    def __init__(self, num_pages: int) -> None:
        if num_pages < 1:
            raise ValueError(f"num_pages must be >= 1, got {num_pages}")
        self.num_pages = num_pages
        self.pages = [Page(page_id) for page_id in range(num_pages)]
        self.cache = PrefixCache()
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_pages))
        self._live: dict[int, PagedSequence] = {}

    @property
    def num_free_pages(self) -> int:
        """Pages with ref_count 0 (cached-but-unused pages count as free)."""
        return len(self._free)

    @property
    def num_cached_free_pages(self) -> int:
        """Free pages that still hold a findable prefix (reused on a cache hit)."""
        return sum(1 for page_id in self._free if self.pages[page_id].hash is not None
                   and self.cache.lookup(self.pages[page_id].hash) == page_id)

    def free_order(self) -> list[int]:
        """Free page ids in the order they will be handed out."""
        return list(self._free)

    def is_live(self, seq: PagedSequence) -> bool:
        """True if seq currently holds pages of this manager."""
        return seq.seq_id in self._live

    def pages_for(self, seq: PagedSequence, num_tokens: int) -> int:
        """New pages seq needs to hold num_tokens tokens in total."""
        return max(0, seq.pages_needed(num_tokens) - len(seq.block_table))

    def can_allocate(self, seqs: list[PagedSequence], extra_tokens: int = 0) -> bool:
        """True iff allocate(seq, extra_tokens) would succeed for every seq, done in list order.

        Exact, not conservative: it replays the allocation without mutating anything, so
        cached pages shared inside the batch count once, and a cached free page that an
        earlier seq's fresh pages would evict counts as a miss for later seqs.
        """
        claimed: set[int] = set()
        evicted: set[int] = set()
        free_iter = iter(self._free)
        for seq in seqs:
            self._require_new(seq)
            hits = self._match_prefix(seq, evicted)
            claimed.update(page_id for page_id in hits if self.pages[page_id].ref_count == 0)
            misses = seq.pages_needed(len(seq.token_ids) + extra_tokens) - len(hits)
            for _ in range(misses):
                page_id = next((p for p in free_iter if p not in claimed), None)
                if page_id is None:
                    return False
                claimed.add(page_id)
                evicted.add(page_id)
        return True

    def allocate(self, seq: PagedSequence, extra_tokens: int = 0) -> int:
        """Give seq pages for its tokens plus extra_tokens; return the count of cached tokens."""
        self._require_new(seq)
        hits = self._match_prefix(seq, set())
        total = seq.pages_needed(len(seq.token_ids) + extra_tokens)
        reused_free = sum(1 for page_id in hits if self.pages[page_id].ref_count == 0)
        self._require_free(total - len(hits) + reused_free)
        for page_id in hits:
            self._acquire(page_id)
        seq.block_table = hits + [self._take_free_page() for _ in range(total - len(hits))]
        seq.num_hashed_pages = len(hits)
        seq.num_cached_tokens = len(hits) * seq.page_size
        self._live[seq.seq_id] = seq
        return seq.num_cached_tokens

    def ensure_capacity(self, seq: PagedSequence, num_new_tokens: int) -> list[tuple[int, int]]:
        """Make room for num_new_tokens more tokens; return (src, dst) page copies to do first.

        A page about to be written that other sequences still hold is replaced by a fresh
        copy (copy-on-write); an exclusively held page losing its committed content is un-hashed.
        """
        self._require_live(seq)
        length = len(seq.token_ids)
        needed = seq.pages_needed(length + num_new_tokens)
        last = min(needed, len(seq.block_table)) if num_new_tokens > 0 else 0
        written = range(length // seq.page_size, last)
        shared = [i for i in written if self.pages[seq.block_table[i]].ref_count > 1]
        self._require_free(max(0, needed - len(seq.block_table)) + len(shared))
        copies = []
        for index in written:
            page = self.pages[seq.block_table[index]]
            if page.ref_count > 1:
                page.ref_count -= 1
                seq.block_table[index] = self._take_free_page()
                copies.append((page.page_id, seq.block_table[index]))
            else:
                self.cache.forget(page)
        seq.block_table.extend(self._take_free_page() for _ in range(needed - len(seq.block_table)))
        return copies

    def commit(self, seq: PagedSequence, num_verified_tokens: int) -> None:
        """Hash and cache the unhashed full pages wholly inside the first num_verified_tokens."""
        self._require_live(seq)
        limit = min(num_verified_tokens, len(seq.token_ids)) // seq.page_size
        for index in range(seq.num_hashed_pages, limit):
            page = self.pages[seq.block_table[index]]
            parent = self.pages[seq.block_table[index - 1]].hash if index else None
            tokens = seq.page_tokens(index)
            value = page_hash(seq.model, parent, tokens)
            if page.hash is None:
                self.cache.register(page, value, seq.model, tokens)
            elif page.hash != value:
                raise RuntimeError(
                    f"page {page.page_id} of sequence {seq.seq_id} holds other committed content; "
                    "call ensure_capacity before writing tokens")
        seq.num_hashed_pages = max(seq.num_hashed_pages, limit)

    def truncate(self, seq: PagedSequence, num_tokens: int) -> None:
        """Roll seq back to its first num_tokens tokens, releasing later pages and reserved room.

        A committed page that becomes partially used is un-hashed if seq holds it alone; if it
        is shared it keeps its hash (the other holders still see it full) and the next write
        into it goes through copy-on-write in ensure_capacity.
        """
        self._require_live(seq)
        if not 0 <= num_tokens <= len(seq.token_ids):
            raise ValueError(f"cannot truncate {len(seq.token_ids)} tokens to {num_tokens}")
        del seq.token_ids[num_tokens:]
        keep = seq.pages_needed(num_tokens)
        for page_id in reversed(seq.block_table[keep:]):
            self._release(page_id)
        del seq.block_table[keep:]
        seq.num_hashed_pages = min(seq.num_hashed_pages, num_tokens // seq.page_size)
        seq.num_cached_tokens = min(seq.num_cached_tokens, num_tokens)
        if num_tokens % seq.page_size:
            page = self.pages[seq.block_table[-1]]
            if page.ref_count == 1:
                self.cache.forget(page)

    def fork(self, seq: PagedSequence, child_id: int) -> PagedSequence:
        """New live sequence (id child_id) sharing seq's tokens and the pages holding them."""
        self._require_live(seq)
        if child_id in self._live:
            raise ValueError(f"sequence {child_id} is already allocated")
        shared = seq.block_table[:seq.pages_needed(len(seq.token_ids))]
        child = dataclasses.replace(seq, seq_id=child_id, token_ids=list(seq.token_ids),
                                    block_table=list(shared))
        for page_id in shared:
            self.pages[page_id].ref_count += 1
        self._live[child.seq_id] = child
        return child

    def free(self, seq: PagedSequence) -> None:
        """Release seq's pages tail first, so cached prefix pages are the last to be reused."""
        self._require_live(seq)
        for page_id in reversed(seq.block_table):
            self._release(page_id)
        seq.block_table = []
        seq.num_hashed_pages = 0
        seq.num_cached_tokens = 0
        del self._live[seq.seq_id]

    def preempt(self, seq: PagedSequence) -> None:
        """Free seq but keep its tokens, so allocate(seq) can recompute it later from the cache."""
        self.free(seq)

    def check_invariants(self) -> None:
        """Raise AssertionError if ref counts, free list, hash table or block tables disagree."""
        refs = Counter(p for seq in self._live.values() for p in seq.block_table)
        for page in self.pages:
            _check(page.ref_count == refs[page.page_id], f"page {page.page_id}: ref_count "
                   f"{page.ref_count} but {refs[page.page_id]} block-table references")
            _check((page.ref_count == 0) == (page.page_id in self._free),
                   f"page {page.page_id}: ref_count {page.ref_count} disagrees with free list")
        _check(len(self._free) + sum(p.ref_count > 0 for p in self.pages) == self.num_pages,
               "free + used pages != num_pages")
        for value, page_id in self.cache.entries():
            _check(self.pages[page_id].hash == value, f"stale hash table entry for page {page_id}")
        for seq in self._live.values():
            self._check_sequence(seq)

    def _check_sequence(self, seq: PagedSequence) -> None:
        """Check one live sequence's block table against its tokens and hashed pages."""
        name = f"seq {seq.seq_id}"
        _check(len(set(seq.block_table)) == len(seq.block_table), f"{name}: duplicate page")
        length = len(seq.token_ids)
        _check(len(seq.block_table) >= seq.pages_needed(length), f"{name}: too few pages")
        _check(seq.num_hashed_pages <= length // seq.page_size, f"{name}: hashed past end")
        for index in range(seq.num_hashed_pages):
            page = self.pages[seq.block_table[index]]
            _check(page.holds(seq.model, seq.page_tokens(index)),
                   f"seq {seq.seq_id}: committed page {page.page_id} lost its content")

    def _match_prefix(self, seq: PagedSequence, unusable: set[int]) -> list[int]:
        """Cached pages holding seq's leading full pages, up to the first miss, leaving a token."""
        hits: list[int] = []
        parent = None
        for index in range(max(0, len(seq.token_ids) - 1) // seq.page_size):
            tokens = seq.page_tokens(index)
            parent = page_hash(seq.model, parent, tokens)
            page_id = self.cache.lookup(parent)
            if page_id is None or page_id in unusable:
                break
            if not self.pages[page_id].holds(seq.model, tokens):
                break
            hits.append(page_id)
        return hits

    def _acquire(self, page_id: int) -> None:
        """Add a reference to a page, taking it off the free list if it was free."""
        page = self.pages[page_id]
        if page.ref_count == 0:
            del self._free[page_id]
        page.ref_count += 1

    def _take_free_page(self) -> int:
        """Pop the oldest free page, evicting whatever prefix-cache entry it held."""
        page_id, _ = self._free.popitem(last=False)
        page = self.pages[page_id]
        self.cache.forget(page)
        page.ref_count = 1
        return page_id

    def _release(self, page_id: int) -> None:
        """Drop a reference; an unreferenced page joins the back of the free list, still cached."""
        page = self.pages[page_id]
        page.ref_count -= 1
        if page.ref_count == 0:
            self._free[page_id] = None

    def _require_free(self, num_pages: int) -> None:
        """Raise CacheExhaustedError unless num_pages pages are free."""
        if num_pages > len(self._free):
            raise CacheExhaustedError(
                f"KV cache exhausted: need {num_pages} free pages but only {len(self._free)} of "
                f"{self.num_pages} are free; raise kv_cache_bytes or lower max_num_seqs")

    def _require_live(self, seq: PagedSequence) -> None:
        """Raise ValueError unless seq is allocated here."""
        if seq.seq_id not in self._live:
            raise ValueError(f"sequence {seq.seq_id} is not allocated")

    def _require_new(self, seq: PagedSequence) -> None:
        """Raise ValueError if seq already holds pages."""
        if seq.seq_id in self._live or seq.block_table:
            raise ValueError(f"sequence {seq.seq_id} is already allocated")


def _check(condition: bool, message: str) -> None:
    """Assert that survives python -O."""
    if not condition:
        raise AssertionError(message)
