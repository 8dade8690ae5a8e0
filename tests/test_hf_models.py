"""The "flashcore" attention implementation inside real transformers models, against eager (CPU, float32).

Tiny random models of each supported family; flashcore must give eager's logits (relative error < 1e-4) and the
same generated tokens, through every cache transformers offers and through PagedKVCache.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from transformers import (AutoModelForCausalLM, DynamicCache, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config,
                          StaticCache)

import flashcore_hf
from flashcore_hf import CACHE_KWARG
from flashcore_hf import FlashCoreAttention, FlashCoreFallbackWarning, PagedKVCache, PageLayout
from flashcore_hf.hf import integration
from flashcore_hf.hf.integration import flashcore_attention_forward
from flashcore_hf.ops import AttentionPlan, sdpa_from_pages
from tests.reference import random_paged_kv, reference_paged_attention

VOCAB = 128
COMMON = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256, pad_token_id=0)
FAMILIES = {
    "llama": lambda: LlamaConfig(**COMMON),
    # Windows shorter than the prompts, so the window matters in prefill and in decode.
    "mistral": lambda: MistralConfig(**COMMON, sliding_window=5),
    # Layer 0 full attention, layer 1 sliding: both mask kinds in one model.
    "qwen2": lambda: Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=6, max_window_layers=1),
    "qwen3": lambda: Qwen3Config(**COMMON, head_dim=16),
}
_MODELS: dict[str, tuple] = {}


def model_pair(family: str):
    """(flashcore model, eager model) with the same random weights, both in eval mode (built once per family)."""
    if family not in _MODELS:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(FAMILIES[family](), attn_implementation="flashcore",
                                                 dtype=torch.float32).eval()
        eager = copy.deepcopy(model)
        eager.set_attn_implementation("eager")
        assert model.config._attn_implementation == "flashcore"
        _MODELS[family] = (model, eager)
    return _MODELS[family]


def left_padded(lengths, seed=0):
    """input_ids [B, max(lengths)] of random tokens, left padded with 0, and the matching attention_mask."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, width - n:] = torch.randint(1, VOCAB, (n,), generator=g)
        mask[b, width - n:] = 1
    return ids, mask


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def greedy(model, ids, mask, new_tokens=20, **kwargs):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                              pad_token_id=0, **kwargs)


@pytest.fixture
def default_page_size():
    """Let generate()'s default PagedKVCache use a given page size for one test."""
    before = flashcore_hf.set_default_cache_options()
    yield lambda n: flashcore_hf.set_default_cache_options(page_size=n)
    flashcore_hf.set_default_cache_options(page_size=before["page_size"])


# ---- logits ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_match_eager_padded_batch(family):
    model, eager = model_pair(family)
    ids, mask = left_padded([17, 9, 13, 4], seed=1)
    right_mask = torch.zeros_like(mask)
    for b, n in enumerate(mask.sum(1).tolist()):
        right_mask[b, :n] = 1
    right_ids = torch.where(right_mask.bool(), torch.randint(1, VOCAB, ids.shape), 0)
    with torch.no_grad():
        for ids_, mask_ in ((ids, mask), (right_ids, right_mask)):
            valid = mask_.bool()
            ref = eager(ids_, attention_mask=mask_, use_cache=False).logits[valid]
            for use_cache in (False, True):  # no cache, then a DynamicCache built by the model
                out = model(ids_, attention_mask=mask_, use_cache=use_cache).logits[valid]
                assert rel_err(out, ref) < 1e-4, (family, use_cache)
        cache = PagedKVCache(model.config, page_size=4)
        out = model(ids, attention_mask=mask, **{CACHE_KWARG: cache}).logits[mask.bool()]
        ref = eager(ids, attention_mask=mask).logits[mask.bool()]
        assert rel_err(out, ref) < 1e-4


