"""Registers the "flashcore" attention implementation with transformers (run by `import flashcore_hf`).

- `AttentionInterface.register("flashcore", flashcore_attention_forward)`: the attention function, one call of
  `FlashCoreAttention`.
- `AttentionMaskInterface.register("flashcore", flashcore_mask)`: never a dense [B, 1, S, S] mask; None or the 2-D
  padding mask, which reaches the attention function and, through it, the PagedKVCache step plan.
- the transformers patches (flashcore_hf.patches): the "flash" name check, and `generate()` building a
  `PagedKVCache` when a flashcore model is given no cache (options: `set_default_cache_options`).

Unsupported uses fail loudly instead of computing something else:
- output_attentions=True: ValueError (the kernels never materialize attention weights); use
  `model.set_attn_implementation("eager")` for the call that needs them.
- training: RuntimeError for a forward with gradients enabled on a model in training mode, or with attention dropout
  (inference only). A forward with gradients enabled in eval mode runs (eval scripts often skip no_grad), and a
  backward through the attention raises.
- transformers' continuous batching (`generate_batch`), chunked attention (`attention_chunk_size`, Llama 4) and every
  attention kwarg flashcore does not implement (attention_kwargs.py: refused and unknown names): NotImplementedError
  naming the feature and the model.
- custom 4-D masks / BlockMask: ValueError.
- a dtype or head dim the CUDA kernels lack (e.g. float32 on CUDA): not an error; a one-time
  FlashCoreFallbackWarning and torch SDPA on K/V gathered from the pages (see attention.py).
"""
from __future__ import annotations

import itertools
import weakref

import torch
from transformers import AttentionInterface, AttentionMaskInterface

from ..cache import SUPPORTED_LAYER_TYPES, PagedKVCache, PrefixCache
from ..patches import CACHE_KWARG, PrefillHooks, apply_transformers_patches, remove_transformers_patches
from ..sparse.config import SparseConfig
from .attention import FlashCoreAttention
from .attention_kwargs import check_attention_kwargs
from .compiled_forward import step_attention, tracing_compiled_step
from .decode_graphs import defers_stop_check, pool_arena, prepare_for_generate, remove_runners

ATTN_IMPLEMENTATION = "flashcore"
"""The name to pass as `attn_implementation`."""

_ATTENTION = FlashCoreAttention()
_DEFAULT_CACHE_OPTIONS: dict = {"page_size": 64, "num_pages": None, "max_num_pages": None, "sparse": None,
                                 "share_prefixes": True, "prefix_cache": None}


