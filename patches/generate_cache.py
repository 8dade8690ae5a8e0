"""Let `generate()` pick a default cache other than DynamicCache for some models.

transformers has no registry for custom cache classes: with no cache argument and no `cache_implementation`,
`GenerationMixin._prepare_cache_for_generation` always builds a `DynamicCache`. This patch wraps that method and
first asks a factory for a cache; the factory answers None to keep transformers' own choice. Everything else
(user-supplied caches, `cache_implementation=...`, `use_cache=False`, encoder-decoder and assistant models, models
without default-cache support) goes to the original method untouched. The cache goes into generate()'s model
kwargs under the installed release's name for it (versions.CACHE_KWARG: "cache" or "past_key_values").
"""
from __future__ import annotations

import functools
from collections.abc import Callable

from .targets import PatchTargetChanged, checked_target, install, install_tripwire
from .versions import CACHE_KWARG

EXPECTED_PARAMETERS = ("self", "generation_config", "model_kwargs", "generation_mode", "batch_size",
                       "max_cache_length")
"""Signature of `GenerationMixin._prepare_cache_for_generation` the patch was written against (patches/versions.py:
tested range)."""

DefaultCacheFactory = Callable[..., object]
"""factory(model, generation_config, batch_size, max_cache_length) -> Cache | None."""


def install_default_cache_factory(factory: DefaultCacheFactory, on_generate=None) -> None:
    """Route generate()'s default cache through `factory` and call on_generate(model, generation_config) at the
    start of every generate() (idempotent: a later call replaces both). Raises PatchTargetChanged if the wrapped
    method changed."""
    from transformers.generation.utils import GenerationMixin

    current = GenerationMixin._prepare_cache_for_generation
    holder = getattr(current, "__flashcore_factory__", None)
    if holder is not None:
        holder[:] = [factory, on_generate]
        return
    original = checked_target(GenerationMixin, "_prepare_cache_for_generation", EXPECTED_PARAMETERS,
                              "GenerationMixin._prepare_cache_for_generation", "patches/generate_cache.py")
    holder = [factory, on_generate]

    @functools.wraps(original)
    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size,
                                      max_cache_length):
        if holder[1] is not None:
            holder[1](self, generation_config)
        default_applies = (
            model_kwargs.get(CACHE_KWARG) is None
            and generation_config.use_cache is not False
            and generation_config.cache_implementation is None
            and not generation_config.is_assistant
            and not self.config.is_encoder_decoder
            and self._supports_default_dynamic_cache()
        )
        if default_applies:
            cache = holder[0](self, generation_config, batch_size, max_cache_length)
            if cache is not None:
                model_kwargs[CACHE_KWARG] = cache
                return None
        return original(self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length)

    _prepare_cache_for_generation.__flashcore_factory__ = holder
    install(GenerationMixin, "_prepare_cache_for_generation", _prepare_cache_for_generation, original)


def guard_changed_cache_preparation(names: tuple[str, ...] | list[str], error: PatchTargetChanged) -> None:
    """The patch could not apply: generate() on a model whose attention implementation is one of `names` raises
    `error` (naming the changed method) instead of silently running without flashcore's cache."""
    from transformers.generation.utils import GenerationMixin

    wanted = set(names)

    def is_flashcore_model(model, *args, **kwargs) -> bool:
        config = getattr(model, "config", None)
        text_config = config.get_text_config(decoder=True) if config is not None else None
        return getattr(text_config, "_attn_implementation", None) in wanted

    install_tripwire(GenerationMixin, "_prepare_cache_for_generation", is_flashcore_model, error)
