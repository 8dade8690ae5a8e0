"""`PrefixCache`: K/V pages of earlier prompts, kept across generate() calls so that a prompt starting with the same
tokens (the same document with another question, a few-shot header, a chat's history) prefills only the rest.

Pages are keyed as vLLM's automatic prefix caching keys them: page i of a prompt (its tokens i * P .. (i+1) * P - 1)
by a hash of its tokens and of the key of page i - 1, so a key names the whole token prefix up to the page's end.
Only full pages are kept. A hit is exact, never a hash guess: every entry stores its tokens and the id of the entry
it was stored after (ids are never reused), and lookup follows a chain only through entries whose tokens match and
whose parent is the very entry it matched one page earlier. So when two prefixes' keys collide and one overwrites
the other's entry, the pages stored after the old one no longer chain to it (comparing the parent's key instead
would hand them to the new prefix: tests/test_prefix_cache_properties.py finds that with keys cut to 2 bits).
Entries also belong to one model signature (the model object, its dtype, device and weights' version counters, the
page size and layer count); a different signature empties the cache first.

Storage is the cache's own: one K and one V tensor per layer of `max_pages` pages, on the layer's device, allocated
at the first store. A generate() call copies the pages of its longest hit into its PagedKVCache before the prefill
(device copies, ~1 ms per GB) and copies its prompt's new full pages in afterwards; when full, the least recently
used entries are overwritten, the last pages of a prompt before its first ones (a page is useless without the
pages before it). Memory is therefore fixed and known: max_pages x page bytes of every layer.

Weights changed in place between calls (an optimizer step, load_state_dict) bump the parameters' version counters,
which are part of the signature (flashcore_hf/hf/integration.py). Changes the parameters do not show (an adapter
switched on or off, parameters made under torch.inference_mode(), which keep no counter) need `clear()`.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import torch


@dataclass
class PrefixCacheStats:
    """lookups: prompts looked up; hits: lookups that reused at least one page; tokens_reused: prompt tokens not
    prefilled thanks to the cache; pages_stored: pages held now; stores / evictions: pages written / overwritten."""

    lookups: int = 0
    hits: int = 0
    tokens_reused: int = 0
    pages_stored: int = 0
    stores: int = 0
    evictions: int = 0


@dataclass
class _Entry:
    slot: int
    parent: int   # the id of the entry of the page before (0: the prompt's first page)
    tokens: bytes
    id: int


class PrefixCache:
    """Full K/V pages of earlier prompts, reused by later prompts with the same leading tokens (see the module
    docstring). max_pages: pages kept per layer (the memory bound)."""

    def __init__(self, max_pages: int):
        if int(max_pages) < 1:
            raise ValueError(f"max_pages must be >= 1, got {max_pages}")
        self.max_pages = int(max_pages)
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()   # least recently used first
        self._free = list(range(self.max_pages - 1, -1, -1))
        self._storage: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._signature: tuple | None = None
        self._last_id = 0
        self.stats = PrefixCacheStats()

    def clear(self) -> None:
        """Forget every entry (the storage stays allocated for reuse)."""
        self._entries.clear()
        self._free = list(range(self.max_pages - 1, -1, -1))
        self.stats.pages_stored = 0

    @property
    def layer_shapes(self) -> list[tuple[tuple[int, ...], torch.dtype, torch.device]]:
        """([page_size, Hkv, D], dtype, device) of each layer's stored pages (empty before the first store)."""
        return [(tuple(k.shape[1:]), k.dtype, k.device) for k, _ in self._storage]

    def __repr__(self) -> str:
        return f"PrefixCache(max_pages={self.max_pages}, {self.stats})"

    # ---- lookup ---------------------------------------------------------------------------------------------

    def lookup(self, signature: tuple, tokens: list[int], page_size: int, max_pages: int) -> list[int]:
        """Storage slots of the longest run of cached full pages that starts `tokens` (at most max_pages)."""
        self.stats.lookups += 1
        if signature != self._signature:
            return []
        slots, chain, key, parent = [], [], b"", 0
        for i in range(min(len(tokens) // page_size, max_pages)):
            page = _token_bytes(tokens[i * page_size:(i + 1) * page_size])
            key = _key(key, page)
            entry = self._entries.get(key)
            if entry is None or entry.parent != parent or entry.tokens != page:
                break
            slots.append(entry.slot)
            chain.append(key)
            parent = entry.id
        self._touch(chain)
        if slots:
            self.stats.hits += 1
            self.stats.tokens_reused += len(slots) * page_size
        return slots

    def read(self, slots: list[int], pools: list[tuple[torch.Tensor, torch.Tensor]], pages: list[int]) -> None:
        """Copy stored slots into pool pages of every layer (pools [(k_pool, v_pool)] per layer)."""
        _copy_pages(self._storage, slots, pools, pages)

    # ---- store ----------------------------------------------------------------------------------------------

    def store(self, signature: tuple, tokens: list[int], page_size: int, pages: list[int],
              pools: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Keep the full pages of a prompt: tokens (its real tokens), pages (its page table: page i holds tokens
        i * P ..), pools [(k_pool, v_pool)] per layer. Pages already kept are only marked as recently used; when the
        storage is full the least recently used entries are overwritten (never one of this prompt's)."""
        if signature != self._signature:
            self.clear()
            self._signature = signature
            self._storage = []
        if not self._storage:
            self._storage = [(torch.empty((self.max_pages, *k.shape[1:]), dtype=k.dtype, device=k.device),
                              torch.empty((self.max_pages, *v.shape[1:]), dtype=v.dtype, device=v.device))
                             for k, v in pools]
        key, parent, new_slots, new_pages, chain, kept = b"", 0, [], [], [], set()
        for i in range(min(len(tokens) // page_size, len(pages))):
            page = _token_bytes(tokens[i * page_size:(i + 1) * page_size])
            key = _key(key, page)
            entry = self._entries.get(key)
            if entry is None or entry.parent != parent or entry.tokens != page:
                if entry is not None and key in kept:  # keys of this prompt's own pages collide: keep the run so far
                    break
                # A new page, or a key clash with another prefix's entry (overwritten in place: the pages stored
                # after it no longer chain to it).
                slot = self._take_slot(kept) if entry is None else entry.slot
                if slot is None:
                    break
                self._last_id += 1
                entry = self._entries[key] = _Entry(slot, parent, page, self._last_id)
                new_slots.append(slot)
                new_pages.append(pages[i])
                self.stats.stores += 1
            self._entries.move_to_end(key)  # (kept pages never sit at the front, which _take_slot scans)
            chain.append(key)
            kept.add(key)
            parent = entry.id
        self._touch(chain)
        if new_slots:
            _copy_pages(pools, new_pages, self._storage, new_slots)
        self.stats.pages_stored = len(self._entries)

    def _touch(self, chain: list[bytes]) -> None:
        """Mark a prompt's run of pages as the most recently used, its first page last: eviction (least recently used
        first) then takes a run's later pages before the earlier ones they depend on."""
        for key in reversed(chain):
            self._entries.move_to_end(key)

    def _take_slot(self, keep: set[bytes]) -> int | None:
        """A free storage slot, else the slot of the least recently used entry not in `keep` (None: all kept)."""
        if self._free:
            return self._free.pop()
        for key in self._entries:            # least recently used first
            if key not in keep:
                entry = self._entries.pop(key)
                self.stats.evictions += 1
                return entry.slot
        return None


def _copy_pages(src: list[tuple[torch.Tensor, torch.Tensor]], src_pages: list[int],
                dst: list[tuple[torch.Tensor, torch.Tensor]], dst_pages: list[int]) -> None:
    """dst[layer][dst_pages[i]] = src[layer][src_pages[i]] for K and V of every layer (index tensors made once per
    device)."""
    indices: dict[tuple[torch.device, str], torch.Tensor] = {}

    def on(device: torch.device, pages: list[int], role: str) -> torch.Tensor:
        key = (device, role)
        if key not in indices:
            indices[key] = torch.tensor(pages, dtype=torch.long).to(device)
        return indices[key]

    for src_pair, dst_pair in zip(src, dst):
        for source, target in zip(src_pair, dst_pair):
            picked = source.index_select(0, on(source.device, src_pages, "src")).to(target.device)
            target.index_copy_(0, on(target.device, dst_pages, "dst"), picked)


def _token_bytes(tokens: list[int]) -> bytes:
    return torch.tensor(tokens, dtype=torch.int64).numpy().tobytes()


def _key(parent: bytes, page: bytes) -> bytes:
    return hashlib.blake2b(parent + page, digest_size=16).digest()