def test_prefill_then_decode_logits_through_paged_cache():
    model, eager = model_pair("mistral")
    ids, mask = left_padded([11, 6, 9], seed=2)
    step = torch.randint(1, VOCAB, (3, 3))
    paged, dense = PagedKVCache(model.config, page_size=4), DynamicCache(config=eager.config)
    with torch.no_grad():
        model(ids, attention_mask=mask, **{CACHE_KWARG: paged})
        eager(ids, attention_mask=mask, **{CACHE_KWARG: dense})
        full_mask = torch.cat([mask, torch.ones_like(step)], dim=1)
        out = model(step, attention_mask=full_mask, **{CACHE_KWARG: paged}).logits
        ref = eager(step, attention_mask=full_mask, **{CACHE_KWARG: dense}).logits
    assert rel_err(out, ref) < 1e-4


def test_static_cache_forward_without_mask():
    """A StaticCache hands attention its whole zero-filled buffer; without any padding mask the mask function
    must still tell the kernel how many slots are filled."""
    model, eager = model_pair("llama")
    ids = torch.randint(1, VOCAB, (2, 7))
    step = torch.randint(1, VOCAB, (2, 1))
    static, dense = StaticCache(config=model.config, max_cache_len=32), DynamicCache(config=eager.config)
    with torch.no_grad():
        first = model(ids, **{CACHE_KWARG: static}).logits
        assert rel_err(first, eager(ids, **{CACHE_KWARG: dense}).logits) < 1e-4
        out = model(step, **{CACHE_KWARG: static}).logits
        ref = eager(step, **{CACHE_KWARG: dense}).logits
    assert rel_err(out, ref) < 1e-4


def test_packed_sequences_attend_within_themselves():
    """One row holding three sequences (position_ids restart), no mask: eager/sdpa build a block-diagonal mask."""
    model, eager = model_pair("qwen3")
    lengths = [5, 9, 4]
    ids = torch.randint(1, VOCAB, (1, sum(lengths)))
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        out = model(ids, position_ids=position_ids, use_cache=False).logits
        ref = eager(ids, position_ids=position_ids, use_cache=False).logits
        alone = model(ids[:, 5:14], use_cache=False).logits
    assert rel_err(out, ref) < 1e-4
    assert rel_err(out[:, 5:14], alone) < 1e-4


def test_mask_function_never_builds_a_dense_mask():
    from transformers.masking_utils import create_causal_mask

    model, _ = model_pair("llama")
    ids, mask = left_padded([6, 3])
    embeds = model.get_input_embeddings()(ids)
    built = create_causal_mask(config=model.config, inputs_embeds=embeds, attention_mask=mask,
                               **{CACHE_KWARG: None}, position_ids=torch.arange(6)[None])
    assert built.shape == (2, 6) and built.dtype == torch.bool
    full = create_causal_mask(config=model.config, inputs_embeds=embeds, attention_mask=torch.ones_like(mask),
                              **{CACHE_KWARG: None}, position_ids=torch.arange(6)[None])
    assert full.shape == (2, 6) and bool(full.all())


# ---- generation -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_greedy_left_padded_matches_eager(family, default_page_size):
    """Mixed prompt lengths over many 4-token pages, through an explicit PagedKVCache and through the default."""
    model, eager = model_pair(family)
    ids, mask = left_padded([23, 7, 15], seed=3)
    ref = greedy(eager, ids, mask)
    explicit = greedy(model, ids, mask, **{CACHE_KWARG: PagedKVCache(model.config, page_size=4)})
    assert torch.equal(explicit, ref)
    default_page_size(4)
    out = greedy(model, ids, mask, return_dict_in_generate=True)
    assert isinstance(getattr(out, CACHE_KWARG), PagedKVCache) and getattr(out, CACHE_KWARG).page_size == 4
    assert torch.equal(out.sequences, ref)


