"""`PageLayout`: which pages each sequence of a batch reads (CSR over sequences)."""
from __future__ import annotations

from typing import NamedTuple

import torch


class PageLayout(NamedTuple):
    """CSR page lists, all int32 tensors on one device.

    row_offsets [B + 1]: sequence b reads cols[row_offsets[b]:row_offsets[b+1]] (for every head). For per-head sparse
        selection, row_offsets may instead have B * Hkv + 1 entries: row b * Hkv + h lists the pages kv head h of
        sequence b reads (paged_attention accepts either).
    cols [nnz]: physical page ids, in key order.
    token_counts [nnz]: how many keys (from the start of the page) are used from page cols[j].
    staging_ids [nnz]: -1 for a resident page, else its slot in a staging buffer (see build_layout).
    """

    row_offsets: torch.Tensor
    cols: torch.Tensor
    token_counts: torch.Tensor
    staging_ids: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.row_offsets.numel() - 1

    def to(self, device, non_blocking: bool = False) -> "PageLayout":
        return PageLayout(*(t.to(device, non_blocking=non_blocking) for t in self))
