"""Property test of PrefixCache (flashcore_hf/cache/prefix.py) against a model of what each prompt's pages hold.

Random programs of store / lookup / clear / model changes over prompts drawn from a 3-token alphabet in 2-token
pages (so prompts share prefixes, diverge mid-way and overwrite each other's pages). A prompt's K/V is modelled as
one value per token that depends on the token and everything before it (as real K/V does through the layers), so a
page read back for the wrong prefix shows as a wrong value. Checked after every step:
- exactness: every page a lookup returns holds exactly the values of that prompt's own prefix (never a page of
  another prefix, of an overwritten entry, of a cleared cache or of another model);
- a prompt just stored is found whole (up to the capacity), and stays whole while the pages stored after it fit
  beside it (least recently used pages go first);
- bookkeeping: at most max_pages entries, each in its own storage slot, free slots and used slots partition the
  storage, and the stats count what happened.
It runs twice: with the real 128-bit page keys, and with keys cut to four values so that different prefixes
collide all the time (a hit must be exact whatever the hash does; there only exactness and bookkeeping are checked, since a
collision may legitimately cost a hit).
"""
from __future__ import annotations

import hashlib

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from flashcore_hf.cache import prefix as prefix_module
from flashcore_hf.cache.prefix import PrefixCache

PAGE = 2
prompts = st.lists(st.integers(0, 2), min_size=0, max_size=11)


def value_of(prefix: tuple[int, ...]) -> float:
    """The modelled K (and, negated, V) of the last token of `prefix`, which depends on all of it."""
    digest = hashlib.blake2b(repr(prefix).encode(), digest_size=4).digest()
    return float(int.from_bytes(digest, "little"))


def full_pages(prompt: list[int]) -> int:
    return len(prompt) // PAGE


def pools_holding(prompt: list[int], generator: torch.Generator) -> tuple[list[int], list]:
    """A one-layer pool pair [pages, PAGE, 1, 1] in which the prompt's full pages sit at scattered page ids."""
    n = full_pages(prompt)
    total = n + 3
    pages = torch.randperm(total, generator=generator)[:n].tolist()
    k = torch.full((total, PAGE, 1, 1), float("nan"), dtype=torch.float64)
    for i, page in enumerate(pages):
        for j in range(PAGE):
            k[page, j] = value_of(tuple(prompt[:i * PAGE + j + 1]))
    return pages, [(k, -k)]


class PrefixCacheMachine(RuleBasedStateMachine):
    weak_keys = False

    @initialize(max_pages=st.integers(1, 6), seed=st.integers(0, 2**16))
    def start(self, max_pages, seed):
        self.cache = PrefixCache(max_pages)
        self.generator = torch.Generator().manual_seed(seed)
        self.model = ("model", 0)
        self.lookups = self.hits = self.reused = 0

    # ---- helpers ----------------------------------------------------------------------------------------------

    def signature(self):
        return (self.model, PAGE, 1)

    def store(self, prompt):
        pages, pools = pools_holding(prompt, self.generator)
        self.cache.store(self.signature(), prompt, PAGE, pages, pools)

    def lookup(self, prompt, limit=None):
        """Looks the prompt up, reads the hit into a fresh pool, checks exactness; returns the pages found."""
        limit = full_pages(prompt) if limit is None else limit
        slots = self.cache.lookup(self.signature(), prompt, PAGE, limit)
        self.lookups += 1
        self.hits += bool(slots)
        self.reused += len(slots) * PAGE
        assert len(slots) <= min(full_pages(prompt), limit)
        assert len(set(slots)) == len(slots)
        if slots:
            pool = torch.full((len(slots) + 2, PAGE, 1, 1), float("nan"), dtype=torch.float64)
            targets = list(range(len(slots) + 1, 1, -1))
            self.cache.read(slots, [(pool, -pool)], targets)
            for i, page in enumerate(targets):
                for j in range(PAGE):
                    expected = value_of(tuple(prompt[:i * PAGE + j + 1]))
                    assert pool[page, j].item() == expected, f"page {i} of {prompt} read another prefix's K/V"
        return len(slots)

    # ---- rules ------------------------------------------------------------------------------------------------

    @rule(prompt=prompts)
    def store_a_prompt(self, prompt):
        self.store(prompt)

    @rule(prompt=prompts, limit=st.integers(0, 6))
    def look_a_prompt_up(self, prompt, limit):
        self.lookup(prompt, limit)

    @rule(prompt=prompts)
    def a_stored_prompt_is_found_whole(self, prompt):
        self.store(prompt)
        found = self.lookup(prompt)
        if not self.weak_keys:  # (colliding keys within one prompt legitimately cut its run short)
            assert found == min(full_pages(prompt), self.cache.max_pages)

    @rule(first=prompts, second=prompts)
    def least_recently_used_pages_go_first(self, first, second):
        """Pages of `first` survive storing `second` when both prompts' distinct pages fit in the storage."""
        self.store(first)
        self.store(second)
        distinct = {tuple(p[:(i + 1) * PAGE]) for p in (first, second) for i in range(full_pages(p))}
        found = self.lookup(first)
        if len(distinct) <= self.cache.max_pages and not self.weak_keys:
            assert found == full_pages(first)

    @rule()
    def clear(self):
        self.cache.clear()
        assert self.cache.stats.pages_stored == 0

    @rule()
    def another_model(self):
        """A different model (or page size, dtype...) signature: nothing of the old one may be found, and a store
        under it empties the cache of the old one's pages."""
        self.model = ("model", self.model[1] + 1)

    # ---- invariants -------------------------------------------------------------------------------------------

    @invariant()
    def storage_slots_are_partitioned(self):
        cache = self.cache
        used = [entry.slot for entry in cache._entries.values()]
        assert len(used) <= cache.max_pages
        assert len(set(used)) == len(used), "two entries share a storage slot"
        assert len(set(cache._free)) == len(cache._free), "a slot is free twice"
        assert set(used).isdisjoint(cache._free), "a used slot is also free"
        assert set(used) | set(cache._free) == set(range(cache.max_pages)), "a storage slot leaked"
        assert cache.stats.pages_stored == len(used)

    @invariant()
    def stats_count_lookups_and_hits(self):
        stats = self.cache.stats
        assert (stats.lookups, stats.hits, stats.tokens_reused) == (self.lookups, self.hits, self.reused)


class WeakKeysMachine(PrefixCacheMachine):
    weak_keys = True


@pytest.mark.parametrize("machine", [PrefixCacheMachine, WeakKeysMachine], ids=["real_keys", "four_keys"])
def test_prefix_cache_state_machine(machine, monkeypatch):
    if machine.weak_keys:
        monkeypatch.setattr(prefix_module, "_key",
                            lambda parent, page: bytes([hashlib.blake2b(parent + page).digest()[0] % 4]))
    test = machine.TestCase
    test.settings = settings(max_examples=150, stateful_step_count=30, deadline=None,
                             suppress_health_check=list(HealthCheck))
    test().runTest()
