"""Model families beyond the Llama-style core: every attention kwarg a family passes is implemented or refused.

`attention_kwargs.py` classifies every kwarg of transformers' attention-function protocol; this file records the
kwargs each tested family actually passes in the installed transformers and fails when one is in no class, and
checks that what flashcore does not implement is refused with an error naming the feature and the model.
"""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM, DynamicCache

import flashcore_hf
from flashcore_hf import CACHE_KWARG
from flashcore_hf.hf import attention_kwargs
from flashcore_hf.hf.integration import flashcore_attention_forward

VOCAB = 128
SMALL = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, vocab_size=VOCAB, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
             eos_token_id=2)
FAMILY_CONFIGS = {
    "llama": {}, "mistral": dict(sliding_window=5), "qwen2": {}, "qwen3": {}, "gemma": {},
    "gemma2": dict(attn_logit_softcapping=5.0, query_pre_attn_scalar=1, sliding_window=6),
    "gemma3_text": dict(sliding_window=6),
    "gpt_oss": dict(sliding_window=6, num_local_experts=4, num_experts_per_tok=2), "phi3": {}, "olmo2": {},
    "gpt_neox": {},
    "gpt2": dict(n_layer=2, n_embd=64, n_head=4),
}
"""model_type -> config overrides (on top of SMALL, except GPT-2 which has its own names)."""


def family_config(model_type: str, **extra):
    overrides = {**FAMILY_CONFIGS[model_type], **extra}
    if model_type == "gpt2":
        return AutoConfig.for_model(model_type, vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                    **overrides)
    return AutoConfig.for_model(model_type, **{**SMALL, **overrides})


def available(model_type: str) -> bool:
    try:
        AutoConfig.for_model(model_type)
    except (ValueError, KeyError):
        return False
    return True


def build(model_type: str, attn_implementation: str = "flashcore", **extra):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(family_config(model_type, **extra),
                                            attn_implementation=attn_implementation, dtype=torch.float32).eval()


@pytest.fixture
def recorded_kwargs():
    """Record the kwargs every attention call passes (then run flashcore's function as usual)."""
    seen: dict[str, object] = {}

    def recording(module, query, key, value, attention_mask, **kwargs):
        seen.update(kwargs)
        return flashcore_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("flashcore", recording)
    yield seen
    AttentionInterface.register("flashcore", flashcore_attention_forward)


@pytest.mark.parametrize("model_type", sorted(FAMILY_CONFIGS))
def test_every_kwarg_a_family_passes_is_classified(model_type, recorded_kwargs):
    if not available(model_type):
        pytest.skip(f"transformers {flashcore_hf.patches.versions.installed_version()} has no {model_type}")
    model = build(model_type)
    ids = torch.randint(3, VOCAB, (2, 7))
    with torch.no_grad():
        try:
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False)
        except NotImplementedError:
            pass                                   # refused: the kwargs seen up to the refusal are recorded
    known = attention_kwargs.IMPLEMENTED | attention_kwargs.IGNORED | set(attention_kwargs.REFUSED)
    unknown = sorted(set(recorded_kwargs) - known)
    assert not unknown, (f"{model_type} passes attention kwargs flashcore neither implements nor refuses: "
                         f"{unknown}; classify them in flashcore_hf/attention_kwargs.py")


def test_refused_and_unknown_kwargs_name_feature_and_model():
    model = build("llama")
    attn = model.model.layers[0].self_attn
    q, kv = torch.randn(1, 4, 3, 16), torch.randn(1, 2, 3, 16)
    with pytest.raises(NotImplementedError, match="additive attention bias.*'position_bias' from LlamaAttention"):
        flashcore_attention_forward(attn, q, kv, kv, None, position_bias=torch.zeros(1))
    with pytest.raises(NotImplementedError, match="LlamaAttention passes the attention kwarg 'new_feature'"):
        flashcore_attention_forward(attn, q, kv, kv, None, new_feature=3)
    out, _ = flashcore_attention_forward(attn, q, kv, kv, None, new_feature=None, position_bias=None)
    assert out.shape == (1, 3, 4, 16)


