"""What `PagedKVCache.update` hands to the attention function instead of dense K/V.

HF attention modules do `key, value = cache.update(key_states, value_states, layer_idx)` and pass both to the
attention function together with the 2-D padding mask. The mask is what decides which new tokens take a page slot,
and the attention function is the first place that has it, so `update` returns a `PagedKVHandle` holding the new
K/V, and the attention function resolves it with the mask: the cache plans the step (at its first layer), writes the
layer's K/V into the pages and returns the `PagedLayerStep` the kernels read. A caller of `update` outside a model
passes `attention_mask=` (or nothing: no padding) and gets the resolved step at once.
"""
from __future__ import annotations

from dataclasses import dataclass

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


@dataclass
class PagedLayerStep:
    """One layer's view of the cache for the current step, after its K/V were written.

    k_cache, v_cache: [num_pages, page_size, Hkv, D] pools of this layer. step: the StepPlan every layer of the step
    shares (layouts, bounds, attention plans); device_step: its metadata on this layer's device. selector: the pages
    this layer selects on a sparse decode step (flashcore_hf.sparse.LayerSelector), else None.
    """

    k_cache: torch.Tensor
    v_cache: torch.Tensor
    step: StepPlan
    device_step: DeviceStep
    selector: object | None = None

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
