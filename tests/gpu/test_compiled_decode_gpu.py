"""Compiled decode steps on the GPU (flashcore_hf/hf/compiled_decode.py): accuracy against float32, compile cost
reported once per model.

Fusion changes rounding, so the compiled step is judged as attention kernels are: a teacher-forced decode (the same
given tokens fed at every step) through CUDA graphs of the compiled forward, every step's logits against a float32
copy of the same weights; its mean error may be at most 1.1x that of stock transformers (sdpa, bf16, DynamicCache)
on the same steps (its max error: 2x + 0.01, as test_hf_gpu.py bounds single forwards).
Run: `python -m pytest tests/gpu/test_compiled_decode_gpu.py -q -s` (prints the errors and the compile statistics).
"""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig

import flashcore_hf as fc
from flashcore_hf import CACHE_KWARG

pytestmark = pytest.mark.gpu

# Llama-3-8B's attention shape (head dim 128, 8 query heads per KV group of 4 here: GQA), fewer and narrower layers.
CONFIG = dict(vocab_size=8192, hidden_size=2048, intermediate_size=7168, num_hidden_layers=4, num_attention_heads=16,
              num_key_value_heads=4, head_dim=128, rope_theta=500000.0, max_position_embeddings=8192,
              tie_word_embeddings=False, pad_token_id=0, bos_token_id=None, eos_token_id=None)
PROMPT, STEPS, BATCH = 1000, 16, 4


@pytest.fixture(scope="module")
def models():
    """(bf16 flashcore model on cuda, float32 sdpa copy of the same weights)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**CONFIG), attn_implementation="flashcore",
                                             dtype=torch.bfloat16).cuda().eval()
    reference = copy.deepcopy(model).float()           # before generate() gives `model` its graph runner
    reference.set_attn_implementation("sdpa")
    yield model, reference
    fc.release_decode_graphs(model)
    fc.set_compiled_decode(True)


def teacher_forced(model, prompt, forced, cache) -> torch.Tensor:
    """Logits [STEPS, B, V] (float32) of decode steps fed forced[:, t] at position PROMPT + t after a prefill."""
    logits = []
    with torch.no_grad():
        model(input_ids=prompt, use_cache=True, **{CACHE_KWARG: cache})
        for t in range(forced.shape[1]):
            positions = torch.full((prompt.shape[0], 1), prompt.shape[1] + t, device=prompt.device)
            out = model(input_ids=forced[:, t:t + 1], position_ids=positions, use_cache=True, **{CACHE_KWARG: cache})
            logits.append(out.logits[:, -1].float())
    return torch.stack(logits)


def errors(logits, reference) -> tuple[float, float]:
    """(mean, max) |logits - reference| over every step, row and vocabulary entry."""
    diff = (logits - reference).abs()
    return diff.mean().item(), diff.max().item()


def test_teacher_forced_logits_vs_fp32(models):
    model, reference = models
    generator = torch.Generator().manual_seed(5)
    prompt = torch.randint(1, CONFIG["vocab_size"], (BATCH, PROMPT), generator=generator).cuda()
    forced = torch.randint(1, CONFIG["vocab_size"], (BATCH, STEPS), generator=generator).cuda()
    with torch.no_grad():
        ref = reference(input_ids=torch.cat([prompt, forced], 1), use_cache=False).logits[:, PROMPT:].float()
    ref = ref.transpose(0, 1)                                          # [STEPS, B, V]
    model.set_attn_implementation("sdpa")
    sdpa = teacher_forced(model, prompt, forced, DynamicCache(config=model.config))
    model.set_attn_implementation("flashcore")
    with torch.no_grad():                                              # installs the graph runner
        model.generate(prompt[:1, :16], max_new_tokens=2, do_sample=False)
    results = {}
    for name, compiled in (("flashcore graphs + compile", True), ("flashcore graphs, uncompiled", False)):
        fc.set_compiled_decode(compiled)
        try:
            stats = fc.decode_graph_stats(model)
            before = stats.compiled_replays if compiled else stats.replays - stats.compiled_replays
            results[name] = teacher_forced(model, prompt, forced, fc.PagedKVCache(model.config))
            stats = fc.decode_graph_stats(model)
            after = stats.compiled_replays if compiled else stats.replays - stats.compiled_replays
            assert after - before == STEPS, (name, stats)               # every step replayed the intended graph
        finally:
            fc.set_compiled_decode(True)
    fc.set_cuda_graphs(False)
    try:
        results["flashcore eager"] = teacher_forced(model, prompt, forced, fc.PagedKVCache(model.config))
    finally:
        fc.set_cuda_graphs(True)
    err_sdpa = errors(sdpa, ref)
    print(f"\nteacher-forced {BATCH} x {PROMPT} + {STEPS} steps, |logits - fp32| mean / max: "
          f"stock sdpa bf16 {err_sdpa[0]:.5f} / {err_sdpa[1]:.4f}")
    for name, logits in results.items():
        err = errors(logits, ref)
        print(f"  {name}: {err[0]:.5f} / {err[1]:.4f} ({err[0] / err_sdpa[0]:.3f}x sdpa's mean)")
    print(f"  {fc.decode_graph_stats(model)}")
    err_compiled = errors(results["flashcore graphs + compile"], ref)
    assert err_compiled[0] <= 1.1 * err_sdpa[0]
    assert err_compiled[1] <= 2 * err_sdpa[1] + 1e-2   # the max of half a million entries: test_hf_gpu.py's bound


def test_compile_reported_once_per_model(generator):
    """compile_seconds is reported; a second generate() call, another page bucket and more batch sizes do not
    recompile (batch 1 and the first batch size get static graphs, the next a dynamic batch: at most 3)."""
    torch.manual_seed(1)
    config = LlamaConfig(**{**CONFIG, "num_hidden_layers": 2, "hidden_size": 1024, "intermediate_size": 2048,
                            "num_attention_heads": 8, "num_key_value_heads": 2})
    model = AutoModelForCausalLM.from_config(config, attn_implementation="flashcore",
                                             dtype=torch.bfloat16).cuda().eval()

    def generate(rows, length):
        ids = torch.randint(1, config.vocab_size, (rows, length), generator=generator).cuda()
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8,
                           do_sample=False)
        return fc.decode_graph_stats(model)

    stats = generate(3, 200)
    print(f"\nfirst call: {stats}")
    assert stats.compiled_captures >= 1 and stats.compiles == 1 and stats.compile_seconds > 0
    assert not stats.compile_failures and stats.compiled_replays == 7
    compiles, seconds, captures = stats.compiles, stats.compile_seconds, stats.captures
    stats = generate(3, 200)                                            # the same shapes: the same graph
    assert (stats.compiles, stats.compile_seconds, stats.captures) == (compiles, seconds, captures)
    stats = generate(3, 3000)                                           # another page bucket: a capture, no compile
    assert stats.captures > captures and (stats.compiles, stats.compile_seconds) == (compiles, seconds)
    for rows in (1, 5, 7, 2):
        stats = generate(rows, 300)
    print(f"after batch sizes 1, 5, 7, 2: {stats}")
    assert stats.compiles <= 3 and stats.compiled_replays == stats.replays
    # Every compiled graph groups its linears (q/k/v, o, gate/up, down per layer, and lm_head), the one with a
    # dynamic batch included: the op picks kernel or cuBLAS per call.
    assert stats.grouped_linears == (4 * config.num_hidden_layers + 1) * stats.compiles
    fc.release_decode_graphs(model)
    stats = generate(5, 300)                                            # graphs freed, compiled code kept
    assert stats.compiles <= 3 and stats.compiled_replays == stats.replays
