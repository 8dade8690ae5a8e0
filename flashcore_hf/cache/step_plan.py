"""One forward step's plan: which slot each new token takes and which pages each query reads, decided once on the host
for every layer of the step (and, in fixed device buffers, for every replay of a captured decode step).

Queries and padding. A step appends `query_len` new columns to every row; a 2-D attention mask may mark any of them
as padding (left, right, holes). A padding token takes no slot. Every column is still a query (the model computes
it), and causal attention lets column c see the row's real tokens at columns <= c, which is what eager attention
computes for it too. The kernels align queries bottom-right on their keys, so the step's queries are cut into runs:
a run is consecutive columns of one row whose visible-key counts rise by one per column (queries that see no key
may lead a run: their output is zero either way); each run is one "sequence" of the kernels, reading the row's
first n_keys tokens. No padding, or left padding only: one run per row.

Layouts. "full": every page a run reads. "window" (models with sliding-window layers): only the pages that hold a
key inside the window of the run's first query (positions are relative, so dropping whole leading pages changes no
mask decision). Cascade (decode steps whose rows share prompt pages: parallel samples, beams, repeated prompts; see
`shared_prefixes`): "prefix" has one row per group of rows that start with the same pages and key split of those
pages (`prefix_splits`), listing the split's pages, and is read once by all the group's queries (non-causal: every
shared key precedes them); "suffix" has one row per run with the rest of its pages. Attention over both, merged by
their lse, equals attention over "full". Page-count bounds are bucketed (powers of two) so that an eager step and a
CUDA-graph replay of the same bucket run the very same attention plans and give bit-identical results.
"""
from __future__ import annotations

from array import array
from dataclasses import dataclass, field

import torch

from ..layout import PageLayout
from ..ops import DECODE_QUERIES_PER_SEQUENCE, AttentionPlan, plan_attention

FULL, WINDOW, PREFIX, SUFFIX = "full", "window", "prefix", "suffix"
CASCADE_SPLIT_KEYS = 512
"""Fewest shared keys in one key split of a large group's prefix (see `prefix_splits`)."""
CASCADE_QUERY_TILE = 128
"""Query rows (query x head) of one block of the prefill kernels, which read a large group's prefix: what
`prefix_splits` counts blocks with."""
CASCADE_MIN_SAVED = 0.5
"""A decode step reads shared prompt pages once per group (cascade) when that saves at least this fraction of the
keys the step reads otherwise: it costs a second attention call and a merge per layer."""


def page_count_bucket(pages: int) -> int:
    """The host-side bound on pages per layout row that kernels get: the next power of two (at least 1)."""
    return 1 << max(0, int(pages) - 1).bit_length()