@pytest.mark.parametrize("cache", ["dynamic", "static", "no_cache"])
def test_greedy_with_transformers_caches(cache):
    model, eager = model_pair("qwen2")
    ids, mask = left_padded([12, 5], seed=4)
    kwargs = {"dynamic": lambda: {CACHE_KWARG: DynamicCache(config=model.config)},
              "static": lambda: {"cache_implementation": "static"},
              "no_cache": lambda: {"use_cache": False}}[cache]
    assert torch.equal(greedy(model, ids, mask, **kwargs()), greedy(eager, ids, mask, **kwargs()))


def test_beam_search_matches_eager():
    model, eager = model_pair("llama")
    ids, mask = left_padded([10, 6], seed=5)
    kwargs = dict(num_beams=3, num_return_sequences=2, new_tokens=12)
    assert torch.equal(greedy(model, ids, mask, **kwargs), greedy(eager, ids, mask, **kwargs))


def test_sampling_with_fixed_seed():
    model, eager = model_pair("mistral")
    ids, mask = left_padded([9, 14], seed=6)
    outs = []
    for m in (model, eager, model):
        torch.manual_seed(1234)
        with torch.no_grad():
            outs.append(m.generate(ids, attention_mask=mask, do_sample=True, top_k=20, max_new_tokens=16,
                                   num_return_sequences=3, pad_token_id=0))
    assert outs[0].shape == (6, 14 + 16)
    assert torch.equal(outs[0], outs[2])  # reproducible
    assert torch.equal(outs[0], outs[1])  # and the same draws as eager (identical logits up to 1e-7)


# ---- set_attn_implementation and standalone use ----------------------------------------------------------------

def test_set_attn_implementation_round_trip():
    _, eager = model_pair("qwen3")
    model = copy.deepcopy(eager)
    ids, mask = left_padded([8, 5], seed=7)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits[mask.bool()]
        model.set_attn_implementation("flashcore")
        assert model.config._attn_implementation == "flashcore"
        out = model(ids, attention_mask=mask).logits[mask.bool()]
        model.set_attn_implementation("eager")
        again = model(ids, attention_mask=mask).logits[mask.bool()]
    assert rel_err(out, ref) < 1e-4 and torch.equal(again, ref)


def _reference(q, k, v, q_valid, k_valid, causal, window, scale):
    """float64 FlashAttention-style padded attention: valid keys packed in order, valid queries bottom-right."""
    b, hq, s, d = q.shape
    group = hq // k.shape[1]
    out = torch.zeros(b, s, hq, d, dtype=torch.float64)
    for r in range(b):
        qi, ki = q_valid[r].nonzero().flatten(), k_valid[r].nonzero().flatten()
        qr = q[r][:, qi].double()
        kr = k[r][:, ki].double().repeat_interleave(group, 0)
        vr = v[r][:, ki].double().repeat_interleave(group, 0)
        n_q, n_k = len(qi), len(ki)
        scores = torch.einsum("hqd,hkd->hqk", qr, kr) * scale
        q_pos = torch.arange(n_q)[:, None] + n_k - n_q
        k_pos = torch.arange(n_k)[None]
        visible = torch.ones(n_q, n_k, dtype=torch.bool)
        if causal:
            visible &= k_pos <= q_pos
        if window is not None:
            visible &= q_pos - k_pos < window
        probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), -1).nan_to_num(0.0)
        out[r, qi] = torch.einsum("hqk,hkd->qhd", probs, vr)
    return out


@pytest.mark.parametrize("pattern", ["left", "right", "holes", "none"])
@pytest.mark.parametrize("window", [None, 3])
def test_flashcore_attention_module_dense(pattern, window):
    g = torch.Generator().manual_seed(8)
    b, hq, hkv, s, d = 3, 6, 2, 11, 24
    q, k, v = (torch.randn(b, h, s, d, generator=g) for h in (hq, hkv, hkv))
    mask = torch.ones(b, s, dtype=torch.bool)
    if pattern == "left":
        mask[0, :4] = mask[2, :9] = False
    elif pattern == "right":
        mask[1, 6:] = mask[2, 2:] = False
    elif pattern == "holes":
        mask[0, 3:5] = mask[1, ::3] = False
    attn = FlashCoreAttention(page_size=4)
    with torch.no_grad():
        out = attn(q, k, v, None if pattern == "none" else mask, scaling=0.3, sliding_window=window)
    ref = _reference(q, k, v, mask, mask, True, window, 0.3)
    assert out.shape == (b, s, hq, d)
    assert torch.allclose(out[mask].double(), ref[mask], atol=2e-5)


