"""What users do: many generate() calls in one process, every policy after another, long contexts.

The bug these tests exist for: a second topk generate() at 32K replayed the graph captured by the first call while
the new cache's page key bounds only covered the prompt's pages (bounds grew lazily on the eager path, which a
replay skips), so the replay read and wrote bounds rows that were never mapped: an illegal memory access at 32K,
64K and 128K (where the rows of the first decode page start a new 2 MiB mapping granule). The model here has
Hkv 8 x D 128 (4 KiB of bounds per page), so with 64-token pages the first decode page at 32K is exactly such a row.

FLASHCORE_TEST_CONTEXT / FLASHCORE_TEST_PAGE_SIZE shrink the contexts for runs under compute-sanitizer
(scripts/gpu_check.sh: 8192 tokens in 16-token pages cross the same granule boundary).
"""
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import flashcore_hf as fc
from flashcore_hf import CACHE_KWARG
from tests.gpu.conftest import agreement_lengths, diverge_only_at_near_ties

pytestmark = pytest.mark.gpu

CONTEXT = int(os.environ.get("FLASHCORE_TEST_CONTEXT", 32768))
PAGE = int(os.environ.get("FLASHCORE_TEST_PAGE_SIZE", 64))
VOCAB = 512
NEW = 8
POLICIES = ("dense", "streaming", "topk", "topk_rerank", "topk_signs")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=1024, intermediate_size=2048, num_hidden_layers=3,
                         num_attention_heads=8, num_key_value_heads=8, head_dim=128,
                         max_position_embeddings=4 * CONTEXT, pad_token_id=0, bos_token_id=None, eos_token_id=None)
    built = AutoModelForCausalLM.from_config(config, attn_implementation="flashcore", dtype=torch.bfloat16)
    yield built.to("cuda").eval()
    fc.set_default_cache_options(page_size=64, sparse=fc.SparseConfig())
    fc.release_decode_graphs(built)


def sparse_config(policy):
    """"topk_rerank": topk with the exact second stage (rerank=4); "topk_signs": topk scored by the key signs."""
    options = {"topk_rerank": dict(policy="topk", rerank=4), "topk_signs": dict(policy="topk", scoring="signs")}
    return fc.SparseConfig(token_budget=64 * PAGE, dense_layers=1, **options.get(policy, dict(policy=policy)))


def prompt(length, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (1, length), generator=generator).cuda()


def generate(model, ids, *, graphs=True, compiled=True, cache=None, logits=False):
    """Greedy NEW tokens; returns (tokens, replays, eager decode steps) of this call, or with logits=True (the
    generate() output with its per-step logits, replays, eager decode steps). compiled=False: graphs of the uncompiled
    forward and an uncompiled prefill (graphs=False: eager decoding)."""
    fc.set_cuda_graphs(graphs)
    fc.set_compiled_decode(compiled)
    fc.set_compiled_prefill(compiled)
    before = fc.decode_graph_stats(model)
    replays, eager = (before.replays, before.eager_decode_steps) if before else (0, 0)
    try:
        with torch.no_grad():
            extra = {} if cache is None else {CACHE_KWARG: cache}
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW,
                                 do_sample=False, return_dict_in_generate=logits, output_logits=logits, **extra)
    finally:
        fc.set_cuda_graphs(True)
        fc.set_compiled_decode(True)
        fc.set_compiled_prefill(True)
    torch.cuda.synchronize()
    after = fc.decode_graph_stats(model)
    result = out if logits else out[0, ids.shape[1]:]
    if after is None:
        return result, 0, NEW - 1
    return result, after.replays - replays, after.eager_decode_steps - eager


def assert_every_step_replayed(model, replays, eager):
    assert eager == 0, f"decode steps ran eagerly: {fc.decode_graph_stats(model).eager_reasons}"
    assert replays == NEW - 1


# Graph replays and eager steps run the same attention kernels with the same plans, but cuBLAS may pick other GEMM
# algorithms inside a capture, so the hidden states differ in the last bits; top-k page selection can turn that into
# a different page set and different tokens. Replays are compared with replays (bit-identical across calls), and, for
# the policies whose pages do not depend on the data (dense, streaming), replays of the uncompiled forward with eager
# decoding (the compiled forward's fused kernels round differently; test_compiled_decode_gpu.py measures them), up to
# rounding: the two paths' logits differ from the first decode step on (H200, 16K tokens: up to 0.018 = 0.03 std of
# a step's logits), so their tokens may part where two logits tie (there: an exact tie at the eighth token).
DATA_INDEPENDENT = ("dense", "streaming")
REPLAY_LOGIT_TOLERANCE_STD = 0.1
"""Largest |eager - replay| logit difference at a step both runs reach with the same tokens, in stds of its logits."""


