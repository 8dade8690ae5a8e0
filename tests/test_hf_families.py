"""Model families beyond the Llama-style core: every attention kwarg a family passes is implemented or refused.

`attention_kwargs.py` classifies every kwarg of transformers' attention-function protocol; this file records the
kwargs each tested family actually passes in the installed transformers and fails when one is in no class, and
checks that what flashcore does not implement is refused with an error naming the feature and the model.
"""
from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM

import flashcore_hf
from flashcore_hf import attention_kwargs
from flashcore_hf.integration import flashcore_attention_forward

VOCAB = 128
SMALL = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, vocab_size=VOCAB, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
             eos_token_id=2)
FAMILY_CONFIGS = {
    "llama": {}, "mistral": dict(sliding_window=5), "qwen2": {}, "qwen3": {}, "gemma": {},
    "gemma2": dict(attn_logit_softcapping=5.0, sliding_window=6), "gemma3_text": dict(sliding_window=6),
    "gpt_oss": dict(sliding_window=6, num_local_experts=4, num_experts_per_tok=2), "phi3": {}, "olmo2": {},
    "gpt_neox": {},
    "gpt2": dict(n_layer=2, n_embd=64, n_head=4),
}
"""model_type -> config overrides (on top of SMALL, except GPT-2 which has its own names)."""


def family_config(model_type: str):
    overrides = FAMILY_CONFIGS[model_type]
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


def build(model_type: str, attn_implementation: str = "flashcore"):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(family_config(model_type), attn_implementation=attn_implementation,
                                            dtype=torch.float32).eval()


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


@pytest.mark.parametrize("model_type, feature", [("gemma2", "softcapping"), ("gpt_oss", "sinks")])
def test_unimplemented_family_features_are_refused(model_type, feature):
    if not available(model_type):
        pytest.skip(f"no {model_type} in this transformers")
    model = build(model_type)
    ids = torch.randint(3, VOCAB, (1, 5))
    with torch.no_grad(), pytest.raises(NotImplementedError, match=f"{feature}.*Attention"):
        model(ids)
