"""Everything flashcore changes in third-party code (transformers), in one place, applied by `import flashcore_hf`.

Shipped as `flashcore_hf.patches` (setup.py package_dir). Nothing here imports flashcore_hf: the integration layer
passes in what the patches need (the names to accept, the default-cache factory).

Patches (each checks the exact function it wraps before wrapping it; patches/targets.py):
- flash_name.treat_as_not_flash: transformers >= 5.0 treats every attention name containing "flash" as a
  FlashAttention / Hub-kernel request and refuses "flashcore"; the wrapped check answers False for our names.
- generate_cache.install_default_cache_factory: `generate()` with no cache argument asks a factory first, so a
  flashcore model gets a PagedKVCache instead of a DynamicCache; an optional hook sees every generate() call
  (flashcore uses it to route decode steps through CUDA graphs).
- shared_prefill.install_shared_prefill: generate()'s prefill runs once per distinct prompt row and around hooks that
  let the cache restore and keep prompt prefixes (flashcore's PagedKVCache: copies share the prompt's pages; a
  PrefixCache keeps pages across calls).
- deferred_stop.install_deferred_stop_check: generate() reads its per-step stop flag one step late (transformers'
  DeferredStopCheck, which it enables on MPS only) for the caches a predicate accepts, so the host prepares the
  next decode step while the GPU runs this one (flashcore: a PagedKVCache on CUDA).

A patch whose target changed in the installed release does not apply and does not fail the import: its error is
kept (`failures()`) and, for the two patches flashcore needs, raised by a tripwire when a model asks for flashcore
(the shared prefill and the deferred stop check only save work: without them every row is prefilled, and the GPU
waits for the host between decode steps). `remove_transformers_patches()` puts transformers' original functions
back. Version facts live in versions.py.
"""
from __future__ import annotations

from .deferred_stop import install_deferred_stop_check
from .flash_name import guard_changed_flash_check, treat_as_not_flash
from .generate_cache import guard_changed_cache_preparation, install_default_cache_factory
from .shared_prefill import PrefillHooks, install_shared_prefill
from .targets import PatchTargetChanged, restore
from .versions import (CACHE_KWARG, POSITIVE_CROP_IS_LENGTH, TESTED_MAX, TESTED_MIN, UntestedTransformersWarning,
                       check_transformers_version)

_FAILURES: list[PatchTargetChanged] = []


def apply_transformers_patches(attn_names, default_cache_factory, on_generate=None, prefill_hooks=None,
                               defers_stop_check=None) -> None:
    """Check the installed transformers version, then apply the patches (idempotent).

    attn_names: attention-implementation names that are not FlashAttention although they contain "flash".
    default_cache_factory: factory(model, generation_config, batch_size, max_cache_length) -> Cache | None.
    on_generate: optional hook(model, generation_config) run at the start of every generate() (cache preparation).
    prefill_hooks: optional hook(model, model_kwargs) -> PrefillHooks | None of the shared prefill.
    defers_stop_check: optional predicate(device, cache) -> bool: generate() defers its stop check for that cache.
    A patch whose target changed is recorded in `failures()` and replaced by a tripwire (see module docstring).
    """
    import transformers

    check_transformers_version(transformers.__version__)
    names = tuple(attn_names)
    _FAILURES.clear()
    patches = [(lambda: treat_as_not_flash(names), guard_changed_flash_check),
               (lambda: install_default_cache_factory(default_cache_factory, on_generate),
                guard_changed_cache_preparation)]
    if prefill_hooks is not None:
        patches.append((lambda: install_shared_prefill(prefill_hooks), lambda names, error: None))
    if defers_stop_check is not None:
        patches.append((lambda: install_deferred_stop_check(defers_stop_check), lambda names, error: None))
    for apply, guard in patches:
        try:
            apply()
        except PatchTargetChanged as error:
            _FAILURES.append(error)
            guard(names, error)


def remove_transformers_patches() -> None:
    """Put back every transformers function the patches (or their tripwires) replaced (idempotent)."""
    from transformers import modeling_utils
    from transformers.generation.utils import DeferredStopCheck, GenerationMixin

    restore(modeling_utils, "is_flash_attention_requested")
    restore(GenerationMixin, "_prepare_cache_for_generation")
    restore(GenerationMixin, "_prefill")
    restore(DeferredStopCheck, "is_supported")
    _FAILURES.clear()


def failures() -> list[PatchTargetChanged]:
    """The patches that could not apply to the installed transformers (empty when all applied)."""
    return list(_FAILURES)


__all__ = ["CACHE_KWARG", "POSITIVE_CROP_IS_LENGTH", "PatchTargetChanged", "PrefillHooks", "TESTED_MAX",
           "TESTED_MIN", "UntestedTransformersWarning", "apply_transformers_patches", "check_transformers_version",
           "failures", "install_default_cache_factory", "install_deferred_stop_check", "install_shared_prefill",
           "remove_transformers_patches", "treat_as_not_flash"]
