"""Tests for the paged KV-cache block manager: unit cases plus a stateful property test."""
from __future__ import annotations

import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import itertools

import lmarith.kv_cache.block_manager as block_manager
from lmarith.core.sequence import Sequence
from lmarith.errors import CacheExhaustedError
from lmarith.kv_cache import BlockManager

_ids = itertools.count()


def paged_seq(model: str, page_size: int, tokens: list[int] = ()) -> Sequence:
    """An engine Sequence of one model with a fresh id (what the block manager works on)."""
    return Sequence(next(_ids), model, page_size, list(tokens))


def snapshot(manager: BlockManager, seqs: list[Sequence] = ()) -> tuple:
    """Everything observable about the manager and some sequences, to prove nothing changed."""
    pages = tuple((p.ref_count, p.hash, p.token_ids, p.model) for p in manager.pages)
    seq_state = tuple((tuple(s.block_table), tuple(s.token_ids), s.num_cached_tokens,
                       s.num_hashed_pages) for s in seqs)
    return pages, tuple(manager.free_order()), tuple(sorted(manager.cache.entries())), seq_state


def new_seq(manager: BlockManager, tokens: list[int], model: str = "m", page_size: int = 4,
            commit: bool = True) -> Sequence:
    """Allocate a sequence and, by default, commit its whole prompt as if prefill had run."""
    seq = paged_seq(model, page_size, list(tokens))
    manager.allocate(seq)
    if commit:
        manager.commit(seq, len(tokens))
    return seq


def append(manager: BlockManager, seq: Sequence, tokens: list[int]) -> list[tuple[int, int]]:
    """Reserve room for tokens and add them, returning the copy-on-write copies."""
    copies = manager.ensure_capacity(seq, len(tokens))
    seq.token_ids.extend(tokens)
    return copies


def test_prefix_pages_shared_within_a_model() -> None:
    manager = BlockManager(16)
    first = new_seq(manager, list(range(10)))
    second = paged_seq("m", 4, list(range(8)) + [99, 98, 97])
    assert manager.allocate(second) == 8
    assert second.block_table[:2] == first.block_table[:2]
    assert second.block_table[2] != first.block_table[2]
    assert [manager.pages[p].ref_count for p in first.block_table] == [2, 2, 1]
    assert manager.num_free_pages == 16 - 4
    manager.check_invariants()


def test_cached_tokens_leave_at_least_one_token_to_compute() -> None:
    manager = BlockManager(16)
    new_seq(manager, list(range(12)))
    same = paged_seq("m", 4, list(range(8)))
    assert manager.allocate(same) == 4
    longer = paged_seq("m", 4, list(range(9)))
    assert manager.allocate(longer) == 8
    manager.check_invariants()


def test_no_sharing_across_models() -> None:
    manager = BlockManager(16)
    first = new_seq(manager, list(range(9)), model="a")
    other = paged_seq("b", 4, list(range(9)))
    assert manager.allocate(other) == 0
    assert not set(first.block_table) & set(other.block_table)
    manager.check_invariants()


def test_page_sizes_differ_per_model() -> None:
    manager = BlockManager(8)
    small = new_seq(manager, list(range(16)), model="a", page_size=4)
    large = new_seq(manager, list(range(16)), model="b", page_size=8)
    assert (len(small.block_table), len(large.block_table)) == (4, 2)
    assert manager.num_free_pages == 2
    assert manager.pages_for(small, 17) == 1
    assert manager.pages_for(large, 17) == 1
    assert manager.pages_for(large, 16) == 0
    manager.check_invariants()


def test_admission_is_all_or_nothing() -> None:
    manager = BlockManager(4)
    needs_two = paged_seq("a", 4, list(range(8)))
    needs_three = paged_seq("b", 2, list(range(5)))
    before = snapshot(manager, [needs_two, needs_three])
    assert not manager.can_allocate([needs_two, needs_three])
    assert manager.can_allocate([needs_two, paged_seq("b", 2, [1, 2, 3])])
    assert not manager.can_allocate([needs_two], extra_tokens=9)
    assert snapshot(manager, [needs_two, needs_three]) == before


def test_admission_counts_shared_cached_pages_once() -> None:
    manager = BlockManager(5)
    manager.free(new_seq(manager, list(range(9))))
    batch = [paged_seq("m", 4, list(range(8)) + [tail]) for tail in (50, 51)]
    assert manager.can_allocate(batch)
    assert [manager.allocate(seq) for seq in batch] == [8, 8]
    assert manager.num_free_pages == 1
    manager.check_invariants()