def test_flashcore_attention_module_static_tail_and_decode():
    """Mask shorter than the keys (StaticCache tail), 2 queries as the last 2 mask columns, non-causal too."""
    g = torch.Generator().manual_seed(9)
    b, h, d, filled, slots = 2, 2, 16, 9, 20
    q = torch.randn(b, h, 2, d, generator=g)
    k, v = torch.randn(b, h, slots, d, generator=g), torch.randn(b, h, slots, d, generator=g)
    k[:, :, filled:] = v[:, :, filled:] = 1e4  # must never be read
    mask = torch.ones(b, filled, dtype=torch.bool)
    mask[1, :3] = False
    for causal in (True, False):
        with torch.no_grad():
            out = FlashCoreAttention(page_size=4)(q, k, v, mask, is_causal=causal)
        q_valid = torch.ones(b, 2, dtype=torch.bool)
        ref = _reference(q, k[:, :, :filled], v[:, :, :filled], q_valid, mask, causal, None, d ** -0.5)
        assert torch.allclose(out.double(), ref, atol=2e-5)


@pytest.mark.parametrize("per_kv_head", [False, True])
@pytest.mark.parametrize("causal, window", [(True, None), (True, 3), (False, None)])
def test_sdpa_fallback_follows_the_paged_contract(per_kv_head, causal, window, generator):
    """The fallback against the float64 reference: scattered pages, an empty sequence, more queries than keys."""
    lengths, n_q, hq, hkv, d, page = [7, 0, 13, 5], [3, 1, 13, 1], 6, 3, 16, 4
    row_lengths = [max(0, n - h) for n in lengths for h in range(hkv)] if per_kv_head else lengths
    k, v, row_offsets, cols, counts = random_paged_kv(row_lengths, page, hkv, d, generator=generator)
    q_indptr = torch.tensor([0, *torch.tensor(n_q).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(q_indptr[-1]), hq, d, generator=generator)
    layout = PageLayout(row_offsets, cols, counts, torch.full_like(cols, -1))
    max_pages = int((row_offsets[1:] - row_offsets[:-1]).max())
    out = sdpa_from_pages(q, k, v, layout, q_indptr, max(n_q), max_pages, causal=causal, scale=0.2, window=window)
    ref, _ = reference_paged_attention(q, k, v, row_offsets, cols, counts, q_indptr, causal=causal, sm_scale=0.2,
                                       sliding_window=window)
    assert torch.allclose(out.double(), ref, atol=2e-6)


def test_fallback_matches_kernel_with_one_warning(monkeypatch):
    """When the kernels lack a configuration, SDPA on gathered pages gives the same numbers (dense and paged)."""
    model, _ = model_pair("mistral")
    ids, mask = left_padded([13, 6], seed=10)
    with torch.no_grad():
        kernel_dense = model(ids, attention_mask=mask, use_cache=False).logits[mask.bool()]
        kernel_paged = greedy(model, ids, mask, new_tokens=8,
                              **{CACHE_KWARG: PagedKVCache(model.config, page_size=4)})
    monkeypatch.setattr(AttentionPlan, "supported", property(lambda plan: False))
    monkeypatch.setattr(integration._ATTENTION, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            fallback_dense = model(ids, attention_mask=mask, use_cache=False).logits[mask.bool()]
            fallback_paged = greedy(model, ids, mask, new_tokens=8,
                                    **{CACHE_KWARG: PagedKVCache(model.config, page_size=4)})
    assert rel_err(fallback_dense, kernel_dense) < 1e-5
    assert torch.equal(fallback_paged, kernel_paged)
    fallback_warnings = [w for w in caught if issubclass(w.category, FlashCoreFallbackWarning)]
    assert len(fallback_warnings) == 2  # one per distinct configuration (page size 64 dense, 4 paged)


# ---- unsupported uses -------------------------------------------------------------------------------------------

def test_output_attentions_is_refused():
    model, _ = model_pair("llama")
    with torch.no_grad(), pytest.raises(ValueError, match="output_attentions"):
        model(torch.randint(1, VOCAB, (1, 5)), output_attentions=True)


def test_training_with_gradients_is_refused():
    model, _ = model_pair("llama")
    model.train()
    try:
        with pytest.raises(RuntimeError, match="inference-only"):
            model(torch.randint(1, VOCAB, (1, 5)))
    finally:
        model.eval()


def test_eval_forward_with_gradients_runs_but_backward_raises():
    model, reference = model_pair("llama")
    ids = torch.randint(1, VOCAB, (1, 5))
    logits = model(ids).logits                       # no torch.no_grad(): an eval script's forward must work
    with torch.no_grad():
        torch.testing.assert_close(logits.detach(), reference(ids).logits, rtol=1e-4, atol=1e-5)
    with pytest.raises(RuntimeError, match="no backward pass"):
        logits.sum().backward()


def test_training_dropout_is_refused():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**COMMON, attention_dropout=0.1),
                                             attn_implementation="flashcore")
    model.train()
    with torch.no_grad(), pytest.raises(RuntimeError, match="dropout"):
        model(torch.randint(1, VOCAB, (1, 5)))


