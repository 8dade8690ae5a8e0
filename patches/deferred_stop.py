"""Let generate()'s decoding loop read its stop flag one step late for some caches, as transformers does on MPS.

`GenerationMixin._sample` ends every step with `bool(unfinished_sequences.max() == 0)`: the host waits for the
device to finish the step before it prepares the next one, so the GPU idles for all of generate()'s per-step host
work (preparing inputs, the model call up to its launches): 0.7-0.9 ms of a ~6 ms CUDA-graph decode step at
1 x 32K on an H200. transformers ships `DeferredStopCheck` for this (the flag is copied asynchronously and read on the
next step, so the host queues step N+1 while the device runs step N; a step past a stop is undone: the tokens are
dropped and a returned cache is cropped by one), but `DeferredStopCheck.is_supported` enables it on MPS only. This
patch wraps that check and asks a predicate first, so that flashcore's PagedKVCache defers on CUDA too; every other
cache, device and assistant model gets transformers' answer.
"""
from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

from .targets import checked_target, install

EXPECTED_PARAMETERS = ("device", "cache", "cache_is_returned", "is_assistant")
"""Signature of the static `DeferredStopCheck.is_supported` the patch was written against."""

DeferPredicate = Callable[..., bool]
"""defers(device, cache) -> True when generate() may defer its stop check for this cache on this device."""


def install_deferred_stop_check(defers: DeferPredicate) -> None:
    """Make `DeferredStopCheck.is_supported` true where `defers(device, cache)` is (for a cache that can be rolled
    back when it is returned, never for an assistant model); idempotent: a later call replaces the predicate. Raises
    PatchTargetChanged if the check changed or is gone."""
    from transformers.generation.utils import DeferredStopCheck

    current = DeferredStopCheck.is_supported
    holder = getattr(current, "__flashcore_predicate__", None)
    if holder is not None:
        holder[0] = defers
        return
    original = checked_target(DeferredStopCheck, "is_supported", EXPECTED_PARAMETERS,
                              "DeferredStopCheck.is_supported", "patches/deferred_stop.py")
    original_static = inspect.getattr_static(DeferredStopCheck, "is_supported")
    holder = [defers]

    @functools.wraps(original)
    def is_supported(device, cache, cache_is_returned, is_assistant):
        if (not is_assistant and cache is not None and (cache.is_croppable or not cache_is_returned)
                and holder[0](device, cache)):
            return True
        return original(device, cache, cache_is_returned, is_assistant)

    is_supported.__flashcore_predicate__ = holder
    install(DeferredStopCheck, "is_supported", staticmethod(is_supported), original_static)