def test_admission_sees_cached_pages_evicted_by_earlier_seqs() -> None:
    manager = BlockManager(4)
    cached = new_seq(manager, [1, 2], page_size=2)
    filler = new_seq(manager, [5, 5, 5], page_size=2, commit=False)
    new_seq(manager, [8], page_size=2, commit=False)
    manager.free(cached)
    manager.free(filler)
    assert manager.free_order() == [0, 2, 1]
    first = paged_seq("m", 2, [9])
    second = paged_seq("m", 2, [1, 2, 3, 4, 5])
    assert manager.can_allocate([second])
    assert not manager.can_allocate([first, second])
    manager.allocate(first)
    with pytest.raises(CacheExhaustedError):
        manager.allocate(second)


def test_exhaustion_raises_and_leaves_state_intact() -> None:
    manager = BlockManager(4)
    seq = new_seq(manager, list(range(6)))
    big = paged_seq("m", 4, list(range(100, 120)))
    before = snapshot(manager, [seq, big])
    message = "need 5 free pages but only 2 of 4.*kv_cache_bytes.*max_num_seqs"
    with pytest.raises(CacheExhaustedError, match=message):
        manager.allocate(big)
    with pytest.raises(CacheExhaustedError):
        manager.ensure_capacity(seq, 11)
    assert snapshot(manager, [seq, big]) == before
    assert not manager.is_live(big)
    manager.check_invariants()


def test_speculative_pages_are_never_hashed() -> None:
    manager = BlockManager(8)
    seq = new_seq(manager, list(range(6)))
    assert seq.num_hashed_pages == 1
    append(manager, seq, [6, 7, 8])
    manager.commit(seq, 6)
    assert seq.num_hashed_pages == 1
    assert manager.pages[seq.block_table[1]].hash is None
    manager.truncate(seq, 7)
    assert len(seq.block_table) == 2 and seq.token_ids == list(range(7))
    append(manager, seq, [7])
    manager.commit(seq, 8)
    assert manager.pages[seq.block_table[1]].token_ids == (4, 5, 6, 7)
    manager.check_invariants()


def test_truncating_into_committed_page_unhashes_it() -> None:
    manager = BlockManager(8)
    seq = new_seq(manager, list(range(9)))
    page = manager.pages[seq.block_table[1]]
    manager.truncate(seq, 6)
    assert page.hash is None and seq.num_hashed_pages == 1
    assert len(manager.cache) == 1
    probe = paged_seq("m", 4, list(range(9)))
    assert manager.allocate(probe) == 4
    manager.check_invariants()


def test_truncating_into_shared_committed_page_keeps_hash_and_copies_on_write() -> None:
    manager = BlockManager(8)
    parent = new_seq(manager, list(range(9)))
    child = manager.fork(parent, next(_ids))
    manager.truncate(child, 6)
    shared = parent.block_table[1]
    assert manager.pages[shared].hash is not None
    copies = append(manager, child, [60])
    assert copies == [(shared, child.block_table[1])]
    assert manager.pages[shared].ref_count == 1
    manager.check_invariants()


def test_write_into_page_left_hashed_by_shared_truncate_unhashes_it() -> None:
    manager = BlockManager(8)
    parent = new_seq(manager, list(range(9)))
    child = manager.fork(parent, next(_ids))
    manager.truncate(child, 6)
    manager.free(parent)
    page = manager.pages[child.block_table[1]]
    assert page.hash is not None and page.ref_count == 1
    assert append(manager, child, [60]) == []
    assert page.hash is None
    probe = paged_seq("m", 4, list(range(9)))
    assert manager.allocate(probe) == 4
    manager.check_invariants()


def test_fork_copies_partial_last_page_on_write() -> None:
    manager = BlockManager(8)
    parent = new_seq(manager, list(range(6)))
    child = manager.fork(parent, next(_ids))
    assert child.block_table == parent.block_table
    assert all(manager.pages[p].ref_count == 2 for p in parent.block_table)
    copies = append(manager, child, [100])
    assert copies == [(parent.block_table[1], child.block_table[1])]
    assert child.block_table[0] == parent.block_table[0]
    assert append(manager, parent, [200]) == []
    manager.check_invariants()


def test_fork_of_full_pages_needs_no_copy() -> None:
    manager = BlockManager(8)
    parent = new_seq(manager, list(range(8)))
    child = manager.fork(parent, next(_ids))
    assert append(manager, child, [100]) == []
    assert child.block_table[:2] == parent.block_table
    manager.check_invariants()


