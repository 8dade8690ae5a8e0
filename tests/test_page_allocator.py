"""Property test of PageAllocator against a plain model of page contents.

Random programs of new / fork / free / append / truncate / reorder / grow. The model keeps, per sequence, the list of
token values it should read back, and a store of what each page slot holds; `append`'s slots and copy-on-write copies
are applied to that store exactly as the cache applies them to its pools. Checked after every step: reference counts
equal page-table references, the free list holds exactly the unreferenced pages once each (no leak, no double free),
every sequence reads back its own tokens (so a shared page was never written in place), and a failed append changed
nothing.
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from flashcore_hf.cache.allocator import OutOfPagesError, PageAllocator


class AllocatorMachine(RuleBasedStateMachine):
    @initialize(page_size=st.integers(1, 5), num_pages=st.integers(0, 12))
    def start(self, page_size, num_pages):
        self.alloc = PageAllocator(num_pages, page_size)
        self.tokens: dict[int, list[int]] = {}      # model: what each sequence must read back
        self.store: dict[int, list] = {}            # model: contents of each page slot
        self.next_value = 0

    # ---- helpers ----------------------------------------------------------------------------------------------

    def snapshot(self):
        a = self.alloc
        return ([a.refcount(p) for p in range(a.num_pages)], sorted(a._free),
                {s: (list(a.page_table(s)), a.length(s)) for s in a.sequence_ids})

    def page_slots(self, page):
        return self.store.setdefault(page, [None] * self.alloc.page_size)

    # ---- rules ------------------------------------------------------------------------------------------------

    @rule()
    def new_sequence(self):
        self.tokens[self.alloc.new_sequence()] = []

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def fork(self, data):
        src = data.draw(st.sampled_from(sorted(self.tokens)))
        self.tokens[self.alloc.fork(src)] = list(self.tokens[src])

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def free(self, data):
        seq = data.draw(st.sampled_from(sorted(self.tokens)))
        self.alloc.free(seq)
        del self.tokens[seq]

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def truncate(self, data):
        seq = data.draw(st.sampled_from(sorted(self.tokens)))
        length = data.draw(st.integers(0, len(self.tokens[seq])))
        self.alloc.truncate(seq, length)
        del self.tokens[seq][length:]

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def reorder(self, data):
        """What PagedKVCache.reorder_cache does: fork the chosen rows, then free the old ones."""
        old = sorted(self.tokens)
        picks = data.draw(st.lists(st.sampled_from(old), min_size=1, max_size=len(old) + 2))
        new = {self.alloc.fork(s): list(self.tokens[s]) for s in picks}
        for s in old:
            self.alloc.free(s)
        self.tokens = new

    @rule(count=st.integers(0, 4))
    def add_pages(self, count):
        self.alloc.add_pages(count)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def append(self, data):
        ids = data.draw(st.lists(st.sampled_from(sorted(self.tokens)), min_size=1, unique=True))
        counts = data.draw(st.lists(st.integers(0, 2 * self.alloc.page_size + 1), min_size=len(ids),
                                    max_size=len(ids)))
        before = self.snapshot()
        needed = self.alloc.pages_needed(ids, counts)
        free_before = self.alloc.num_free
        try:
            result = self.alloc.append(ids, counts)
        except OutOfPagesError as err:
            assert needed > free_before
            assert err.needed == needed and err.available == free_before
            assert "page" in str(err)
            assert self.snapshot() == before, "a refused append changed the allocator"
            return
        assert needed <= free_before
        assert self.alloc.num_free == free_before - needed
        referenced_before = {p for pages, _ in before[2].values() for p in pages}
        for src, dst in result.copies:
            assert dst not in referenced_before, "copy-on-write destination was in use"
            self.store[dst] = list(self.page_slots(src))
        page_size = self.alloc.page_size
        for seq, count, slots in zip(ids, counts, result.slots):
            assert len(slots) == count
            start = len(self.tokens[seq])
            for i, slot in enumerate(slots):
                page, offset = divmod(slot, page_size)
                assert self.alloc.refcount(page) == 1, "a shared page was handed out for writing"
                assert self.alloc.page_table(seq)[(start + i) // page_size] == page
                assert offset == (start + i) % page_size
                self.page_slots(page)[offset] = self.next_value
                self.tokens[seq].append(self.next_value)
                self.next_value += 1

    # ---- invariants -------------------------------------------------------------------------------------------

    @invariant()
    def reference_counts_match_page_tables(self):
        a = self.alloc
        refs = [0] * a.num_pages
        for seq in a.sequence_ids:
            for page in a.page_table(seq):
                refs[page] += 1
        assert refs == [a.refcount(p) for p in range(a.num_pages)]
        free = list(a._free)
        assert len(free) == len(set(free)), "a page is on the free list twice"
        assert set(free) == {p for p in range(a.num_pages) if refs[p] == 0}, "leaked or wrongly freed page"
        assert a.num_used + a.num_free == a.num_pages
        assert a.num_shared == sum(1 for r in refs if r > 1)

    @invariant()
    def sequences_read_back_their_tokens(self):
        a = self.alloc
        assert sorted(a.sequence_ids) == sorted(self.tokens)
        for seq, toks in self.tokens.items():
            pages = a.page_table(seq)
            assert a.length(seq) == len(toks)
            assert len(pages) == -(-len(toks) // a.page_size)
            read = [self.store[pages[i // a.page_size]][i % a.page_size] for i in range(len(toks))]
            assert read == toks


TestAllocatorProperties = AllocatorMachine.TestCase
TestAllocatorProperties.settings = settings(max_examples=150, stateful_step_count=40, deadline=None,
                                            suppress_health_check=[HealthCheck.too_slow])


def test_copy_on_write_once_per_shared_page():
    """Two beams share a partly filled page: the first append copies it, the second then owns the original."""
    alloc = PageAllocator(8, page_size=4)
    a = alloc.new_sequence()
    alloc.append([a], [6])                      # pages [0, 1], page 1 holds 2 tokens
    b = alloc.fork(a)
    assert alloc.pages_needed([a, b], [1, 1]) == 1
    result = alloc.append([a, b], [1, 1])
    assert result.copies == [(1, 2)]
    assert alloc.page_table(a) == [0, 2] and alloc.page_table(b) == [0, 1]
    assert result.slots == [[2 * 4 + 2], [1 * 4 + 2]]
    assert alloc.refcount(0) == 2 and alloc.refcount(1) == 1 and alloc.refcount(2) == 1


def test_full_shared_page_is_not_copied():
    alloc = PageAllocator(4, page_size=2)
    a = alloc.new_sequence()
    alloc.append([a], [2])
    b = alloc.fork(a)
    result = alloc.append([a, b], [1, 1])
    assert result.copies == []
    assert alloc.page_table(a)[0] == alloc.page_table(b)[0] == 0


def test_out_of_pages_message_and_no_change():
    alloc = PageAllocator(2, page_size=4)
    a = alloc.new_sequence()
    with pytest.raises(OutOfPagesError, match=r"needs 3 free page\(s\).*only 2 of 2 pages are free") as info:
        alloc.append([a], [9])
    assert isinstance(info.value, RuntimeError)
    assert alloc.length(a) == 0 and alloc.num_free == 2
    alloc.add_pages(1)
    alloc.append([a], [9])
    assert alloc.num_free == 0


def test_bad_arguments():
    alloc = PageAllocator(4, page_size=2)
    a = alloc.new_sequence()
    with pytest.raises(ValueError, match="more than once"):
        alloc.append([a, a], [1, 1])
    with pytest.raises(ValueError, match=">= 0"):
        alloc.append([a], [-1])
    with pytest.raises(ValueError, match="truncate"):
        alloc.truncate(a, 1)
    with pytest.raises(KeyError, match="no sequence"):
        alloc.free(a + 1)
    with pytest.raises(ValueError, match="page_size"):
        PageAllocator(1, page_size=0)
