"""Host-side page manager: free list, reference counts and one page table per sequence.

A page holds `page_size` consecutive token positions of one sequence (in every layer: the page ids index each
layer's K/V pool). A sequence's tokens fill its pages in order from slot 0, so token i of a sequence lives at slot
`i % page_size` of page `page_table[i // page_size]`, and only the last page can be partly filled.

Pages are shared by reference count: `fork` makes a sequence that reads the same pages (beam search, parallel
samples). A shared page is never written in place: appending to a sequence whose partly filled last page is shared
first moves that sequence onto a fresh copy of the page (copy-on-write); `append` reports those copies so that the
caller copies the page in every layer's pool before writing. Nothing here touches tensors: the allocator is plain
Python and runs once per forward step.
"""
from __future__ import annotations

from dataclasses import dataclass


class OutOfPagesError(RuntimeError):
    """Raised when an allocation needs more free pages than exist; nothing was allocated or written.

    needed: pages the request needs; available: pages free (or still obtainable by growth) when it was refused.
    """

    def __init__(self, message: str, needed: int, available: int):
        super().__init__(message)
        self.needed = needed
        self.available = available


@dataclass(frozen=True)
class AppendResult:
    """What `PageAllocator.append` did.

    slots: for each sequence of the request, in request order, the slot (`page * page_size + offset`) of each new
        token, in token order.
    copies: (source_page, destination_page) pairs, in order: copy-on-write moves. The caller copies each source
        page's contents to its destination page in every layer's pool BEFORE writing any of the new tokens.
    """

    slots: list[list[int]]
    copies: list[tuple[int, int]]


class _Sequence:
    __slots__ = ("pages", "length")

    def __init__(self, pages: list[int], length: int):
        self.pages = pages
        self.length = length


