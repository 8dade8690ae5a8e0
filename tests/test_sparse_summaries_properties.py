"""Property test of the sparse page summaries a PagedKVCache keeps (topk with scoring "bounds" or "signs"), against
a plain model of each row's keys.

Random programs of prefill, decode steps, multi-token steps, crop, beam reordering (rows duplicated and dropped:
pages shared, then copied on write), repeat-interleave, row selection and reset. Checked after every step, for every
page of every row of both (sparse) layers: the pool reads back the row's keys, the page's bounds contain its valid
keys (exactly their max / min, except for a page that a crop cut while other rows shared it and no multi-token step
has rewritten since: its bounds may stay wider, also in the copies beams make of it; a crop recomputes the pages it
cuts that only one row holds) and, with "signs", the sign bits of every valid key are exact.
"""
from __future__ import annotations

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from transformers import LlamaConfig

from flashcore_hf.cache import PagedKVCache
from flashcore_hf.sparse import SparseConfig
from tests.sparse_reference import unpack_signs
LAYERS, HKV, D = 2, 2, 12


class SparseSummariesMachine(RuleBasedStateMachine):
    @initialize(page_size=st.integers(1, 5), scoring=st.sampled_from(["bounds", "signs"]),
                batch=st.integers(1, 3), length=st.integers(1, 12), seed=st.integers(0, 2**31 - 1))
    def start(self, page_size, scoring, batch, length, seed):
        config = LlamaConfig(num_hidden_layers=LAYERS, hidden_size=32, num_attention_heads=4,
                             num_key_value_heads=HKV, head_dim=D)
        sparse = SparseConfig(policy="topk", token_budget=3 * page_size, sink_tokens=0, recent_tokens=1,
                              dense_layers=0, scoring=scoring)
        self.cache = PagedKVCache(config, page_size=page_size, sparse=sparse)
        self.generator = torch.Generator().manual_seed(seed)
        self.rows: list[list[torch.Tensor]] = []   # model: per row, per layer, the keys [n, Hkv, D] it holds
        self.loose: set[tuple[int, int]] = set()   # (row, page index) whose bounds a crop may have left wider
        self.prefill(batch, length)

    # ---- helpers ----------------------------------------------------------------------------------------------

    def append(self, n):
        batch = len(self.rows)
        if n > 1:   # the step's pages are recomputed from their valid tokens, the partly filled last one included
            first = self.length() // self.cache.page_size
            self.loose = {(b, j) for b, j in self.loose if j < first}
        for layer in range(LAYERS):
            k = torch.randn(batch, HKV, n, D, generator=self.generator)
            self.cache.update(k, k + 1, layer)[0].resolve()
            for b in range(batch):
                self.rows[b][layer] = torch.cat([self.rows[b][layer], k[b].transpose(0, 1)])

    def prefill(self, batch, length):
        self.cache.reset()
        self.loose = set()
        self.rows = [[torch.empty(0, HKV, D) for _ in range(LAYERS)] for _ in range(batch)]
        self.append(length)

    def length(self):
        return self.rows[0][0].shape[0]

    def take_rows(self, sources):
        """Row i becomes old row sources[i] (keys and loose pages)."""
        self.rows = [list(self.rows[i]) for i in sources]
        self.loose = {(b, j) for b, i in enumerate(sources) for old, j in self.loose if old == i}

    # ---- rules ------------------------------------------------------------------------------------------------

    @rule()
    def decode(self):
        self.append(1)

    @rule(n=st.integers(2, 6))
    def multi_token_step(self, n):
        self.append(n)

    @precondition(lambda self: self.length() > 1)
    @rule(data=st.data())
    def crop(self, data):
        remove = data.draw(st.integers(1, self.length() - 1))
        keep = self.length() - remove
        page_size = self.cache.page_size
        self.loose = {(b, j) for b, j in self.loose if j * page_size < keep}
        self.cache.crop(-remove)
        self.rows = [[keys[:keep] for keys in row] for row in self.rows]
        if keep % page_size:   # each row's last kept page lost tokens: recomputed, unless other rows share it
            j = keep // page_size
            for b in range(len(self.rows)):
                if self.cache.allocator.refcount(self.cache.page_table(b)[j]) > 1:
                    self.loose.add((b, j))
                else:
                    self.loose.discard((b, j))

    @rule(data=st.data())
    def reorder(self, data):
        batch = len(self.rows)
        beams = data.draw(st.lists(st.integers(0, batch - 1), min_size=batch, max_size=batch))
        self.cache.reorder_cache(torch.tensor(beams))
        self.take_rows(beams)

    @precondition(lambda self: len(self.rows) <= 2)
    @rule()
    def repeat_interleave(self):
        self.cache.batch_repeat_interleave(2)
        self.take_rows([b for b in range(len(self.rows)) for _ in range(2)])

    @precondition(lambda self: len(self.rows) > 1)
    @rule(data=st.data())
    def select_rows(self, data):
        keep = data.draw(st.lists(st.integers(0, len(self.rows) - 1), min_size=1, max_size=len(self.rows),
                                  unique=True))
        self.cache.batch_select_indices(torch.tensor(keep))
        self.take_rows(keep)

    @rule(batch=st.integers(1, 3), length=st.integers(1, 12))
    def new_batch(self, batch, length):
        self.prefill(batch, length)

    # ---- invariants -------------------------------------------------------------------------------------------

    @invariant()
    def pages_hold_the_keys_and_their_summaries(self):
        cache, page_size = self.cache, self.cache.page_size
        assert cache.sequence_lengths() == [row[0].shape[0] for row in self.rows]
        for layer in range(LAYERS):
            summaries = cache._sparse.summaries[layer]
            pool = cache.layers[layer].k_pool
            for b, row in enumerate(self.rows):
                keys = row[layer]
                for j, page in enumerate(cache.page_table(b)):
                    valid = keys[j * page_size:(j + 1) * page_size]                     # [count, Hkv, D]
                    assert torch.equal(pool[page, :valid.shape[0]], valid)
                    high, low = summaries.bounds[page, :, :D], summaries.bounds[page, :, D:]
                    if (b, j) in self.loose:
                        assert torch.all(high >= valid.amax(0)) and torch.all(low <= valid.amin(0))
                    else:
                        assert torch.equal(high, valid.amax(0)) and torch.equal(low, valid.amin(0))
                    if summaries.signs is not None:
                        bits = unpack_signs(summaries.signs[page, :, :valid.shape[0]], D)
                        assert torch.equal(bits, (valid > 0).transpose(0, 1))


TestSparseSummariesProperties = SparseSummariesMachine.TestCase
TestSparseSummariesProperties.settings = settings(max_examples=100, stateful_step_count=30, deadline=None,
                                                  suppress_health_check=[HealthCheck.too_slow])