def assert_replays_match_eager_decoding(model, ids, cache_factory=lambda: None):
    """Replays of the uncompiled forward (every step replayed) give eager decoding's logits up to rounding, and its
    tokens up to a near-tie."""
    expected, _, _ = generate(model, ids, graphs=False, cache=cache_factory(), logits=True)
    replayed, replays, eager = generate(model, ids, compiled=False, cache=cache_factory(), logits=True)
    assert_every_step_replayed(model, replays, eager)
    prompt_len = ids.shape[1]
    diverge_only_at_near_ties(expected, replayed, prompt_len)
    shared_steps = min(agreement_lengths(expected, replayed, prompt_len)[0] + 1, NEW)  # inputs: the same tokens
    for step in range(shared_steps):
        a, b = expected.logits[step][0].float(), replayed.logits[step][0].float()
        assert (a - b).abs().max() < REPLAY_LOGIT_TOLERANCE_STD * a.std(), step


@pytest.mark.parametrize("policy", POLICIES)
def test_repeated_default_cache_generate(model, policy):
    """Default cache (pool arena): the same prompt three times, then other lengths (other page buckets), every decode
    step replayed; each length gives the same tokens every time, and eager decoding's (up to rounding) where pages
    are data-independent."""
    fc.set_default_cache_options(page_size=PAGE, sparse=sparse_config(policy))
    lengths = [CONTEXT, CONTEXT, CONTEXT, CONTEXT + 3 * PAGE + 5, CONTEXT // 2 + 7, CONTEXT]
    first = {}
    for length in lengths:
        ids = prompt(length, seed=length)
        tokens, replays, eager = generate(model, ids)
        assert_every_step_replayed(model, replays, eager)
        if length in first:
            assert torch.equal(tokens, first[length]), f"{length} tokens: a repeated call differs"
            continue
        first[length] = tokens
        if policy in DATA_INDEPENDENT:
            assert_replays_match_eager_decoding(model, ids)


def test_every_policy_after_another(model):
    """dense -> topk -> streaming -> topk -> dense on one prompt through the default cache: each call gives what the
    first call of its policy gave, every decode step replayed."""
    ids = prompt(CONTEXT, seed=1)
    first = {}
    for policy in ("dense", "topk", "streaming", "topk_rerank", "topk_signs", "topk", "dense", "streaming",
                   "topk_signs", "topk_rerank"):
        fc.set_default_cache_options(page_size=PAGE, sparse=sparse_config(policy))
        tokens, replays, eager = generate(model, ids)
        assert_every_step_replayed(model, replays, eager)
        assert torch.equal(tokens, first.setdefault(policy, tokens)), policy


@pytest.mark.parametrize("policy", ("streaming", "topk", "topk_signs"))
def test_repeated_user_cache_generate(model, policy):
    """A PagedKVCache(sparse=...) passed by the user, a new one per call (no pool arena, pools grow while decoding),
    while the default cache is dense."""
    fc.set_default_cache_options(page_size=PAGE, sparse=fc.SparseConfig())
    ids = prompt(CONTEXT, seed=2)
    first = None
    for _ in range(3):
        cache = fc.PagedKVCache(model.config, page_size=PAGE, sparse=sparse_config(policy))
        tokens, replays, eager = generate(model, ids, cache=cache)
        assert_every_step_replayed(model, replays, eager)
        first = tokens if first is None else first
        assert torch.equal(tokens, first)
    if policy in DATA_INDEPENDENT:
        assert_replays_match_eager_decoding(
            model, ids, lambda: fc.PagedKVCache(model.config, page_size=PAGE, sparse=sparse_config(policy)))


def test_kept_cache_does_not_block_graphs(model):
    """A user who keeps the previous call's cache (return_dict_in_generate) still gets replayed decode steps in the
    next call, and the kept cache is intact: continuing it gives what continuing an untouched twin gives."""
    fc.set_default_cache_options(page_size=PAGE, sparse=sparse_config("topk"))
    ids = prompt(CONTEXT // 4, seed=3)

    def first_call():
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True)
        return out.sequences, getattr(out, CACHE_KWARG)

    twin_tokens, twin_cache = first_call()                 # both decoded through graphs, so the two caches are
    kept_tokens, kept_cache = first_call()                 # bit-identical
    assert torch.equal(kept_tokens, twin_tokens)
    _, replays, eager = generate(model, prompt(CONTEXT // 4, seed=4))      # while both caches are alive
    assert_every_step_replayed(model, replays, eager)
    with torch.no_grad():
        continued = model(kept_tokens[:, -1:], **{CACHE_KWARG: kept_cache}).logits
        expected = model(twin_tokens[:, -1:], **{CACHE_KWARG: twin_cache}).logits
    assert torch.equal(continued, expected)
