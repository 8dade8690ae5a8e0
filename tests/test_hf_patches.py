"""The transformers patches (flashcore_hf.patches): they must apply, and fail loudly when an upgrade breaks them."""
from __future__ import annotations

import copy
import inspect
import warnings

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, modeling_utils
from transformers.generation.utils import DeferredStopCheck, GenerationMixin
from transformers.utils import generic

import flashcore_hf
from flashcore_hf import CACHE_KWARG
from flashcore_hf import PagedKVCache, patches
from flashcore_hf.patches import deferred_stop, flash_name, generate_cache

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


def test_deferred_stop_check_has_expected_signature_and_is_wrapped():
    original = DeferredStopCheck.is_supported.__flashcore_original__
    assert isinstance(original, staticmethod)
    assert tuple(inspect.signature(original.__func__).parameters) == deferred_stop.EXPECTED_PARAMETERS
    assert isinstance(inspect.getattr_static(DeferredStopCheck, "is_supported"), staticmethod)


def test_deferred_stop_check_only_for_paged_caches_on_cuda(monkeypatch):
    """The wrapped check says yes for a PagedKVCache on CUDA (no GPU needed: it reads the device type) while CUDA
    graphs are on, never for an assistant, and leaves every other case to transformers (MPS only)."""
    paged, cuda, cpu = PagedKVCache(tiny().config), torch.device("cuda"), torch.device("cpu")
    check = DeferredStopCheck.is_supported
    original = check.__flashcore_original__.__func__
    assert check(cuda, paged, True, is_assistant=False) is True
    assert check(cuda, paged, True, is_assistant=True) is False
    assert check(cpu, paged, False, is_assistant=False) is False
    dynamic = DynamicCache()
    for device in (cuda, cpu, torch.device("mps")):
        assert check(device, dynamic, True, is_assistant=False) == original(device, dynamic, True, False)
    spread = PagedKVCache(tiny().config)                    # a model spread over devices: pools elsewhere

    class _Pools:
        k_pool = v_pool = torch.empty(0, device="meta")

    spread.layers[1].pools = _Pools()
    assert check(cuda, spread, True, is_assistant=False) is False
    monkeypatch.setattr(flashcore_hf.hf.decode_graphs, "_ENABLED", False)
    assert check(cuda, paged, True, is_assistant=False) is False


def test_register_is_idempotent():
    flash_check, prepare = modeling_utils.is_flash_attention_requested, GenerationMixin._prepare_cache_for_generation
    stop_check = DeferredStopCheck.is_supported
    flashcore_hf.register()
    assert modeling_utils.is_flash_attention_requested is flash_check
    assert GenerationMixin._prepare_cache_for_generation is prepare
    assert DeferredStopCheck.is_supported is stop_check


def test_changed_target_is_refused(monkeypatch):
    def other(config=None, requested=None):
        return False

    monkeypatch.setattr(modeling_utils, "is_flash_attention_requested", other)
    with pytest.raises(RuntimeError, match="changed signature"):
        flash_name.treat_as_not_flash(("flashcore",))
    monkeypatch.delattr(modeling_utils, "is_flash_attention_requested")
    with pytest.raises(patches.PatchTargetChanged, match="is_flash_attention_requested is gone"):
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
        return getattr(out, CACHE_KWARG)

    assert isinstance(cache_of(model), PagedKVCache)
    assert type(cache_of(model, cache_implementation="dynamic")) is DynamicCache  # an explicit choice wins
    assert cache_of(model, use_cache=False) is None
    assert type(cache_of(tiny("sdpa"))) is DynamicCache                             # other implementations
    explicit = DynamicCache(config=model.config)
    assert cache_of(model, **{CACHE_KWARG: explicit}) is explicit


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


# ---- version policy ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("version, outcome", [
    ("4.57.6", "error"), ("5.10.0", "warn"), ("5.17.0", "ok"), (f"{patches.TESTED_MAX.major}.{patches.TESTED_MAX.minor}.3",
                                                              "ok"), ("99.0.0", "warn")])
