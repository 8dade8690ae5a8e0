"""Compiled prefill on the GPU (flashcore_hf/hf/compiled_prefill.py): long prompts' decoder layers run compiled with
inductor; their logits are judged against a float32 copy of the same weights, as compiled decode steps are
(tests/gpu/test_compiled_decode_gpu.py): the mean error may be at most 1.1x that of stock transformers (sdpa, bf16)
on the same prompts, the max error 2x + 0.01.
Run: `python -m pytest tests/gpu/test_compiled_prefill_gpu.py -q -s` (prints the errors and the compile statistics).
"""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import flashcore_hf as fc
from flashcore_hf import CACHE_KWARG
from flashcore_hf.hf.compiled_prefill import MIN_TOKENS

pytestmark = pytest.mark.gpu

CONFIG = dict(vocab_size=4096, hidden_size=1024, intermediate_size=3584, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=2, head_dim=128, rope_theta=500000.0, max_position_embeddings=32768,
              tie_word_embeddings=False, pad_token_id=0, bos_token_id=None, eos_token_id=None)


def prompts(generator):
    """(ids, mask) of: one row of MIN_TOKENS, one row a bit longer, two rows of half that (the second left-padded by
    100 tokens): every one long enough to run compiled."""
    out = []
    for rows, length in ((1, MIN_TOKENS), (1, MIN_TOKENS + 999), (2, MIN_TOKENS // 2 + 50)):
        ids = torch.randint(1, CONFIG["vocab_size"], (rows, length), generator=generator)
        mask = torch.ones_like(ids)
        if rows == 2:
            ids[1, :100], mask[1, :100] = 0, 0
        out.append((ids.cuda(), mask.cuda()))
    return out


def masked_errors(logits, reference, mask) -> tuple[float, float]:
    """(mean, max) |logits - reference| over the real (unmasked) positions."""
    diff = (logits.float() - reference).abs()[mask.bool()]
    return diff.mean().item(), diff.max().item()


def test_compiled_prefill_vs_fp32_and_no_recompile_per_length():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**CONFIG), attn_implementation="flashcore",
                                             dtype=torch.bfloat16).cuda().eval()
    reference = copy.deepcopy(model).float()
    reference.set_attn_implementation("sdpa")
    with torch.no_grad():                                              # installs the graph runner
        model.generate(torch.ones(1, 8, dtype=torch.long, device="cuda"), max_new_tokens=2, do_sample=False)
    generator = torch.Generator().manual_seed(3)
    compiles = []
    for ids, mask in prompts(generator):
        with torch.no_grad():
            ref = reference(input_ids=ids, attention_mask=mask, use_cache=False).logits
            model.set_attn_implementation("sdpa")
            sdpa = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            model.set_attn_implementation("flashcore")
            results = {}
            for name, compiled in (("compiled", True), ("eager", False)):
                fc.set_compiled_prefill(compiled)
                try:
                    cache = fc.PagedKVCache(model.config, page_size=64)
                    results[name] = model(input_ids=ids, attention_mask=mask, use_cache=True,
                                          **{CACHE_KWARG: cache}).logits
                finally:
                    fc.set_compiled_prefill(True)
        stats = fc.decode_graph_stats(model)
        compiles.append(stats.prefill_compiles)
        err_sdpa = masked_errors(sdpa, ref, mask)
        err = {name: masked_errors(logits, ref, mask) for name, logits in results.items()}
        print(f"\n{tuple(ids.shape)}: |logits - fp32| mean / max: sdpa bf16 {err_sdpa[0]:.5f} / {err_sdpa[1]:.4f}; "
              + "; ".join(f"flashcore {n} {e[0]:.5f} / {e[1]:.4f} ({e[0] / err_sdpa[0]:.3f}x)" for n, e in err.items()))
        assert err["compiled"][0] <= 1.1 * err_sdpa[0]
        assert err["compiled"][1] <= 2 * err_sdpa[1] + 1e-2
        del ref, sdpa, results
    stats = fc.decode_graph_stats(model)
    print(stats)
    assert stats.compiled_prefills == 3 and not stats.compile_failures and stats.prefill_compile_seconds > 0
    assert compiles[1] == compiles[0]                                  # a new length compiles nothing
    fc.release_decode_graphs(model)
