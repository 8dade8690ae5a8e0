"""Hands the forward's 2-D padding mask from the attention-mask function to `PagedKVCache`.

transformers builds the attention mask once per forward, before any layer runs, and never passes it to
`Cache.update`. The mask function registered for "flashcore" calls `stash_padding_mask` with the 2-D
[B, past + S] mask (None when nothing is padded); the cache's first layer of the step calls `take_padding_mask`
to learn which of the new tokens are left padding (they get no page). The holder is thread-local so concurrent
forwards in different threads do not see each other's masks.
"""
from __future__ import annotations

import threading

import torch

_holder = threading.local()


def stash_padding_mask(mask: torch.Tensor | None) -> None:
    """Remember the current forward's padding mask: [B, past + S] bool/int (True/1 = real token), or None."""
    _holder.mask = mask


def take_padding_mask() -> torch.Tensor | None:
    """Return the stashed mask and clear it (so a later forward without a mask function never sees it)."""
    mask = getattr(_holder, "mask", None)
    _holder.mask = None
    return mask