def flashcore_attention_forward(module: torch.nn.Module, query: torch.Tensor, key, value, attention_mask,
                                dropout: float = 0.0, scaling: float | None = None,
                                sliding_window: int | None = None, is_causal: bool | None = None,
                                **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function: (out [B, S, Hq, D], None).

    query [B, Hq, S, D]; key/value: what the cache's update returned (dense [B, Hkv, S_kv, D] or a PagedKVHandle);
    attention_mask: what `flashcore_mask` built (None or 2-D). kwargs: classified in attention_kwargs.py (anything
    refused or unknown raises NotImplementedError naming it and the model before any work).
    """
    config = getattr(module, "config", None)
    cu_seq_lens_q = kwargs.get("cu_seq_lens_q")
    cu_seq_lens_k = kwargs.get("cu_seq_lens_k")
    if cu_seq_lens_k is not None and cu_seq_lens_q is not None and (
            cu_seq_lens_k is cu_seq_lens_q or torch.equal(cu_seq_lens_k, cu_seq_lens_q)):
        kwargs = {k: v for k, v in kwargs.items() if k not in ("cu_seq_lens_k", "max_length_k")}  # packed, no cache
    check_attention_kwargs(module, kwargs)
    if kwargs.get("output_attentions") or getattr(config, "output_attentions", False):
        raise ValueError(
            "flashcore never materializes attention weights, so output_attentions=True is not supported; call "
            "model.set_attn_implementation('eager') for the forward that needs them (and 'flashcore' afterwards).")
    if module.training and torch.is_grad_enabled():
        raise RuntimeError(
            "flashcore is inference-only (its kernels have no backward pass) and this module is in training mode "
            "with gradients enabled; call model.eval() or run under torch.no_grad(), or train with "
            "attn_implementation='sdpa'.")
    if dropout:
        raise RuntimeError(
            f"flashcore is inference-only: attention dropout {dropout} is active because the module is in training "
            "mode; call model.eval(), or train with attn_implementation='sdpa'.")
    if getattr(config, "attention_chunk_size", None):
        raise NotImplementedError("flashcore does not implement chunked attention (config.attention_chunk_size); "
                                  "use attn_implementation='sdpa' for this model.")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    if tracing_compiled_step():  # a compiled forward (compiled_forward.py): key/value are the layer's new K/V
        out = step_attention(module, query, key, value, attention_mask, scaling=scaling,
                             sliding_window=sliding_window, is_causal=is_causal, softcap=kwargs.get("softcap"),
                             sinks=kwargs.get("s_aux"))
        return out, None
    out = _ATTENTION(query, key, value, attention_mask, scaling=scaling, sliding_window=sliding_window,
                     is_causal=is_causal, softcap=kwargs.get("softcap"), sinks=kwargs.get("s_aux"),
                     position_ids=kwargs.get("position_ids"), cu_seq_lens=kwargs.get("cu_seq_lens_q"))
    return out, None


def flashcore_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset: int = 0,
                   mask_function=None, attention_mask: torch.Tensor | None = None, **kwargs):
    """transformers mask function for "flashcore": None (every key valid) or a 2-D bool mask [B, M], M <= kv_length.

    With a padding mask [B, past + S]: its last kv_length columns (fewer when a StaticCache is not full: the cache
    slots past them hold nothing yet). Without one: None, unless the cache hands attention more slots than it has
    filled (StaticCache), then ones [B, filled]; a StaticCache reports its length as a device tensor, so that case
    costs one host sync per forward. Causality and sliding windows are applied by the kernels, not by a mask.
    """
    if attention_mask is not None:
        return attention_mask[:, -kv_length:]
    filled = q_offset + q_length - kv_offset
    if isinstance(filled, torch.Tensor):
        filled = int(filled)
    if filled >= kv_length:
        return None
    return torch.ones(batch_size, filled, dtype=torch.bool, device=kwargs.get("device"))


def set_default_cache_options(*, page_size: int | None = None, num_pages: int | None = None,
                              max_num_pages: int | None = None, sparse: SparseConfig | None = None,
                              share_prefixes: bool | None = None, prefix_cache: PrefixCache | bool | None = None
                              ) -> dict:
    """Options of the PagedKVCache that generate() builds for flashcore models given no cache (process-wide).

    page_size (default 64), num_pages (default None: grows on demand), max_num_pages (growth limit), sparse (a
    flashcore_hf.SparseConfig: sparse page selection for decode steps; default None = dense; pass
    SparseConfig() to return to dense), share_prefixes (default True: rows repeating a prompt share its pages,
    prefilled once and read once per decode step; see PagedKVCache), prefix_cache (a flashcore_hf.PrefixCache kept
    across generate() calls: prompts starting with kept pages prefill only the rest; False: none, the default). Pass
    an explicit PagedKVCache to generate() for
    per-call control
    (`model.generate(ids, **{flashcore_hf.CACHE_KWARG: PagedKVCache(...)})`). Returns the options in force.
    """
    if page_size is not None:
        if int(page_size) < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        _DEFAULT_CACHE_OPTIONS["page_size"] = int(page_size)
    if num_pages is not None and max_num_pages is not None:
        raise ValueError("give num_pages (a fixed pool) or max_num_pages (a growth limit), not both")
    if num_pages is not None:
        _DEFAULT_CACHE_OPTIONS.update(num_pages=int(num_pages), max_num_pages=None)
    if max_num_pages is not None:
        _DEFAULT_CACHE_OPTIONS.update(num_pages=None, max_num_pages=int(max_num_pages))
    if sparse is not None:
        if not isinstance(sparse, SparseConfig):
            raise TypeError(f"sparse must be a flashcore_hf.SparseConfig, got {type(sparse).__name__}")
        _DEFAULT_CACHE_OPTIONS["sparse"] = sparse
    if share_prefixes is not None:
        _DEFAULT_CACHE_OPTIONS["share_prefixes"] = bool(share_prefixes)
    if prefix_cache is not None:
        if prefix_cache is not False and not isinstance(prefix_cache, PrefixCache):
            raise TypeError(f"prefix_cache must be a flashcore_hf.PrefixCache or False, got {type(prefix_cache).__name__}")
        _DEFAULT_CACHE_OPTIONS["prefix_cache"] = prefix_cache or None
    return dict(_DEFAULT_CACHE_OPTIONS)


class _PagedPrefill(PrefillHooks):
    """generate()'s prefill with a PagedKVCache (patches/shared_prefill.py): rows repeating a prompt are prefilled
    once and share its pages (`share_prefixes`; reference counts, copy-on-write on the first partly filled page a
    row appends to), which is also what lets decode read a shared prompt once per step; with a PrefixCache, prompts
    without padding get their longest kept prefix copied in first (transformers then prefills only the rest) and
    leave their full pages for later calls."""

    def __init__(self, cache: PagedKVCache, model):
        self.cache = cache
        self.share_rows = cache.share_prefixes
        self.model_key = None  # what names the model's K/V for the prefix cache (only with one)
        if cache.prefix_cache is not None:
            parameters = list(model.parameters())
            self.model_key = (_model_id(model), str(parameters[0].dtype), str(parameters[0].device),
                              _weights_version(parameters))
        self.prompts: list[list[int]] | None = None   # the prefilled rows' token ids, read once in before()

    def before(self, input_ids, model_kwargs) -> int:
        """With a prefix cache and no padding in any row (prefixes are kept and reused only then): restore the kept
        prefix of the prompts."""
        mask = model_kwargs.get("attention_mask")
        if self.cache.prefix_cache is None or (mask is not None and not bool(mask.all())):
            return 0
        self.prompts = input_ids.tolist()
        return self.cache.restore_prefix(self.prompts, self.model_key)

    def after(self, input_ids, model_kwargs, rows) -> None:
        if self.prompts is not None:
            self.cache.store_prefix(self.prompts, self.model_key)
        if rows is not None:
            self.cache.batch_select_indices(rows)


_MODEL_IDS: "weakref.WeakKeyDictionary[torch.nn.Module, int]" = weakref.WeakKeyDictionary()
_NEXT_MODEL_ID = itertools.count()


def _model_id(model) -> int:
    """A number that names this model object for as long as it lives (unlike id(), never reused by another)."""
    if model not in _MODEL_IDS:
        _MODEL_IDS[model] = next(_NEXT_MODEL_ID)
    return _MODEL_IDS[model]


def _weights_version(parameters: list[torch.Tensor]) -> tuple[int, int]:
    """(parameter count, the sum of their version counters): changes whenever a weight is modified in place (an
    optimizer step, load_state_dict, a manual edit) or parameters are added or removed, so K/V kept by a PrefixCache
    under the old weights is never reused. Parameters made under torch.inference_mode() keep no version counter;
    their in-place changes are not seen (PrefixCache.clear() is then the user's part)."""
    try:
        return len(parameters), sum(p._version for p in parameters)
    except RuntimeError:
        return len(parameters), -1


def paged_prefill_hooks(model, model_kwargs) -> _PagedPrefill | None:
    """The prefill hooks for a flashcore model whose generate() starts with an empty PagedKVCache, else None."""
    text_config = model.config.get_text_config(decoder=True)
    cache = model_kwargs.get(CACHE_KWARG)
    if text_config._attn_implementation != ATTN_IMPLEMENTATION or not isinstance(cache, PagedKVCache):
        return None
    if cache.get_seq_length() != 0 or not (cache.share_prefixes or cache.prefix_cache is not None):
        return None
    return _PagedPrefill(cache, model)


def default_generate_cache(model, generation_config, batch_size: int, max_cache_length: int):
    """generate()'s default cache: a PagedKVCache for flashcore models whose layers it can hold, else None."""
    text_config = model.config.get_text_config(decoder=True)
    if text_config._attn_implementation != ATTN_IMPLEMENTATION:
        return None
    layer_types = getattr(text_config, "layer_types", None) or ["full_attention"]
    if any(t not in SUPPORTED_LAYER_TYPES for t in layer_types):
        return None
    options = dict(_DEFAULT_CACHE_OPTIONS)
    if options["num_pages"] is None:
        options.pop("num_pages")
    else:
        options.pop("max_num_pages")
    return PagedKVCache(model.config, expected_max_length=max_cache_length, pool_arena=pool_arena(model), **options)


def register() -> None:
    """Register "flashcore" in AttentionInterface and AttentionMaskInterface and apply the patches (idempotent; run
    by `import flashcore_hf`, and again after `unpatch()` to turn flashcore back on)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, flashcore_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, flashcore_mask)
    apply_transformers_patches((ATTN_IMPLEMENTATION,), default_generate_cache, prepare_for_generate,
                               paged_prefill_hooks, defers_stop_check)


def unpatch() -> None:
    """Undo everything `import flashcore_hf` changed in transformers: the original functions are back, "flashcore" is
    no longer a registered attention implementation, and models whose decode steps ran through CUDA graphs get
    their own forward back. Models still set to "flashcore" must be switched first
    (`model.set_attn_implementation("sdpa")`). `register()` applies everything again."""
    remove_transformers_patches()
    for interface in (AttentionInterface, AttentionMaskInterface):
        interface._global_mapping.pop(ATTN_IMPLEMENTATION, None)
    remove_runners()
