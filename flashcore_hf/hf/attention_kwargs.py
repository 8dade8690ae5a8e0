"""Which keyword arguments of transformers' attention-function protocol flashcore implements, ignores or refuses.

transformers' attention modules call `attention_interface(module, query, key, value, attention_mask, **kwargs)`,
and a model family may pass anything that changes the result (a softcap, sinks, a position bias, continuous
batching's block tables, ...). A kwarg flashcore does not implement must never be dropped silently: every name is
classified here, and `check_attention_kwargs` raises for refused names and for names it has never seen (an unknown
kwarg may change attention's result in a way the kernels would not reproduce). tests/test_hf_families.py records the
kwargs every tested family passes in the installed transformers and fails on a name that is in none of the sets.
"""
from __future__ import annotations

IMPLEMENTED = frozenset({
    "dropout",          # must be 0 (inference only); checked by the attention function
    "scaling",          # softmax scale
    "sliding_window",   # window in positions, applied by the kernels
    "is_causal",        # causal (bottom-right) or not
    "softcap",          # Gemma 2/3 attention-logit softcapping, in the kernels
    "s_aux",            # GPT-OSS per-head attention sinks, in the kernels
    "position_ids",     # only read to detect packed sequences in one row (cu_seq_lens_q's role)
    "cu_seq_lens_q",    # packed sequences without a cache
    "output_attentions",  # refused when true by the attention function (no weights are materialised)
})
"""Kwargs whose meaning the flashcore attention function implements (or checks itself)."""

IGNORED = frozenset({
    "use_cache", "output_hidden_states", "return_dict", "output_router_logits", "cache_position",
    "token_type_ids", "max_length_q",
})
"""Kwargs that travel through the attention call but do not change attention's result."""

_CONTINUOUS_BATCHING = ("transformers' continuous-batching protocol (generate_batch)",
                        "use model.generate(...), which runs flashcore on a PagedKVCache")
_OTHER_ATTENTION = "load this model with attn_implementation='sdpa' or 'eager'"

REFUSED = {
    "cache": _CONTINUOUS_BATCHING,
    "block_table": _CONTINUOUS_BATCHING,
    "read_index": _CONTINUOUS_BATCHING,
    "write_index": _CONTINUOUS_BATCHING,
    "cu_seq_lens_k": ("key sequence boundaries that differ from the query ones (continuous batching, packed K/V "
                      "with a cache)", _OTHER_ATTENTION),
    "max_length_k": ("key sequence lengths that differ from the query ones", _OTHER_ATTENTION),
    "position_bias": ("an additive attention bias (relative positions, ALiBi)", _OTHER_ATTENTION),
    "attention_bias": ("an additive attention bias", _OTHER_ATTENTION),
    "alibi": ("ALiBi attention biases", _OTHER_ATTENTION),
    "head_mask": ("a per-head mask", _OTHER_ATTENTION),
}
"""Kwargs that change attention's result in a way flashcore does not implement: (feature, what to do instead)."""


def check_attention_kwargs(module, kwargs: dict) -> None:
    """Raise NotImplementedError naming the feature and the model for a refused or unknown kwarg with a value.

    Kwargs passed as None (or False) request nothing and are accepted whatever their name.
    """
    for name, value in kwargs.items():
        if name in IMPLEMENTED or name in IGNORED or value is None or value is False:
            continue
        model = type(module).__name__
        refused = REFUSED.get(name)
        if refused is not None:
            feature, instead = refused
            raise NotImplementedError(f"flashcore does not implement {feature} (attention kwarg {name!r} from "
                                      f"{model}); {instead}.")
        raise NotImplementedError(
            f"{model} passes the attention kwarg {name!r}, which flashcore does not know: it may change attention's "
            "result in a way flashcore's kernels would not reproduce. Use attn_implementation='sdpa' or 'eager' for "
            "this model, and report it so flashcore can implement or classify it (flashcore_hf/attention_kwargs.py).")