def window_page_bound(window: int, page_size: int, query_len: int, full_bound: int) -> int:
    """Most pages a "window" layout row lists: the window's keys plus those of the step's other queries, which can
    straddle one page boundary more, never more than the full layout's bound."""
    return min(full_bound, page_count_bucket((window + query_len - 2) // page_size + 2))


def int32(values) -> torch.Tensor:
    """A 1-D int32 CPU tensor from an iterable of Python ints (through array, much faster than torch.tensor)."""
    buf = array("i", values)
    return torch.frombuffer(buf, dtype=torch.int32) if len(buf) else torch.empty(0, dtype=torch.int32)


@dataclass(frozen=True)
class StepShape:
    """Sizes of a step's packed int32 metadata: q_indptr [runs + 1], slot_mapping [batch * query_len], then per
    layout kind row_offsets [rows + 1], cols / token_counts / staging_ids [capacity] (rows: groups * prefix_splits
    for "prefix", else runs), then with a cascade (groups > 0) order [prefix_splits * batch], inverse [batch] and
    group_indptr [groups * prefix_splits + 1] (CascadeStep). An eager step's capacities are exact; a captured decode
    step's are its bucket's bounds (entries past a step's pages unused)."""

    batch: int
    query_len: int
    runs: int
    capacities: tuple[tuple[str, int], ...]
    groups: int = 0
    prefix_splits: int = 1

    def rows(self, kind: str) -> int:
        return self.groups * self.prefix_splits if kind == PREFIX else self.runs

    def sizes(self) -> list[int]:
        sizes = [self.runs + 1, self.batch * self.query_len]
        for kind, cap in self.capacities:
            sizes += [self.rows(kind) + 1, cap, cap, cap]
        if self.groups:
            sizes += [self.prefix_splits * self.batch, self.batch, self.rows(PREFIX) + 1]
        return sizes

    def split(self, buffer: torch.Tensor) -> "DeviceStep":
        """Views of a packed buffer (on any device)."""
        parts = torch.split(buffer, self.sizes())
        layouts = {kind: PageLayout(*parts[2 + 4 * i:6 + 4 * i]) for i, (kind, _) in enumerate(self.capacities)}
        cascade = CascadeStep(*parts[-3:]) if self.groups else None
        return DeviceStep(parts[0], parts[1], layouts, cascade)

    def pack(self, q_indptr: torch.Tensor, slot_mapping: torch.Tensor, layouts: dict[str, PageLayout],
             cascade: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, pin: bool) -> torch.Tensor:
        """One host int32 buffer of these sizes from host parts (layout parts shorter than a capacity are padded:
        unused entries name page 0 with 0 tokens, which the kernels never read). cascade: (order, inverse,
        group_indptr) when groups > 0."""
        out = torch.zeros(sum(self.sizes()), dtype=torch.int32, pin_memory=pin)
        pieces = [q_indptr, slot_mapping]
        for kind, _ in self.capacities:
            pieces += list(layouts[kind])
        if self.groups:
            pieces += list(cascade)
        at = 0
        for piece, size in zip(pieces, self.sizes()):
            out[at:at + piece.numel()] = piece
            at += size
        return out


@dataclass
class CascadeStep:
    """A cascade decode step's query order on one device. order [S * B] int32: the rows group by group, once per key
    split s of the prefix (the "prefix" layout's queries are q[order]; split s of group g, layout row s * G + g, at
    group_indptr[s * G + g] .. group_indptr[s * G + g + 1]); inverse [B]: the position of each row in split 0 (in
    split s: s * B + inverse)."""

    order: torch.Tensor
    inverse: torch.Tensor
    group_indptr: torch.Tensor


@dataclass
class DeviceStep:
    """A step's metadata on one device (views of one int32 buffer)."""

    q_indptr: torch.Tensor
    slot_mapping: torch.Tensor
    layouts: dict[str, PageLayout]
    cascade: CascadeStep | None = None


@dataclass
class StepPlan:
    """Everything the layers of one forward step share.

    shape: the packed metadata's sizes; padded_len: columns of every row after this step (padding included);
    max_q_len: longest run; max_pages: kind -> bound on a layout row's pages; runs_are_rows: one run per row (no
    padding inside a row's new columns), which sparse selection and non-causal attention need; window: the sliding
    window the "window" layout was made for (None: no such layout); max_group: with a cascade, the bound on a
    group's rows (the "prefix" plan's queries per sequence), else 0.
    host_parts: the metadata on the host (q_indptr, slot_mapping, kind -> layout, cascade order parts or None);
    None for a captured step, whose
    device buffers are reloaded before each replay (StepShape.pack at their capacities). per_device: its copies,
    packed in one buffer and copied once per device; sparse: the sparse policy's step state (flashcore_hf.sparse).
    """

    shape: StepShape
    padded_len: int
    max_q_len: int
    max_pages: dict[str, int]
    runs_are_rows: bool
    host_parts: tuple | None
    per_device: dict[torch.device, DeviceStep] = field(default_factory=dict)
    layers_done: set[int] = field(default_factory=set)
    sparse: object | None = None
    window: int | None = None
    max_group: int = 0
    _host: torch.Tensor | None = None
    _plans: dict[tuple, AttentionPlan] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return self.shape.batch

    @property
    def query_len(self) -> int:
        return self.shape.query_len

    @property
    def cascade_key(self) -> tuple | None:
        """What a captured step's buffers and plans depend on besides the full bucket: (groups, prefix splits, prefix
        bound, suffix bound, group bound), or None without a cascade."""
        if not self.shape.groups:
            return None
        return (self.shape.groups, self.shape.prefix_splits, self.max_pages[PREFIX], self.max_pages[SUFFIX],
                self.max_group)

    def on(self, device: torch.device) -> DeviceStep:
        """The metadata on `device`, copied there on first use (once per device per step)."""
        step = self.per_device.get(device)
        if step is None:
            if self._host is None:
                self._host = self.shape.pack(*self.host_parts, pin=torch.cuda.is_available())
            buf = self._host if device.type == "cpu" else self._host.to(device, non_blocking=True)
            step = self.per_device[device] = self.shape.split(buf)
        return step

    def attention_plan(self, device: torch.device, kind: str, *, num_q_heads: int, num_kv_heads: int, head_dim: int,
                       page_size: int, dtype: torch.dtype, causal: bool, sm_scale: float, window: int | None,
                       softcap: float | None, rows: int | None = None, max_pages: int | None = None,
                       nnz: int | None = None) -> AttentionPlan:
        """The step's attention plan for a layout kind and attention options (made once, then shared by every layer
        that asks the same). rows / max_pages / nnz describe a layout other than the step's own (sparse page lists
        selected on the device: rows B * Hkv of max_pages pages). "prefix" plans run the cascade's groups: their
        queries are the step's in CascadeStep.order (once per key split), up to max_group per group."""
        key = (device, kind, num_q_heads, num_kv_heads, head_dim, page_size, dtype, causal, sm_scale, window, softcap)
        plan = self._plans.get(key)
        if plan is None:
            step = self.on(device)
            layout = step.layouts.get(kind)
            if layout is None:  # a layout made per layer on the device (sparse): only its shape matters here
                layout = _shape_only_layout(rows, nnz, device)
            prefix = kind == PREFIX
            queries = self.shape.batch * self.shape.query_len * (self.shape.prefix_splits if prefix else 1)
            plan = plan_attention(layout, step.cascade.group_indptr if prefix else step.q_indptr,
                                  num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
                                  head_dim=head_dim, page_size=page_size, dtype=dtype,
                                  total_q=queries, causal=causal, sm_scale=sm_scale,
                                  sliding_window=window, softcap=softcap,
                                  max_q_len=self.max_group if prefix else self.max_q_len,
                                  max_pages_per_seq=self.max_pages[kind] if max_pages is None else max_pages,
                                  exact=True)
            self._plans[key] = plan
        return plan


def _shape_only_layout(rows: int, nnz: int, device: torch.device) -> PageLayout:
    empty = torch.empty(0, dtype=torch.int32, device=device)
    return PageLayout(torch.empty(rows + 1, dtype=torch.int32, device=device), empty.new_empty(nnz),
                      empty.new_empty(nnz), empty.new_empty(nnz))


@dataclass(frozen=True)
class QueryRuns:
    """How a step's B x S query columns are cut into runs (see the module docstring).

    starts [R + 1]: run r covers packed queries starts[r] .. starts[r + 1] - 1 (row-major over (row, column)).
    rows [R]: the cache row of each run. keys [R]: keys (real tokens) each run reads, from the row's start.
    """

    starts: list[int]
    rows: list[int]
    keys: list[int]


def query_runs(lengths_before: list[int], new_real: list[list[bool]] | None, query_len: int) -> QueryRuns:
    """Runs of a step. lengths_before [B]: real tokens per row before the step; new_real [B][S]: which new columns
    are real (None: all)."""
    starts, rows, keys = [], [], []
    for b, before in enumerate(lengths_before):
        base = b * query_len
        if new_real is None or all(new_real[b]):
            starts.append(base)
            rows.append(b)
            keys.append(before + query_len)
            continue
        seen = before
        run_start, run_seen = None, None
        for s in range(query_len):
            seen += 1 if new_real[b][s] else 0
            # column s joins the open run if it sees one key more than the previous column, or sees none at all
            # (then it may lead the next run: bottom-right alignment gives it no key either)
            if run_start is not None and (seen == run_seen + 1 or (run_seen == 0 and seen <= 1)):
                run_seen = seen
                continue
            if run_start is not None:
                starts.append(base + run_start)
                rows.append(b)
                keys.append(run_seen)
            run_start, run_seen = s, seen
        starts.append(base + run_start)
        rows.append(b)
        keys.append(run_seen)
    starts.append(len(lengths_before) * query_len)
    return QueryRuns(starts, rows, keys)


def build_layouts(runs: QueryRuns, page_tables: list[list[int]], page_size: int, window: int | None
                  ) -> tuple[dict[str, PageLayout], dict[str, int]]:
    """Host layouts (kind -> PageLayout of CPU int32 tensors, one row per run) and each kind's largest row."""
    kinds = [FULL] + ([WINDOW] if window is not None else [])
    offsets = {kind: [0] for kind in kinds}
    cols = {kind: [] for kind in kinds}
    counts = {kind: [] for kind in kinds}
    for r, (row, n_keys) in enumerate(zip(runs.rows, runs.keys)):
        n_pages = -(-n_keys // page_size)
        pages = page_tables[row]
        first_query = n_keys - (runs.starts[r + 1] - runs.starts[r])     # position of the run's first query
        firsts = {FULL: 0}
        if window is not None:
            firsts[WINDOW] = min(max(0, first_query - window + 1) // page_size, n_pages)
        for kind in kinds:
            first = firsts[kind]
            if n_pages > first:
                cols[kind].extend(pages[first:n_pages])
                counts[kind].extend([page_size] * (n_pages - first - 1))
                counts[kind].append(n_keys - (n_pages - 1) * page_size)
            offsets[kind].append(len(cols[kind]))
    layouts, largest = {}, {}
    for kind in kinds:
        o = offsets[kind]
        largest[kind] = max((o[i + 1] - o[i] for i in range(len(o) - 1)), default=0)
        layouts[kind] = PageLayout(int32(o), int32(cols[kind]), int32(counts[kind]),
                                   torch.full((len(cols[kind]),), -1, dtype=torch.int32))
    return layouts, largest


@dataclass(frozen=True)
class SharedPrefixes:
    """Groups of a decode step's rows that start with the same pages.

    order [B]: the rows, group by group; group_starts [G + 1]: group g is order[group_starts[g]:group_starts[g+1]];
    prefix_pages [G]: how many leading pages every row of group g shares (0 for a row alone).
    """

    order: list[int]
    group_starts: list[int]
    prefix_pages: list[int]

    @property
    def largest_group(self) -> int:
        return max(b - a for a, b in zip(self.group_starts[:-1], self.group_starts[1:]))


def shared_prefixes(page_tables: list[list[int]], n_keys: list[int], page_size: int,
                    min_saved: float = CASCADE_MIN_SAVED, max_group: int | None = None) -> SharedPrefixes | None:
    """The groups of rows (one query each) whose page tables start with the same full pages, or None when reading
    those pages once per group would not save `min_saved` of the step's key reads (n_keys [B]: each row's keys).

    A page id names the same tokens wherever it appears (pages are shared by reference count, never written while
    shared), so rows that start with the same page ids hold the same prompt. Only full pages are shared (a row's
    partly filled last page is its own), and every row keeps at least its last page outside the prefix. Rows sharing
    pages form one group, or groups of at most max_group rows.
    """
    max_group = None if max_group is None else max(1, int(max_group))
    by_first: dict[int, list[int]] = {}
    for row, pages in enumerate(page_tables):
        key = pages[0] if pages else -1 - row           # rows without pages stay alone
        by_first.setdefault(key, []).append(row)
    order, starts, prefix_pages, saved = [], [0], [], 0
    for rows in by_first.values():
        shared = 0
        if len(rows) > 1:
            shared = min((n_keys[r] - 1) // page_size for r in rows)      # full pages before each row's last key
            first = page_tables[rows[0]]
            for r in rows[1:]:
                pages = page_tables[r]
                if pages[:shared] == first[:shared]:                 # the usual case, compared at C speed
                    continue
                k = 0
                while k < shared and pages[k] == first[k]:
                    k += 1
                shared = k
        group_size = max_group or len(rows)
        for at in range(0, len(rows), group_size):          # groups of at most max_group rows
            chunk = rows[at:at + group_size]
            order.extend(chunk)
            starts.append(len(order))
            prefix_pages.append(shared)
            saved += (len(chunk) - 1) * shared * page_size
    if saved == 0 or saved < min_saved * sum(n_keys):
        return None
    return SharedPrefixes(order, starts, prefix_pages)


def prefix_splits(shared: SharedPrefixes, page_size: int, num_q_heads: int, num_sms: int) -> int:
    """Key splits of a cascade's "prefix" layout: each group's shared pages are cut into this many key ranges, each
    read by all the group's queries and merged with the rest by lse (CascadeStep).

    Groups of at most DECODE_QUERIES_PER_SEQUENCE rows take the split-KV decode kernel, which splits a row's keys
    itself: 1. Larger groups take a prefill kernel, whose blocks cover CASCADE_QUERY_TILE query rows (query x head)
    each and all of a row's keys: as many splits as keep every block of the first wave busy (num_sms: the device's
    multiprocessors; 0 on the CPU: 1), each of at least CASCADE_SPLIT_KEYS shared keys.
    """
    if num_sms <= 0 or shared.largest_group <= DECODE_QUERIES_PER_SEQUENCE:
        return 1
    sizes = [b - a for a, b in zip(shared.group_starts[:-1], shared.group_starts[1:])]
    blocks = sum(-(-n * num_q_heads // CASCADE_QUERY_TILE) for n, pages in zip(sizes, shared.prefix_pages) if pages)
    keys = max(shared.prefix_pages) * page_size
    return max(1, min(num_sms // max(blocks, 1), keys // CASCADE_SPLIT_KEYS))


def cascade_layouts(shared: SharedPrefixes, runs: QueryRuns, page_tables: list[list[int]], page_size: int,
                    splits: int = 1) -> tuple[dict[str, PageLayout], dict[str, int], tuple[torch.Tensor, ...]]:
    """Host "prefix" (one row per key split and group, split-major; split s of a group's P shared pages: pages
    [s * ceil(P / splits), (s + 1) * ceil(P / splits)), possibly none) and "suffix" (one row per run) layouts of a
    decode step whose runs are its rows, each kind's largest row, and the CascadeStep parts (order, inverse,
    group_indptr) as int32 tensors."""
    group_of = {}
    for g in range(len(shared.prefix_pages)):
        for row in shared.order[shared.group_starts[g]:shared.group_starts[g + 1]]:
            group_of[row] = g
    prefix_offsets, prefix_cols = [0], []
    for s in range(splits):
        for g, n in enumerate(shared.prefix_pages):
            per_split = -(-n // splits)
            pages = page_tables[shared.order[shared.group_starts[g]]]
            prefix_cols.extend(pages[s * per_split:min(n, (s + 1) * per_split)])
            prefix_offsets.append(len(prefix_cols))
    suffix_offsets, suffix_cols, suffix_counts = [0], [], []
    for row, n_keys in zip(runs.rows, runs.keys):
        skip = shared.prefix_pages[group_of[row]]
        n_pages = -(-n_keys // page_size)
        suffix_cols.extend(page_tables[row][skip:n_pages])
        suffix_counts.extend([page_size] * (n_pages - skip - 1))
        suffix_counts.append(n_keys - (n_pages - 1) * page_size)
        suffix_offsets.append(len(suffix_cols))
    inverse = [0] * len(shared.order)
    for position, row in enumerate(shared.order):
        inverse[row] = position

    def layout(offsets, cols, counts):
        return PageLayout(int32(offsets), int32(cols), int32(counts), torch.full((len(cols),), -1, dtype=torch.int32))

    layouts = {PREFIX: layout(prefix_offsets, prefix_cols, [page_size] * len(prefix_cols)),
               SUFFIX: layout(suffix_offsets, suffix_cols, suffix_counts)}
    largest = {PREFIX: max(b - a for a, b in zip(prefix_offsets[:-1], prefix_offsets[1:])),
               SUFFIX: max(b - a for a, b in zip(suffix_offsets[:-1], suffix_offsets[1:]))}
    batch = len(shared.order)
    group_indptr = [s * batch + start for s in range(splits) for start in shared.group_starts[:-1]] + [splits * batch]
    return layouts, largest, (int32(shared.order * splits), int32(inverse), int32(group_indptr))
