"""Everything flashcore changes in third-party code (transformers), in one place, applied by `import flashcore_hf`.

Shipped as `flashcore_hf.patches` (setup.py package_dir). Nothing here imports flashcore_hf: the integration layer
passes in what the patches need (the names to accept, the default-cache factory).

Patches (each checks the exact function it wraps and raises RuntimeError if a transformers upgrade changed it):
- flash_name.treat_as_not_flash: transformers >= 5.0 treats every attention name containing "flash" as a
  FlashAttention / Hub-kernel request and refuses "flashcore"; the wrapped check answers False for our names.
- generate_cache.install_default_cache_factory: `generate()` with no cache argument asks a factory first, so a
  flashcore model gets a PagedKVCache instead of a DynamicCache; an optional hook sees every generate() call
  (flashcore uses it to route decode steps through CUDA graphs).
"""
from __future__ import annotations

from .flash_name import treat_as_not_flash
from .generate_cache import install_default_cache_factory
from .versions import TESTED_MAX, TESTED_MIN, UntestedTransformersWarning, check_transformers_version


def apply_transformers_patches(attn_names, default_cache_factory, on_generate=None) -> None:
    """Check the installed transformers version, then apply both patches (idempotent).

    attn_names: attention-implementation names that are not FlashAttention although they contain "flash".
    default_cache_factory: factory(model, generation_config, batch_size, max_cache_length) -> Cache | None.
    on_generate: optional hook(model, generation_config) run at the start of every generate() (cache preparation).
    """
    import transformers

    check_transformers_version(transformers.__version__)
    treat_as_not_flash(tuple(attn_names))
    install_default_cache_factory(default_cache_factory, on_generate)


__all__ = ["TESTED_MAX", "TESTED_MIN", "UntestedTransformersWarning", "apply_transformers_patches",
           "check_transformers_version", "install_default_cache_factory", "treat_as_not_flash"]