# ---- the family matrix: logits and greedy tokens vs eager --------------------------------------------------------

WINDOWED = {"mistral", "gemma2", "gemma3_text", "gpt_oss"}
"""Families whose configs here have sliding-window layers (window 5 or 6)."""


def model_pair(model_type: str, **extra):
    """(flashcore model, eager model), same weights, fp32, eval. Gemma2's q/k projections are scaled up so its
    attention scores exceed the softcap (5); GPT-OSS gets non-zero sinks."""
    model = build(model_type, **extra)
    with torch.no_grad():
        for module in model.modules():
            if model_type == "gemma2" and hasattr(module, "q_proj"):
                module.q_proj.weight.mul_(4.0)
                module.k_proj.weight.mul_(4.0)
            if model_type == "gpt_oss" and hasattr(module, "sinks"):
                module.sinks.copy_(2.0 * torch.randn_like(module.sinks))
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    return model, eager


def padded(pattern: str, width: int, seed: int):
    """input_ids [3, width] and a mask with `pattern` padding ("left", "right", "holes")."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (3, width), generator=g)
    mask = torch.ones(3, width, dtype=torch.long)
    if pattern == "left":
        mask[0, :3] = mask[1, :1] = 0
    elif pattern == "right":
        mask[0, width - 3:] = mask[2, width - 1:] = 0
    elif pattern == "holes":
        mask[0, 1:3] = mask[1, width - 3:width - 2] = 0
    return ids.masked_fill(mask == 0, 0), mask


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("model_type", sorted(FAMILY_CONFIGS))
@pytest.mark.parametrize("pattern", ["left", "right", "holes"])
def test_family_logits_and_tokens_match_eager(model_type, pattern):
    """Logits of the real tokens vs eager (rel < 1e-4) through the default PagedKVCache and DynamicCache, and the
    same greedy tokens. Windowed layers count their window in real tokens (as FlashAttention's varlen path does) while
    eager also counts padding columns, so with right padding or holes the windowed families get a window (16) that
    covers prompt and answer; with left padding their windows (5-6) cut."""
    if not available(model_type):
        pytest.skip(f"no {model_type} in this transformers")
    wide = model_type in WINDOWED and pattern != "left"
    model, eager = model_pair(model_type, **({"sliding_window": 16} if wide else {}))
    width = 9
    ids, mask = padded(pattern, width, seed=len(model_type))
    real = mask.bool()
    with torch.no_grad():
        ref = eager(ids, attention_mask=mask).logits[real]
        for cache in (flashcore_hf.PagedKVCache(model.config, page_size=4), DynamicCache(config=model.config)):
            out = model(ids, attention_mask=mask, **{CACHE_KWARG: cache}).logits[real]
            assert rel_err(out, ref) < 1e-4, type(cache).__name__
        want = eager.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        paged = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        dense = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                               cache_implementation="dynamic")
    assert torch.equal(paged, want) and torch.equal(dense, want)


def test_softcap_and_sinks_matter():
    """The features are really exercised: without them the logits differ from eager's."""
    for model_type, feature in (("gemma2", "softcap"), ("gpt_oss", "s_aux")):
        if not available(model_type):
            continue
        model, eager = model_pair(model_type)
        ids = torch.randint(3, VOCAB, (1, 9))

        def without_feature(module, query, key, value, attention_mask, **kwargs):
            kwargs.pop(feature, None)
            return flashcore_attention_forward(module, query, key, value, attention_mask, **kwargs)

        with torch.no_grad():
            ref = eager(ids).logits
            assert rel_err(model(ids).logits, ref) < 1e-4
            AttentionInterface.register("flashcore", without_feature)
            try:
                assert rel_err(model(ids).logits, ref) > 1e-3, model_type
            finally:
                AttentionInterface.register("flashcore", flashcore_attention_forward)
