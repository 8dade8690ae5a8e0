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
mask decision). Page-count bounds are bucketed (powers of two) so that an eager step and a CUDA-graph replay of the
same bucket run the very same attention plans and give bit-identical results.
"""
from __future__ import annotations

from array import array
from dataclasses import dataclass, field

import torch

from ..layout import PageLayout
from ..ops import AttentionPlan, plan_attention

FULL, WINDOW = "full", "window"


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
    layout kind row_offsets [runs + 1], cols / token_counts / staging_ids [capacity]. An eager step's capacities are
    exact; a captured decode step's are its bucket's bounds (entries past a step's pages unused)."""

    batch: int
    query_len: int
    runs: int
    capacities: tuple[tuple[str, int], ...]

    def sizes(self) -> list[int]:
        sizes = [self.runs + 1, self.batch * self.query_len]
        for _, cap in self.capacities:
            sizes += [self.runs + 1, cap, cap, cap]
        return sizes

    def split(self, buffer: torch.Tensor) -> "DeviceStep":
        """Views of a packed buffer (on any device)."""
        parts = torch.split(buffer, self.sizes())
        layouts = {kind: PageLayout(*parts[2 + 4 * i:6 + 4 * i]) for i, (kind, _) in enumerate(self.capacities)}
        return DeviceStep(parts[0], parts[1], layouts)

    def pack(self, q_indptr: torch.Tensor, slot_mapping: torch.Tensor, layouts: dict[str, PageLayout],
             pin: bool) -> torch.Tensor:
        """One host int32 buffer of these sizes from host parts (layout parts shorter than a capacity are padded:
        unused entries name page 0 with 0 tokens, which the kernels never read)."""
        out = torch.zeros(sum(self.sizes()), dtype=torch.int32, pin_memory=pin)
        pieces = [q_indptr, slot_mapping]
        for kind, _ in self.capacities:
            pieces += list(layouts[kind])
        at = 0
        for piece, size in zip(pieces, self.sizes()):
            out[at:at + piece.numel()] = piece
            at += size
        return out


@dataclass
class DeviceStep:
    """A step's metadata on one device (views of one int32 buffer)."""

    q_indptr: torch.Tensor
    slot_mapping: torch.Tensor
    layouts: dict[str, PageLayout]


@dataclass
class StepPlan:
    """Everything the layers of one forward step share.

    shape: the packed metadata's sizes; padded_len: columns of every row after this step (padding included);
    max_q_len: longest run; max_pages: kind -> bound on a layout row's pages; runs_are_rows: one run per row (no
    padding inside a row's new columns), which sparse selection and non-causal attention need; window: the sliding
    window the "window" layout was made for (None: no such layout).
    host_parts: the metadata on the host (q_indptr, slot_mapping, kind -> layout); None for a captured step, whose
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
    _host: torch.Tensor | None = None
    _plans: dict[tuple, AttentionPlan] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return self.shape.batch

    @property
    def query_len(self) -> int:
        return self.shape.query_len

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
        selected on the device: rows B * Hkv of max_pages pages)."""
        key = (device, kind, num_q_heads, num_kv_heads, head_dim, page_size, dtype, causal, sm_scale, window, softcap)
        plan = self._plans.get(key)
        if plan is None:
            step = self.on(device)
            layout = step.layouts.get(kind)
            if layout is None:  # a layout made per layer on the device (sparse): only its shape matters here
                layout = _shape_only_layout(rows, nnz, device)
            plan = plan_attention(layout, step.q_indptr, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
                                  head_dim=head_dim, page_size=page_size, dtype=dtype,
                                  total_q=self.shape.batch * self.shape.query_len, causal=causal, sm_scale=sm_scale,
                                  sliding_window=window, softcap=softcap, max_q_len=self.max_q_len,
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
