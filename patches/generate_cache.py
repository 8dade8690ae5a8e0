"""Let `generate()` pick a default cache other than DynamicCache for some models.

transformers has no registry for custom cache classes: with no `past_key_values` and no `cache_implementation`,
`GenerationMixin._prepare_cache_for_generation` always builds a `DynamicCache`. This patch wraps that method and
first asks a factory for a cache; the factory answers None to keep transformers' own choice. Everything else
(user-supplied caches, `cache_implementation=...`, `use_cache=False`, encoder-decoder and assistant models, models
without default-cache support) goes to the original method untouched.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

from .targets import checked_target

EXPECTED_PARAMETERS = ("self", "generation_config", "model_kwargs", "generation_mode", "batch_size",
                       "max_cache_length")
"""Signature of `GenerationMixin._prepare_cache_for_generation` in transformers 5.17 .. 5.23."""

DefaultCacheFactory = Callable[..., object]
"""factory(model, generation_config, batch_size, max_cache_length) -> Cache | None."""


def install_default_cache_factory(factory: DefaultCacheFactory, on_generate=None) -> None:
    """Route generate()'s default cache through `factory` and call on_generate(model, generation_config) at the
    start of every generate() (idempotent: a later call replaces both)."""
    from transformers.generation.utils import GenerationMixin

    current = GenerationMixin._prepare_cache_for_generation
    holder = getattr(current, "__flashcore_factory__", None)
    if holder is not None:
        holder[:] = [factory, on_generate]
        return
    checked_target(GenerationMixin, "_prepare_cache_for_generation", EXPECTED_PARAMETERS,
                   "GenerationMixin._prepare_cache_for_generation", "patches/generate_cache.py",
                   "GenerationMixin._prepare_cache_for_generation is gone")
    original = current
    holder = [factory, on_generate]

    @functools.wraps(original)
    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size,
                                      max_cache_length):
        if holder[1] is not None:
            holder[1](self, generation_config)
        default_applies = (
            model_kwargs.get("past_key_values") is None
            and generation_config.use_cache is not False
            and generation_config.cache_implementation is None
            and not generation_config.is_assistant
            and not self.config.is_encoder_decoder
            and self._supports_default_dynamic_cache()
        )
        if default_applies:
            cache = holder[0](self, generation_config, batch_size, max_cache_length)
            if cache is not None:
                model_kwargs["past_key_values"] = cache
                return None
        return original(self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length)

    _prepare_cache_for_generation.__flashcore_factory__ = holder
    _prepare_cache_for_generation.__flashcore_original__ = original
    GenerationMixin._prepare_cache_for_generation = _prepare_cache_for_generation
