"""Shared prompts on the GPU: cascade decode (a group's shared pages read once, merged by lse) against attention over
every row's pages, and generate() with repeated prompts, samples and beams, CUDA graphs on.

Tolerance. The cascade sums a row's keys in another order (two partial softmaxes merged in float32) and rounds one
more intermediate (each part's bf16 output), so it is not bit-identical to one pass. The op test holds it to the
float64 reference as tightly as the one-pass kernel: its error may exceed the one-pass error by at most one bf16
rounding of the output (2^-8 relative). Model level: greedy tokens of the shared run agree with the same run without
sharing, except after a near-tie of the two best logits (as in test_hf_gpu.py).
"""
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import flashcore_hf as fc
from flashcore_hf.cache.step_plan import PREFIX, SUFFIX, QueryRuns, cascade_layouts, prefix_splits, shared_prefixes
from flashcore_hf.hf import attention as attention_module
from flashcore_hf.ops import cascade_attention, merge_attention_states
from tests.gpu.conftest import diverge_only_at_near_ties
from tests.reference import reference_paged_attention

pytestmark = pytest.mark.gpu
VOCAB = 512


@pytest.mark.parametrize("rows, prefix, suffix, page, max_group, splits", [
    (64, 2048, 40, 64, 16, 1), (5, 1000, 300, 16, None, 1), (128, 512, 1, 64, 16, 1),     # decode-sized groups
    (128, 2048, 1, 64, None, 4), (64, 8192, 70, 128, None, 8), (40, 1000, 300, 16, None, 3),  # key splits
    (256, 2048, 5, 64, None, None), (33, 640, 3, 64, None, 7)])       # the cache's choice; splits with no page
