"""Property test of PagedKVCache against transformers' DynamicCache: random programs of what generate() and its
strategies do to a cache, driven through the Twin of test_paged_cache.py (every step checks, per layer, that each
row reads exactly DynamicCache's unpadded K/V through its page list, that paged_attention over them matches the
float64 reference, and that the HF bookkeeping agrees).

Operations: a left-padded prompt, then steps of 1..5 tokens (decode, chunked prefill, speculative verification),
beam reorders (rows copied or dropped: shared pages and copy-on-write), crops (assisted decoding's rollback),
batch_select_indices and batch_repeat_interleave, in any order, at page sizes 1, 3 and 4, with each of the three
ways the attention mask reaches the cache.
"""
from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from tests.test_paged_cache import Twin, left_padded, ones

MAX_ROWS = 6


class PagedCacheMachine(RuleBasedStateMachine):
    @initialize(page_size=st.sampled_from([1, 3, 4]), mask_via=st.sampled_from(["argument", "new_columns", "resolve"]),
                lengths=st.lists(st.integers(1, 9), min_size=1, max_size=4))
    def prompt(self, page_size, mask_via, lengths):
        self.twin = Twin(page_size, batch_size=len(lengths), mask_via=mask_via)
        self.twin.step(left_padded(lengths, max(lengths)))

    def length(self) -> int:
        return self.twin.mask.shape[1]

    @rule(tokens=st.integers(1, 5))
    def step(self, tokens):
        self.twin.step(ones(self.twin.batch_size, tokens))

    @rule(data=st.data())
    def reorder_beams(self, data):
        rows = self.twin.batch_size
        self.twin.reorder(data.draw(st.lists(st.integers(0, rows - 1), min_size=rows, max_size=rows)))

    @precondition(lambda self: self.length() > 1)
    @rule(data=st.data())
    def crop(self, data):
        # Never below the longest left padding: a row whose real tokens were all cropped has nothing to attend to
        # and nothing a generate() strategy would crop to.
        padding = int((self.twin.mask == 0).sum(dim=1).max())
        if self.length() - padding > 1:
            self.twin.crop(data.draw(st.integers(1, self.length() - padding - 1)))

    @rule(data=st.data())
    def select_rows(self, data):
        rows = self.twin.batch_size
        self.twin.select(data.draw(st.lists(st.integers(0, rows - 1), min_size=1, max_size=rows, unique=True)))

    @precondition(lambda self: self.twin.batch_size * 2 <= MAX_ROWS)
    @rule()
    def repeat_rows(self):
        self.twin.repeat(2)

    @invariant()
    def sequence_lengths_follow_the_mask(self):
        assert self.twin.paged.sequence_lengths() == self.twin.mask.sum(dim=1).tolist()


def test_paged_cache_state_machine():
    test = PagedCacheMachine.TestCase
    test.settings = settings(max_examples=60, stateful_step_count=12, deadline=None,
                             suppress_health_check=list(HealthCheck))
    test().runTest()