def test_free_in_reverse_reuses_tail_first() -> None:
    manager = BlockManager(4)
    seq = new_seq(manager, list(range(6)), page_size=2)
    assert seq.block_table == [0, 1, 2]
    manager.free(seq)
    assert manager.free_order() == [3, 2, 1, 0]
    new_seq(manager, [50, 51], page_size=2)
    new_seq(manager, [60, 61], page_size=2)
    probe = paged_seq("m", 2, [0, 1, 2])
    assert manager.allocate(probe) == 2
    assert probe.block_table[0] == 0
    manager.check_invariants()


def test_preempted_sequence_reallocates_from_cache() -> None:
    manager = BlockManager(8)
    seq = new_seq(manager, list(range(10)))
    manager.preempt(seq)
    assert seq.block_table == [] and seq.num_cached_tokens == 0 and seq.token_ids == list(range(10))
    assert manager.num_free_pages == 8
    assert manager.allocate(seq) == 8
    manager.check_invariants()


def test_hash_collision_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(block_manager, "page_hash", lambda *args: 7)
    manager = BlockManager(8)
    new_seq(manager, [1, 2, 3, 4, 5])
    other = paged_seq("m", 4, [9, 9, 9, 9, 5])
    assert manager.allocate(other) == 0


def test_hash_collision_across_models_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(block_manager, "page_hash", lambda *args: 7)
    manager = BlockManager(8)
    new_seq(manager, [1, 2, 3, 4, 5], model="a")
    other = paged_seq("b", 4, [1, 2, 3, 4, 5])
    assert manager.allocate(other) == 0


def test_misuse_raises_value_error() -> None:
    manager = BlockManager(8)
    seq = new_seq(manager, [1, 2, 3])
    with pytest.raises(ValueError):
        manager.allocate(seq)
    with pytest.raises(ValueError):
        manager.truncate(seq, 4)
    manager.free(seq)
    with pytest.raises(ValueError):
        manager.free(seq)
    with pytest.raises(ValueError):
        manager.ensure_capacity(seq, 1)
    with pytest.raises(ValueError):
        paged_seq("m", 0)


MODELS = {"a": 2, "b": 3}
POOL_PAGES = 16
PREFIXES = ([0, 1, 0, 1, 0, 1, 0, 1], [1, 1, 0, 0, 1, 1, 0, 0])
tokens_strategy = st.builds(lambda prefix, cut, tail: PREFIXES[prefix][:cut] + tail,
                            st.integers(0, 1), st.integers(0, 8),
                            st.lists(st.integers(0, 3), max_size=4)).filter(bool)