def test_version_guard(version, outcome):
    """Releases outside the tested range warn (newer ones are never an error); only pre-5.0 is refused."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if outcome == "error":
            with pytest.raises(ImportError, match="transformers >= 5.0"):
                patches.check_transformers_version(version)
            return
        patches.check_transformers_version(version)
    untested = [w for w in caught if issubclass(w.category, patches.UntestedTransformersWarning)]
    assert len(untested) == (1 if outcome == "warn" else 0)


def test_every_patch_applied():
    assert patches.failures() == []


def test_cache_kwarg_is_what_generate_uses():
    """CACHE_KWARG is the name generate() puts the cache under for the model (the one the installed release uses)."""
    seen = {}
    model = tiny()
    original = model.prepare_inputs_for_generation

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    model.prepare_inputs_for_generation = spy
    with torch.no_grad():
        model.generate(torch.randint(1, 128, (1, 4)), max_new_tokens=2, do_sample=False)
    assert isinstance(seen.get(CACHE_KWARG), PagedKVCache)


def _deprecations(caught):
    return [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))
            and ("cache" in str(w.message) or "past_key_values" in str(w.message))]


def test_no_deprecation_warnings_on_our_paths():
    """generate() with the default PagedKVCache, an explicit one, and a forward with the cache: no cache-name
    deprecation warning from our code (stock sdpa emits none either)."""
    model, ids = tiny(), torch.randint(1, 128, (2, 5))
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        out = model.generate(ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        cache = getattr(out, CACHE_KWARG)
        model.generate(ids, max_new_tokens=3, do_sample=False, **{CACHE_KWARG: PagedKVCache(model.config)})
        model(ids, **{CACHE_KWARG: PagedKVCache(model.config)})
    assert isinstance(cache, PagedKVCache)
    assert _deprecations(caught) == []


# ---- a transformers release that changed a patched function ---------------------------------------------------

@pytest.fixture
def changed_transformers(monkeypatch):
    """Both patched functions replaced by versions with another signature, then flashcore registered again; the
    real patches come back afterwards."""
    def is_flash_attention_requested(config=None, requested_attention_implementation=None, version=None,
                                     new_argument=None):
        return generic.is_flash_attention_requested(config, requested_attention_implementation, version)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size,
                                      max_cache_length, new_argument=None):
        return original_prepare(self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length)

    original_prepare = GenerationMixin._prepare_cache_for_generation.__flashcore_original__
    flashcore_hf.unpatch()
    monkeypatch.setattr(modeling_utils, "is_flash_attention_requested", is_flash_attention_requested)
    monkeypatch.setattr(GenerationMixin, "_prepare_cache_for_generation", _prepare_cache_for_generation)
    flashcore_hf.register()
    yield
    flashcore_hf.unpatch()
    monkeypatch.undo()
    flashcore_hf.register()
    assert patches.failures() == []


def test_changed_target_keeps_import_and_ops_working(changed_transformers):
    assert {type(e) for e in patches.failures()} == {patches.PatchTargetChanged}
    q, k = torch.randn(3, 2, 8), torch.randn(2, 4, 1, 8)
    layout = flashcore_hf.PageLayout(*(torch.tensor(x, dtype=torch.int32) for x in ([0, 2], [0, 1], [4, 3], [-1, -1])))
    out = flashcore_hf.paged_attention(q, k, k, layout, torch.tensor([0, 3], dtype=torch.int32))
    assert torch.isfinite(out).all()
    tiny("sdpa")                                                           # other implementations are unaffected


def test_changed_target_is_reported_when_flashcore_is_asked_for(changed_transformers):
    with pytest.raises(patches.PatchTargetChanged, match="is_flash_attention_requested.*changed signature"):
        tiny("flashcore")
    model = tiny("sdpa")
    with torch.no_grad():
        model.generate(torch.randint(1, 128, (1, 4)), max_new_tokens=2, do_sample=False)   # stock generate works
    model.config._attn_implementation = "flashcore"    # as if the name check had let it through
    with pytest.raises(patches.PatchTargetChanged, match="_prepare_cache_for_generation.*changed signature"):
        model.generate(torch.randint(1, 128, (1, 4)), max_new_tokens=2, do_sample=False)


# ---- unpatch ---------------------------------------------------------------------------------------------------

def test_unpatch_restores_stock_transformers():
    flash_check = modeling_utils.is_flash_attention_requested
    prepare = GenerationMixin._prepare_cache_for_generation
    graphs_model = tiny()
    try:
        flashcore_hf.unpatch()
        assert modeling_utils.is_flash_attention_requested is generic.is_flash_attention_requested
        assert not hasattr(GenerationMixin._prepare_cache_for_generation, "__flashcore_original__")
        assert not hasattr(DeferredStopCheck.is_supported, "__flashcore_original__")
        assert isinstance(inspect.getattr_static(DeferredStopCheck, "is_supported"), staticmethod)
        assert "flashcore" not in transformers.AttentionInterface._global_mapping
        with pytest.raises(ValueError, match="flash"):
            tiny("flashcore")                                            # what stock transformers says
        model, stock_ids = tiny("sdpa"), torch.randint(1, 128, (2, 5))
        with torch.no_grad():
            out = model.generate(stock_ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
        assert type(getattr(out, CACHE_KWARG)) is DynamicCache
        assert "forward" not in vars(graphs_model)
    finally:
        flashcore_hf.register()
    assert modeling_utils.is_flash_attention_requested is not generic.is_flash_attention_requested
    assert modeling_utils.is_flash_attention_requested.__flashcore_original__ is flash_check.__flashcore_original__
    assert GenerationMixin._prepare_cache_for_generation.__flashcore_original__ is prepare.__flashcore_original__
    assert isinstance(getattr(tiny().generate(torch.randint(1, 128, (1, 3)), max_new_tokens=1,
                                              return_dict_in_generate=True), CACHE_KWARG), PagedKVCache)


def test_pyproject_floor_is_the_tested_minimum():
    """pyproject.toml's transformers floor is the release CI runs the suite on (patches/versions.py TESTED_MIN)."""
    import pathlib
    import re

    text = (pathlib.Path(__file__).parents[1] / "pyproject.toml").read_text()
    floor = re.search(r'"transformers>=([\d.]+)"', text).group(1)
    assert patches.versions.TESTED_MIN.release[:len(floor.split("."))] == tuple(int(x) for x in floor.split("."))
