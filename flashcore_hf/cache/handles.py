"""What `PagedKVCache.update` hands to the attention function instead of dense K/V.

HF attention modules do `key, value = cache.update(key_states, value_states, layer_idx)` and pass both to the
attention function together with the 2-D padding mask. The mask is what decides which new tokens take a page slot,
and the attention function is the first place that has it, so `update` returns a `PagedKVHandle` holding the new
K/V, and the attention function resolves it with the mask: the cache plans the step (at its first layer), writes the
layer's K/V into the pages and returns the `PagedLayerStep` the kernels read. A caller of `update` outside a model
passes `attention_mask=` (or nothing: no padding) and gets the resolved step at once. On a sparse "topk" decode step
the write is held back to run beside the layer's page selection (`LayerWrite`); reading the step's pools runs it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, TypeVar

import torch

from ..layout import PageLayout
from .step_plan import FULL, DeviceStep, StepPlan


@dataclass
class PagedKVHandle:
    """One layer's new K/V of a forward step, not written yet (see the module docstring).

    cache: the PagedKVCache; key_states, value_states [B, Hkv, S, D]. `resolve(attention_mask)` writes them (once)
    and returns the PagedLayerStep.
    """

    cache: object
    layer_idx: int
    key_states: torch.Tensor
    value_states: torch.Tensor
    _resolved: "PagedLayerStep | None" = None

    def resolve(self, attention_mask: torch.Tensor | None = None) -> "PagedLayerStep":
        """Write the layer's K/V (planning the step if this is its first layer) with `attention_mask` (2-D
        [B, >= S]: its last S columns mark the new tokens that are real; None: all are) and return the step."""
        if self._resolved is None:
            self._resolved = self.cache.write_layer(self.layer_idx, self.key_states, self.value_states,
                                                    attention_mask)
        return self._resolved


T = TypeVar("T")


class LayerWrite:
    """A layer's K/V write of a decode step, held back so that it can run beside the layer's page selection.

    On a sparse "topk" decode step the write (append + folding the new keys into the page summaries, one kernel)
    and the selection (page scores from the summaries, top-k) do not wait for each other's results: the write
    changes the summaries of each sequence's newest page only, and every selection keeps that page whatever its
    score (SparseCachePlanner.write_beside_selection). So `PagedLayerStep.select_pages` runs them at once, on two
    streams. Runs exactly once: beside the selection, or first thing when anything reads the pools
    (PagedLayerStep.k_cache / v_cache, the cache's next operation: PagedKVCache.flush).
    """

    def __init__(self, write: Callable[[], None]):
        self._write: Callable[[], None] | None = write

    @property
    def pending(self) -> bool:
        return self._write is not None

    def run(self) -> None:
        """The write now, on the current stream (nothing when it ran already)."""
        write, self._write = self._write, None
        if write is not None:
            write()

    def run_beside(self, work: Callable[[], T], device: torch.device) -> T:
        """work() on the current stream while the write runs on a side stream of `device`, joined before returning
        (so whatever the current stream runs next sees both); on the CPU, or when the write ran already, the write
        and then work()."""
        if self._write is None or device.type != "cuda":
            self.run()
            return work()
        main = torch.cuda.current_stream(device)
        side = side_stream(device)
        side.wait_stream(main)
        try:
            with torch.cuda.stream(side):
                self.run()
            return work()
        finally:
            main.wait_stream(side)


_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """The stream of `device` that held-back layer writes run on (one per device, made on first use)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = _SIDE_STREAMS.get(index)
    if stream is None:
        stream = _SIDE_STREAMS[index] = torch.cuda.Stream(torch.device("cuda", index))
    return stream


@dataclass
class PagedLayerStep:
    """One layer's view of the cache for the current step.

    k_cache, v_cache: [num_pages, page_size, Hkv, D] pools of this layer, with this step's K/V written (reading
    them runs a held-back write first). step: the StepPlan every layer of the step shares (layouts, bounds,
    attention plans); device_step: its metadata on this layer's device. selector: the pages this layer selects on
    a sparse decode step (flashcore_hf.sparse.LayerSelector), else None. write: the layer's K/V write when it was
    held back to run beside the selection (LayerWrite; None: written already).
    """

    _k_pool: torch.Tensor
    _v_pool: torch.Tensor
    step: StepPlan
    device_step: DeviceStep
    selector: object | None = None
    write: LayerWrite | None = None

    @property
    def k_cache(self) -> torch.Tensor:
        self._finish_write()
        return self._k_pool

    @property
    def v_cache(self) -> torch.Tensor:
        self._finish_write()
        return self._v_pool

    def _finish_write(self) -> None:
        if self.write is not None:
            self.write.run()

    @property
    def page_size(self) -> int:
        return self._k_pool.shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self._k_pool.shape[2]

    def select_pages(self, q: torch.Tensor) -> PageLayout:
        """The layout this sparse layer reads (selector.select(q); q [B * S, Hq, D]), its held-back write running
        beside the selection."""
        if self.write is None:
            return self.selector.select(q)
        return self.write.run_beside(lambda: self.selector.select(q), q.device)

    @property
    def layout(self) -> PageLayout:
        """The step's layout of every page each query run reads."""
        return self.device_step.layouts[FULL]

    @property
    def q_indptr(self) -> torch.Tensor:
        return self.device_step.q_indptr

    @property
    def max_q_len(self) -> int:
        return self.step.max_q_len

    @property
    def max_pages_per_seq(self) -> int:
        return self.step.max_pages[FULL]