def test_cascade_matches_one_pass_attention(rows, prefix, suffix, page, max_group, splits):
    generator = torch.Generator().manual_seed(rows + prefix)
    hkv, group, d = 8, 4, 128
    shared_pages = prefix // page
    own = [-(-(prefix % page + suffix + r) // page) for r in range(rows)]   # rows of different lengths
    num_pages = shared_pages + sum(own) + 3
    perm = torch.randperm(num_pages, generator=generator).tolist()
    shared = perm[:shared_pages]
    tables, keys, at = [], [], shared_pages
    for r in range(rows):
        tables.append(shared + perm[at:at + own[r]])
        keys.append(shared_pages * page + prefix % page + suffix + r)
        at += own[r]
    k_pool = torch.randn(num_pages, page, hkv, d, generator=generator).to(torch.bfloat16).cuda()
    v_pool = torch.randn(num_pages, page, hkv, d, generator=generator).to(torch.bfloat16).cuda()
    q = torch.randn(rows, hkv * group, d, generator=generator).to(torch.bfloat16).cuda()
    groups = shared_prefixes(tables, keys, page, min_saved=0.0, max_group=max_group)
    if splits is None:
        splits = prefix_splits(groups, page, hkv * group, torch.cuda.get_device_properties(0).multi_processor_count)
    runs = QueryRuns(list(range(rows + 1)), list(range(rows)), keys)
    layouts, _, parts = cascade_layouts(groups, runs, tables, page, splits)
    order, inverse, group_indptr = (t.cuda() for t in parts)
    q_indptr = torch.arange(rows + 1, dtype=torch.int32, device="cuda")
    options = dict(num_q_heads=hkv * group, num_kv_heads=hkv, head_dim=d, page_size=page, dtype=q.dtype)
    prefix_plan = fc.plan_attention(layouts[PREFIX].to("cuda"), group_indptr, causal=False, **options)
    suffix_plan = fc.plan_attention(layouts[SUFFIX].to("cuda"), q_indptr, **options)
    cascade = cascade_attention(q, k_pool, v_pool, prefix_plan, layouts[PREFIX].to("cuda"), suffix_plan,
                                layouts[SUFFIX].to("cuda"), order, inverse, group_indptr, q_indptr)
    counts = [min(page, n - i * page) for n in keys for i in range(-(-n // page))]
    cols = [p for t, n in zip(tables, keys) for p in t[:-(-n // page)]]
    offsets = torch.tensor([0, *torch.tensor([-(-n // page) for n in keys]).cumsum(0).tolist()], dtype=torch.int32)
    full = fc.PageLayout(offsets, torch.tensor(cols, dtype=torch.int32), torch.tensor(counts, dtype=torch.int32),
                         torch.full((len(cols),), -1, dtype=torch.int32))
    one_pass = fc.paged_attention(q, k_pool, v_pool, full.to("cuda"), q_indptr)
    ref, _ = reference_paged_attention(q.cpu(), k_pool.cpu(), v_pool.cpu(), *full[:3], q_indptr.cpu(), causal=True)
    err_cascade = (cascade.double().cpu() - ref).abs().max().item()
    err_one_pass = (one_pass.double().cpu() - ref).abs().max().item()
    print(f"rows {rows} prefix {prefix} splits {splits} ({prefix_plan.kernel}): max |out - fp64| cascade "
          f"{err_cascade:.2e}, one pass {err_one_pass:.2e}")
    assert err_cascade <= err_one_pass + 2 ** -8 * ref.abs().max().item()
    assert prefix_plan.kernel == ("decode" if groups.largest_group <= 16 else "prefill_wgmma")


@pytest.mark.parametrize("dtype, d", [(torch.bfloat16, 128), (torch.float16, 64), (torch.bfloat16, 42),
                                      (torch.float32, 40), (torch.float32, 33)])
def test_merge_kernel_matches_the_cpu_op(dtype, d):
    """The CUDA merge (8-byte vectors where head_dim and the pointers allow, else element by element) against the CPU
    op: part a in 3 splits read through a permutation, rows whose part b has no key, sinks."""
    generator = torch.Generator().manual_seed(d)
    rows, heads = 300, 6
    out_a = torch.randn(3, rows + 4, heads, d, generator=generator).to(dtype)
    lse_a = torch.randn(3, rows + 4, heads, generator=generator) * 3
    out_b = torch.randn(rows, heads, d, generator=generator).to(dtype)
    lse_b = torch.randn(rows, heads, generator=generator) * 3
    lse_b[::7] = -math.inf
    a_rows = torch.randperm(rows + 4, generator=generator)[:rows].to(torch.int32)
    sinks = torch.randn(heads, generator=generator)
    args = (out_a, lse_a, out_b, lse_b, sinks, a_rows)
    expected = merge_attention_states(*args[:4], sinks, a_rows=a_rows)
    got = merge_attention_states(*(t.cuda() for t in args[:4]), sinks.cuda(), a_rows=a_rows.cuda())
    torch.testing.assert_close(got.cpu().float(), expected.float(), atol=2 ** -7, rtol=2 ** -7)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=1024, intermediate_size=2048, num_hidden_layers=3,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=128, max_position_embeddings=16384,
                         pad_token_id=0, bos_token_id=None, eos_token_id=None)
    built = AutoModelForCausalLM.from_config(config, attn_implementation="flashcore", dtype=torch.bfloat16)
    yield built.to("cuda").eval()
    fc.set_default_cache_options(share_prefixes=True)
    fc.set_cuda_graphs(True)
    fc.release_decode_graphs(built)


def _generate(model, ids, share, seed=0, **kwargs):
    fc.set_default_cache_options(share_prefixes=share)
    torch.manual_seed(seed)
    with torch.inference_mode():
        return model.generate(ids, attention_mask=torch.ones_like(ids), output_logits=True,
                              return_dict_in_generate=True, **kwargs)


def test_repeated_prompts_samples_and_beams_with_graphs(model, monkeypatch):
    splits = []       # prefix key splits of each cascade layer run (captured or eager)
    original = attention_module.cascade_attention
    monkeypatch.setattr(attention_module, "cascade_attention",
                        lambda q, k, v, pp, pl, sp, sl, order, *a: splits.append(order.numel() // q.shape[0]) or
                        original(q, k, v, pp, pl, sp, sl, order, *a))
    fc.set_cuda_graphs(True)
    generator = torch.Generator().manual_seed(7)
    base = torch.randint(1, VOCAB, (3, 3000), generator=generator).cuda()
    stats = fc.decode_graph_stats
    cases = [(base[[0, 1, 0, 0, 2, 0, 1, 0]], dict(max_new_tokens=24, do_sample=False)),
             (base[:1], dict(max_new_tokens=16, do_sample=True, num_return_sequences=16)),
             (base[:2, :1700], dict(max_new_tokens=12, do_sample=False, num_beams=4, num_return_sequences=2)),
             (base[[2, 2, 2, 2]], dict(max_new_tokens=20, do_sample=False)),
             (base[[1] * 40, :2500], dict(max_new_tokens=20, do_sample=False))]      # one group of 40: key splits
    for ids, kwargs in cases:
        shared = _generate(model, ids, True, **kwargs)
        replays = stats(model).replays
        plain = _generate(model, ids, False, **kwargs)
        identical = diverge_only_at_near_ties(shared, plain, ids.shape[1]) if not kwargs["do_sample"] else None
        print(f"{tuple(ids.shape)} {kwargs}: rows identical {identical}, graph stats {stats(model)}")
        if kwargs["do_sample"]:
            assert shared.sequences.shape == plain.sequences.shape
        assert replays > 0
    assert splits, "no decode step ran as a cascade"
    assert min(splits) == 1 and max(splits) > 1, "decode-sized groups read their prefix whole, large ones in splits"


def test_prefix_cache_across_calls_with_graphs(model):
    """One document, several questions, one generate() each with a PrefixCache: later calls reuse the document's
    pages (hits), CUDA graphs replay, and greedy tokens agree with calls without the cache up to near-ties."""
    fc.set_cuda_graphs(True)
    generator = torch.Generator().manual_seed(11)
    document = torch.randint(1, VOCAB, (1, 5000), generator=generator).cuda()
    store = fc.PrefixCache(max_pages=128)
    for length in (9, 30, 17):
        ids = torch.cat([document, torch.randint(1, VOCAB, (1, length), generator=generator).cuda()], dim=1)
        fc.set_default_cache_options(prefix_cache=store)
        with_store = _generate(model, ids, True, max_new_tokens=16, do_sample=False)
        fc.set_default_cache_options(prefix_cache=False)
        without = _generate(model, ids, True, max_new_tokens=16, do_sample=False)
        diverge_only_at_near_ties(with_store, without, ids.shape[1])
    print(store)
    assert store.stats.hits == 2 and store.stats.tokens_reused == 2 * (5000 // 64) * 64