class PageAllocator:
    """Free list + reference counts + per-sequence page tables, for `num_pages` pages of `page_size` tokens.

    Sequences are named by integer ids from `new_sequence` / `fork`. Invariants (checked by the property tests):
    every page is either free (reference count 0, on the free list once) or referenced by exactly `refcount` page
    table entries; a sequence of n tokens has ceil(n / page_size) pages; a page whose count is > 1 is never returned
    as a write slot.
    """

    def __init__(self, num_pages: int, page_size: int):
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        if num_pages < 0:
            raise ValueError(f"num_pages must be >= 0, got {num_pages}")
        self.page_size = int(page_size)
        self._refcount: list[int] = [0] * num_pages
        # A stack popped from the end; reversed so that a fresh allocator hands out pages 0, 1, 2, ...
        self._free: list[int] = list(range(num_pages - 1, -1, -1))
        self._sequences: dict[int, _Sequence] = {}
        self._next_id = 0

    # ---- capacity ---------------------------------------------------------------------------------------------

    @property
    def num_pages(self) -> int:
        """Pages managed (free + used)."""
        return len(self._refcount)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self._free)

    @property
    def num_shared(self) -> int:
        """Pages referenced by more than one page-table entry."""
        return sum(1 for c in self._refcount if c > 1)

    def add_pages(self, count: int) -> None:
        """Grow the pool by `count` pages (ids num_pages .. num_pages + count - 1), all free."""
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        start = self.num_pages
        self._refcount.extend([0] * count)
        self._free[:0] = range(start + count - 1, start - 1, -1)  # after the existing free pages in pop order

    def refcount(self, page: int) -> int:
        return self._refcount[page]

    # ---- sequences --------------------------------------------------------------------------------------------

    def new_sequence(self) -> int:
        """An empty sequence; returns its id."""
        seq_id = self._next_id
        self._next_id += 1
        self._sequences[seq_id] = _Sequence([], 0)
        return seq_id

    def fork(self, seq_id: int) -> int:
        """A new sequence with the same tokens as `seq_id`, sharing its pages (no copy); returns its id."""
        src = self._seq(seq_id)
        for page in src.pages:
            self._refcount[page] += 1
        new_id = self._next_id
        self._next_id += 1
        self._sequences[new_id] = _Sequence(list(src.pages), src.length)
        return new_id

    def free(self, seq_id: int) -> None:
        """Drop a sequence; pages nobody else references go back to the free list."""
        seq = self._seq(seq_id)
        self._release(seq.pages)
        del self._sequences[seq_id]

    def truncate(self, seq_id: int, length: int) -> None:
        """Keep the first `length` tokens of a sequence (length <= its current length); frees pages past them."""
        seq = self._seq(seq_id)
        if not 0 <= length <= seq.length:
            raise ValueError(f"cannot truncate sequence {seq_id} of {seq.length} tokens to {length} tokens")
        keep = -(-length // self.page_size)
        self._release(seq.pages[keep:])
        del seq.pages[keep:]
        seq.length = length

    def length(self, seq_id: int) -> int:
        """Tokens stored for a sequence."""
        return self._seq(seq_id).length

    def page_table(self, seq_id: int) -> list[int]:
        """The sequence's pages in token order (the live list: do not modify)."""
        return self._seq(seq_id).pages

    @property
    def sequence_ids(self) -> list[int]:
        return list(self._sequences)

    # ---- allocation -------------------------------------------------------------------------------------------

    def pages_needed(self, seq_ids: list[int], counts: list[int]) -> int:
        """Free pages that `append(seq_ids, counts)` would take (new pages and copy-on-write copies)."""
        return self._count_pages(seq_ids, counts)

    def append(self, seq_ids: list[int], counts: list[int]) -> AppendResult:
        """Reserve slots for `counts[i]` new tokens at the end of sequence `seq_ids[i]`, for every i.

        All or nothing: when the free pages do not suffice, raises OutOfPagesError and changes nothing.
        """
        needed = self._count_pages(seq_ids, counts)
        if needed > len(self._free):
            raise OutOfPagesError(
                f"out of KV-cache pages: appending {sum(counts)} token(s) needs {needed} free page(s) of "
                f"{self.page_size} tokens, but only {len(self._free)} of {self.num_pages} pages are free",
                needed=needed, available=len(self._free))
        page_size = self.page_size
        slots: list[list[int]] = []
        copies: list[tuple[int, int]] = []
        for seq_id, count in zip(seq_ids, counts):
            seq = self._sequences[seq_id]
            pages, n = seq.pages, seq.length
            if count and n % page_size and self._refcount[pages[-1]] > 1:
                shared = pages[-1]
                private = self._free.pop()
                self._refcount[private] = 1
                self._refcount[shared] -= 1
                pages[-1] = private
                copies.append((shared, private))
            end = n + count
            while len(pages) * page_size < end:
                page = self._free.pop()
                self._refcount[page] = 1
                pages.append(page)
            slots.append([pages[i // page_size] * page_size + i % page_size for i in range(n, end)])
            seq.length = end
        return AppendResult(slots, copies)

    # ---- internals --------------------------------------------------------------------------------------------

    def _seq(self, seq_id: int) -> _Sequence:
        try:
            return self._sequences[seq_id]
        except KeyError:
            raise KeyError(f"no sequence with id {seq_id}") from None

    def _release(self, pages: list[int]) -> None:
        for page in pages:
            count = self._refcount[page]
            if count <= 0:
                raise AssertionError(f"page {page} released while free (reference count {count})")
            self._refcount[page] = count - 1
            if count == 1:
                self._free.append(page)

    def _count_pages(self, seq_ids: list[int], counts: list[int]) -> int:
        if len(seq_ids) != len(counts):
            raise ValueError(f"{len(seq_ids)} sequence ids but {len(counts)} counts")
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError("a sequence appears more than once in one append")
        page_size = self.page_size
        needed = 0
        # Copy-on-write drops a reference from the shared page, so a later sequence of the same request may find
        # that page private again; follow the same order as `append`.
        released: dict[int, int] = {}
        for seq_id, count in zip(seq_ids, counts):
            if count < 0:
                raise ValueError(f"token counts must be >= 0, got {count}")
            seq = self._seq(seq_id)
            if count == 0:
                continue
            n = seq.length
            if n % page_size:
                last = seq.pages[-1]
                if self._refcount[last] - released.get(last, 0) > 1:
                    released[last] = released.get(last, 0) + 1
                    needed += 1
            needed += -(-(n + count) // page_size) - len(seq.pages)
        return needed
