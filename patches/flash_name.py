"""Let transformers 5.x accept attention implementations whose name contains "flash" but that are not FlashAttention.

transformers >= 5.0 decides "is FlashAttention requested?" with `"flash" in name`
(`transformers.utils.generic.is_flash_attention_requested`). `PreTrainedModel._check_and_adjust_attn_implementation`
(run by `from_pretrained`, `__init__` and `set_attn_implementation`) then calls `lazy_import_flash_attention(name)`,
which treats any unknown flash name as a Hub kernel repo and raises
`ValueError: Could not find the currently requested flash attention implementation at 'flashcore'`, even when
"flashcore" is registered in `AttentionInterface`. For models that list `_compatible_flash_implementations` it would
also silently swap the name for one of those kernels.

The fix is deliberately narrow: only the binding of `is_flash_attention_requested` inside `transformers.modeling_utils`
is wrapped, and it answers False for exactly the registered names (config-based and name-based calls alike). Every
use of that binding in modeling_utils is part of resolving the attention implementation, so nothing else in
model loading changes. The other modules keep the original function on purpose; see NOT_PATCHED for why each
remaining "flash"-dependent behaviour is harmless or useful for flashcore.
"""
from __future__ import annotations

import functools

from .targets import PatchTargetChanged, checked_target, install, install_tripwire

EXPECTED_PARAMETERS = ("config", "requested_attention_implementation", "version")
"""Signature of `is_flash_attention_requested` the patch was written against (patches/versions.py: tested range)."""

NOT_PATCHED = {
    "transformers.generation.utils": (
        "GenerationMixin keeps an all-ones 2-D attention mask when a StaticCache is used with a flash name; the "
        "flashcore mask function then knows the cache's valid length without a host sync. Auto-compile only "
        "downgrades fullgraph=True for flash names."),
    "transformers.masking_utils": (
        "create_chunked_causal_mask raises for flash names past the chunk size; flashcore refuses chunked-attention "
        "configs itself (attention_chunk_size), so the error never hides a wrong result."),
    "transformers.utils.generic.get_max_seqlen": (
        "only vision towers and exporters call it; it returns an extra kwarg the flashcore function ignores."),
    "transformers.generation.continuous_batching": (
        "continuous batching accepts flash names, builds no masks and passes its own PagedAttentionCache as "
        "kwargs['cache']; the flashcore attention function rejects that with a clear error. The "
        "flash_attn_with_kvcache fast path needs '.*flash.*[23]', which 'flashcore' does not match."),
    "transformers.models.*": (
        "Llama, Mistral, Qwen2 and Qwen3 never call is_flash_attention_requested; models that do (vision towers, "
        "bark, falcon, ...) are outside flashcore's supported families."),
}


def treat_as_not_flash(names: tuple[str, ...] | list[str]) -> None:
    """Make transformers' attention-implementation resolution treat `names` as non-FlashAttention names.

    Idempotent: a second call only extends the set of names. Raises PatchTargetChanged if the wrapped function is
    missing or has a different signature (a transformers upgrade changed what this patch relies on).
    """
    from transformers import modeling_utils

    current = getattr(modeling_utils, "is_flash_attention_requested", None)
    wrapped_names = getattr(current, "__flashcore_not_flash__", None)
    if wrapped_names is not None:
        wrapped_names.update(names)
        return
    original = checked_target(modeling_utils, "is_flash_attention_requested", EXPECTED_PARAMETERS,
                              "transformers.modeling_utils.is_flash_attention_requested", "patches/flash_name.py")
    not_flash = set(names)

    @functools.wraps(original)
    def is_flash_attention_requested(config=None, requested_attention_implementation=None, version=None):
        # Exactly one of the two sources names the implementation; the original raises on ambiguity.
        if (config is None) != (requested_attention_implementation is None):
            name = config._attn_implementation if config is not None else requested_attention_implementation
            if name in not_flash:
                return False
        return original(config=config, requested_attention_implementation=requested_attention_implementation,
                        version=version)

    is_flash_attention_requested.__flashcore_not_flash__ = not_flash
    install(modeling_utils, "is_flash_attention_requested", is_flash_attention_requested, original)


def guard_changed_flash_check(names: tuple[str, ...] | list[str], error: PatchTargetChanged) -> None:
    """The patch could not apply: make the changed check raise `error` whenever one of `names` is asked for (by
    name or through a config), so the user learns what changed instead of transformers' Hub-kernel error."""
    from transformers import modeling_utils

    wanted = set(names)

    def asks_for_flashcore(*args, **kwargs) -> bool:
        for value in (*args, *kwargs.values()):
            name = getattr(value, "_attn_implementation", value)
            if isinstance(name, str) and name in wanted:
                return True
        return False

    install_tripwire(modeling_utils, "is_flash_attention_requested", asks_for_flashcore, error)
