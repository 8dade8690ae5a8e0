"""The transformers patches (flashcore_hf.patches): they must apply, and fail loudly when an upgrade breaks them."""
from __future__ import annotations

import copy
import inspect
import warnings

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, modeling_utils
from transformers.generation.utils import GenerationMixin
from transformers.utils import generic

import flashcore_hf
from flashcore_hf import PagedKVCache, patches
from flashcore_hf.patches import flash_name, generate_cache

CONFIG = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=128, pad_token_id=0)


def tiny(attn_implementation="flashcore"):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(LlamaConfig(**CONFIG), attn_implementation=attn_implementation).eval()


# ---- the wrapped functions are still what the patches expect ---------------------------------------------------

def test_flash_check_has_expected_signature_and_is_wrapped():
    original = generic.is_flash_attention_requested
    assert tuple(inspect.signature(original).parameters) == flash_name.EXPECTED_PARAMETERS
    wrapped = modeling_utils.is_flash_attention_requested
    assert wrapped.__flashcore_original__ is original
    assert "flashcore" in wrapped.__flashcore_not_flash__


def test_patch_is_still_needed():
    """If this fails, transformers stopped treating "flashcore" as FlashAttention: the name patch can go."""
    assert generic.is_flash_attention_requested(requested_attention_implementation="flashcore")


def test_wrapped_check_only_changes_flashcore():
    check = modeling_utils.is_flash_attention_requested
    assert check(requested_attention_implementation="flashcore") is False
    assert check(config=tiny().config) is False
    assert check(requested_attention_implementation="flash_attention_2") is True
    assert check(requested_attention_implementation="flash_attention_2", version=3) is False
    assert check(requested_attention_implementation="sdpa") is False
    with pytest.raises(ValueError, match="ambiguous"):
        check(config=tiny().config, requested_attention_implementation="flashcore")


def test_generate_hook_has_expected_signature_and_is_wrapped():
    wrapped = GenerationMixin._prepare_cache_for_generation
    original = wrapped.__flashcore_original__
    assert tuple(inspect.signature(original).parameters) == generate_cache.EXPECTED_PARAMETERS
    assert tuple(inspect.signature(wrapped).parameters) == generate_cache.EXPECTED_PARAMETERS


def test_register_is_idempotent():
    flash_check, prepare = modeling_utils.is_flash_attention_requested, GenerationMixin._prepare_cache_for_generation
    flashcore_hf.register()
    assert modeling_utils.is_flash_attention_requested is flash_check
    assert GenerationMixin._prepare_cache_for_generation is prepare


def test_changed_target_is_refused(monkeypatch):
    def other(config=None, requested=None):
        return False

    monkeypatch.setattr(modeling_utils, "is_flash_attention_requested", other)
    with pytest.raises(RuntimeError, match="changed signature"):
        flash_name.treat_as_not_flash(("flashcore",))
    monkeypatch.delattr(modeling_utils, "is_flash_attention_requested")
    with pytest.raises(RuntimeError, match="no longer imports"):
        flash_name.treat_as_not_flash(("flashcore",))


# ---- what the patches make work -------------------------------------------------------------------------------

def test_unpatched_transformers_refuses_flashcore(monkeypatch):
    """The failure the name patch exists for (transformers >= 5.0 looks for a Hub flash kernel)."""
    monkeypatch.setattr(modeling_utils, "is_flash_attention_requested", generic.is_flash_attention_requested)
    with pytest.raises(ValueError, match="flash"):
        tiny()


def test_from_pretrained_and_set_attn_implementation(tmp_path):
    tiny("eager").save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="flashcore")
    assert model.config._attn_implementation == "flashcore"
    eager = AutoModelForCausalLM.from_pretrained(tmp_path)
    eager.set_attn_implementation("flashcore")
    assert eager.config._attn_implementation == "flashcore"
    ids = torch.randint(1, 128, (1, 6))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, eager(ids).logits)


def test_generate_default_cache_choice():
    model, ids = tiny(), torch.randint(1, 128, (2, 5))

    def cache_of(m, **kwargs):
        with torch.no_grad():
            out = m.generate(ids, max_new_tokens=2, do_sample=False, return_dict_in_generate=True, **kwargs)
        return out.past_key_values

    assert isinstance(cache_of(model), PagedKVCache)
    assert type(cache_of(model, cache_implementation="dynamic")) is DynamicCache  # an explicit choice wins
    assert cache_of(model, use_cache=False) is None
    assert type(cache_of(tiny("sdpa"))) is DynamicCache                             # other implementations
    explicit = DynamicCache(config=model.config)
    assert cache_of(model, past_key_values=explicit) is explicit


def test_static_cache_generate_keeps_the_mask_for_flash_names():
    """generate() keeps an all-ones 2-D mask for "flash" names with a StaticCache (a behaviour flashcore keeps)."""
    model = tiny()
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    ids = torch.randint(1, 128, (2, 6))
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=6, do_sample=False, cache_implementation="static")
        ref = eager.generate(ids, max_new_tokens=6, do_sample=False, cache_implementation="static")
    assert torch.equal(out, ref)


# ---- version guard --------------------------------------------------------------------------------------------

def test_installed_version_is_in_the_tested_range():
    version = patches.check_transformers_version(transformers.__version__)
    assert patches.TESTED_MIN <= version and version.release[:2] <= patches.TESTED_MAX.release[:2]


@pytest.mark.parametrize("version, outcome", [
    ("4.57.6", "error"), ("5.10.0", "warn"), ("5.17.0", "ok"), ("5.23.2", "ok"), ("5.24.0.dev0", "warn"),
    ("6.0.0", "warn")])
def test_version_guard(version, outcome):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if outcome == "error":
            with pytest.raises(ImportError, match="transformers >= 5.0"):
                patches.check_transformers_version(version)
            return
        patches.check_transformers_version(version)
    untested = [w for w in caught if issubclass(w.category, patches.UntestedTransformersWarning)]
    assert len(untested) == (1 if outcome == "warn" else 0)