def test_four_d_mask_is_refused():
    model, _ = model_pair("llama")
    mask = torch.ones(1, 1, 5, 5, dtype=torch.bool).tril()
    with torch.no_grad(), pytest.raises(ValueError, match="2-D padding mask"):
        model(torch.randint(1, VOCAB, (1, 5)), attention_mask=mask)


def test_continuous_batching_cache_kwarg_is_refused():
    model, _ = model_pair("llama")
    attn = model.model.layers[0].self_attn
    q, kv = torch.randn(1, 4, 3, 16), torch.randn(1, 2, 3, 16)
    with torch.no_grad(), pytest.raises(NotImplementedError, match="continuous-batching"):
        flashcore_attention_forward(attn, q, kv, kv, None, cache=object())


# ---- one plan per step -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("family, kinds", [("llama", 1), ("qwen2", 2)])
def test_one_attention_plan_per_step_and_layout_kind(family, kinds, monkeypatch):
    """Every layer of a step runs the step's plan: one plan_attention call per step and layout kind (the full layout,
    and the window layout of models with sliding-window layers), whatever the number of layers."""
    from flashcore_hf.cache import step_plan

    model, eager = model_pair(family)
    calls = []
    original = step_plan.plan_attention
    monkeypatch.setattr(step_plan, "plan_attention", lambda *a, **k: calls.append(1) or original(*a, **k))
    ids, mask = left_padded([9, 5], seed=11)
    cache = PagedKVCache(model.config, page_size=4)
    with torch.no_grad():
        model(ids, attention_mask=mask, **{CACHE_KWARG: cache})
        assert len(calls) == kinds
        step = torch.randint(1, VOCAB, (2, 1))
        model(step, attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1), **{CACHE_KWARG: cache})
    assert len(calls) == 2 * kinds


def test_padded_forward_under_inference_mode():
    """A padded batch through DynamicCache inside torch.inference_mode (inference tensors keep no version counter)."""
    model, eager = model_pair("llama")
    ids, mask = left_padded([9, 5], seed=12)
    with torch.inference_mode():
        out = model(ids, attention_mask=mask).logits[mask.bool()]
        ref = eager(ids, attention_mask=mask).logits[mask.bool()]
    assert rel_err(out, ref) < 1e-4