class BlockManagerMachine(RuleBasedStateMachine):
    """Random traffic over two models with different page sizes, checked against a shadow KV store.

    Each written slot stores (model, all tokens up to that position): what real KV depends
    on. Every live sequence must read back its own history from its pages, which catches
    wrong prefix hits, missing copy-on-write and pages reused while still referenced.
    """

    def __init__(self) -> None:
        super().__init__()
        self.manager = BlockManager(POOL_PAGES)
        self.live: list[Sequence] = []
        self.waiting: list[Sequence] = []
        self.verified: dict[int, int] = {}
        self.kv: dict[int, dict[int, tuple[str, tuple[int, ...]]]] = {}

    def write(self, seq: Sequence, start: int) -> None:
        """Store the shadow KV of positions start.. of seq into its pages."""
        for pos in range(start, len(seq.token_ids)):
            slots = self.kv.setdefault(seq.block_table[pos // seq.page_size], {})
            slots[pos % seq.page_size] = (seq.model, tuple(seq.token_ids[:pos + 1]))

    def try_allocate(self, seq: Sequence, extra: int) -> bool:
        """Allocate seq, checking a failure changes nothing; on success run its prefill."""
        before = snapshot(self.manager, self.live)
        try:
            cached = self.manager.allocate(seq, extra)
        except CacheExhaustedError:
            assert snapshot(self.manager, self.live) == before
            return False
        assert cached % seq.page_size == 0 and cached <= max(0, len(seq.token_ids) - 1)
        self.write(seq, cached)
        self.live.append(seq)
        self.verified[seq.seq_id] = cached
        return True

    @rule(batch=st.lists(st.tuples(st.sampled_from(sorted(MODELS)), tokens_strategy),
                         min_size=1, max_size=3),
          extra=st.integers(0, 2), prefill=st.booleans())
    def admit(self, batch: list[tuple[str, list[int]]], extra: int, prefill: bool) -> None:
        seqs = [paged_seq(key, MODELS[key], tokens) for key, tokens in batch]
        expected = self.manager.can_allocate(seqs, extra)
        admitted = []
        for seq in seqs:
            if not self.try_allocate(seq, extra):
                break
            admitted.append(seq)
        assert expected == (len(admitted) == len(seqs))
        for seq in admitted:
            if not expected:
                self.drop(seq)
            elif prefill:
                self.manager.commit(seq, len(seq.token_ids))
                self.verified[seq.seq_id] = len(seq.token_ids)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), tokens=st.lists(st.integers(0, 3), min_size=1, max_size=4),
          reserve=st.integers(0, 2))
    def append_tokens(self, data: st.DataObject, tokens: list[int], reserve: int) -> None:
        seq = data.draw(st.sampled_from(self.live))
        before = snapshot(self.manager, self.live)
        try:
            copies = self.manager.ensure_capacity(seq, len(tokens) + reserve)
        except CacheExhaustedError:
            assert snapshot(self.manager, self.live) == before
            return
        for src, dst in copies:
            assert src != dst and self.manager.pages[dst].ref_count == 1
            self.kv[dst] = dict(self.kv.get(src, {}))
        start = len(seq.token_ids)
        seq.token_ids.extend(tokens)
        self.write(seq, start)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), fraction=st.floats(0, 1))
    def commit(self, data: st.DataObject, fraction: float) -> None:
        seq = data.draw(st.sampled_from(self.live))
        low = self.verified[seq.seq_id]
        num = low + round(fraction * (len(seq.token_ids) - low))
        self.manager.commit(seq, num)
        self.verified[seq.seq_id] = num

    @precondition(lambda self: self.live)
    @rule(data=st.data(), fraction=st.floats(0, 1))
    def truncate(self, data: st.DataObject, fraction: float) -> None:
        seq = data.draw(st.sampled_from(self.live))
        num = round(fraction * len(seq.token_ids))
        self.manager.truncate(seq, num)
        self.verified[seq.seq_id] = min(self.verified[seq.seq_id], num)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def fork(self, data: st.DataObject) -> None:
        parent = data.draw(st.sampled_from(self.live))
        child = self.manager.fork(parent, next(_ids))
        self.live.append(child)
        self.verified[child.seq_id] = self.verified[parent.seq_id]

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        self.drop(data.draw(st.sampled_from(self.live)))

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def preempt(self, data: st.DataObject) -> None:
        seq = data.draw(st.sampled_from(self.live))
        self.live.remove(seq)
        self.manager.preempt(seq)
        self.waiting.append(seq)

    @precondition(lambda self: self.waiting)
    @rule(data=st.data())
    def resume(self, data: st.DataObject) -> None:
        seq = data.draw(st.sampled_from(self.waiting))
        expected = self.manager.can_allocate([seq])
        assert expected == self.try_allocate(seq, 0)
        if expected:
            self.waiting.remove(seq)

    def drop(self, seq: Sequence) -> None:
        """Free a live sequence and forget it."""
        self.manager.free(seq)
        self.live.remove(seq)

    @invariant()
    def consistent(self) -> None:
        self.manager.check_invariants()
        for seq in self.live:
            assert seq.num_hashed_pages * seq.page_size <= self.verified[seq.seq_id]
            for pos in range(len(seq.token_ids)):
                slot = self.kv[seq.block_table[pos // seq.page_size]].get(pos % seq.page_size)
                assert slot == (seq.model, tuple(seq.token_ids[:pos + 1]))
        for _, page_id in self.manager.cache.entries():
            self.check_cached_page(self.manager.pages[page_id])

    def check_cached_page(self, page) -> None:
        """A page findable in the prefix cache must hold exactly the KV of its recorded page."""
        size = len(page.token_ids)
        key, history = self.kv[page.page_id][size - 1]
        assert key == page.model and len(history) % size == 0
        assert history[-size:] == page.token_ids
        for offset in range(size):
            start = len(history) - size
            assert self.kv[page.page_id][offset] == (key, history[:start + offset + 1])

    def teardown(self) -> None:
        for seq in list(self.live):
            self.drop(seq)
        self.manager.check_invariants()
        assert self.manager.num_free_pages == POOL_PAGES
        assert all(page.ref_count == 0 for page in self.manager.pages)


BlockManagerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40,
                                                 deadline=None)
TestBlockManagerMachine = BlockManagerMachine.TestCase
