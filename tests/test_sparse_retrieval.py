"""Model-level accuracy of sparse page selection: a tiny trained Llama looks up key-value records in a 258-token
context (65 pages of 4 tokens), decoding its queries with flashcore dense, streaming, topk (scored by the page
bounds or by the key signs) and topk with rerank (the exact second stage) at budgets of 1/16 to 1/2 of the context.

The model and task come from scripts/train_retrieval_model.py (weights in tests/data/retrieval_llama, float16,
reproduced by that script); the realistic page size (16 tokens) is tested on 1K and 4K contexts at the end. Prefill is dense; every query is answered in a decode step (1 or 2 new tokens), where the
sparse policy picks the pages. Run with `-s` to see the accuracy table.
"""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

import flashcore_hf as fc
from flashcore_hf import CACHE_KWARG

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "tests" / "data" / "retrieval_llama"
PAGE_SIZE = 4
NUM_PROMPTS, NUM_QUERIES = 32, 16
BUDGET_FRACTIONS = (16, 8, 4, 2)   # budget = context tokens / fraction


def _script():
    path = ROOT / "scripts" / "train_retrieval_model.py"
    spec = importlib.util.spec_from_file_location("train_retrieval_model", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


SCRIPT = _script()
TASK = SCRIPT.RetrievalTask()             # the task of tests/data/retrieval_llama: 256 keys
CONTEXT_TOKENS = TASK.eval_records + 2    # BOS, records, SEP


def sparse_config(policy: str, fraction: int) -> fc.SparseConfig:
    """A policy of SCRIPT.POLICIES at a budget of CONTEXT_TOKENS / fraction (1 sink, 1 recent token, no dense layer)."""
    return SCRIPT.sparse_config(policy, CONTEXT_TOKENS // fraction)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LlamaForCausalLM.from_pretrained(WEIGHTS, attn_implementation="flashcore", dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompts():
    """Held-out prompts (a seed the training never used): tokens [NUM_PROMPTS, L], answer columns [NUM_QUERIES]."""
    return TASK.make_batch(NUM_PROMPTS, TASK.eval_records, NUM_QUERIES, torch.Generator().manual_seed(20261121))


def answer_logits(model, tokens, answers, sparse: fc.SparseConfig | None, page_size: int = PAGE_SIZE,
                  context: int = CONTEXT_TOKENS):
    """SCRIPT.answer_logits: dense prefill of the context, then every query answered in a decode step."""
    return SCRIPT.answer_logits(model, tokens, answers, sparse, page_size, context)


def accuracy(model, prompts, sparse, page_size: int = PAGE_SIZE, context: int = CONTEXT_TOKENS) -> float:
    return SCRIPT.answer_accuracy(model, prompts, sparse, page_size, context)


def test_retrieval_accuracy_dense_vs_streaming_vs_topk(model, prompts):
    table = SCRIPT.policy_table(model, TASK, prompts, PAGE_SIZE, BUDGET_FRACTIONS)
    chance = 1 / SCRIPT.NUM_VALUES
    print()
    SCRIPT.print_policy_table(table, TASK, PAGE_SIZE, BUDGET_FRACTIONS,
                              f"{NUM_PROMPTS} prompts x {NUM_QUERIES} queries")
    dense = table[("dense", 1)]
    assert dense >= 0.95
    assert table[("topk", 8)] >= dense - 0.05                        # topk near dense at 1/8 of the context
    assert table[("topk", 2)] >= dense - 0.02
    for fraction in BUDGET_FRACTIONS:                                # streaming sees only sinks + recent pages
        assert table[("streaming", fraction)] <= chance + 1.2 / fraction
        assert table[("topk", fraction)] >= table[("streaming", fraction)] + 0.25
        assert table[("topk_rerank", fraction)] >= max(table[("topk", fraction)], dense - 0.05)   # exact 2nd stage
        assert table[("topk_signs", fraction)] >= max(table[("topk", fraction)], dense - 0.05)    # signs' estimate


def test_pages_of_many_keys_need_the_exact_second_stage(model, prompts):
    """16-token pages (17 for the context) at a 1/4 budget (4 pages: the sink, the recent page and two chosen): each
    page's element-wise bounds cover 16 unrelated records, so the bounds alone rank pages poorly (Quest's weakness at
    realistic page sizes); the exact scores of 4 x budget candidates find the queried record's page."""
    config = {policy: SCRIPT.sparse_config(policy, CONTEXT_TOKENS // 4) for policy in ("topk", "topk_rerank")}
    dense = accuracy(model, prompts, None, 16)
    topk = accuracy(model, prompts, config["topk"], 16)
    rerank = accuracy(model, prompts, config["topk_rerank"], 16)
    print(f"\n16-token pages, budget 1/4: dense {dense:.3f}, topk {topk:.3f}, topk rerank=4 {rerank:.3f}")
    assert rerank >= dense - 0.05 and rerank >= topk + 0.25


def test_budget_covering_the_context_is_exactly_dense(model, prompts):
    tokens, answers = prompts
    dense = answer_logits(model, tokens[:4], answers, None)
    for policy in ("topk", "streaming"):
        whole = fc.SparseConfig(policy=policy, token_budget=4 * CONTEXT_TOKENS, sink_tokens=1, recent_tokens=1,
                                dense_layers=0)
        assert torch.equal(answer_logits(model, tokens[:4], answers, whole), dense)


@torch.no_grad()
@pytest.mark.parametrize("policy", ["topk", "topk_signs"])
def test_generate_uses_the_policy_explicit_cache_and_default_options(model, prompts, policy):
    """generate() decodes through the sparse policy both with an explicit PagedKVCache(..., sparse=...) and with
    the automatic cache configured by set_default_cache_options(sparse=...); both agree with the manual decode."""
    tokens, answers = prompts
    config = sparse_config(policy, 8)
    prompt = tokens[:8, :answers[0]]                                 # records + SEP + the first key
    manual = answer_logits(model, tokens[:8], answers[:1], config)[:, 0].argmax(-1)

    cache = fc.PagedKVCache(model.config, page_size=PAGE_SIZE, sparse=config)
    model(prompt[:, :CONTEXT_TOKENS], **{CACHE_KWARG: cache})          # dense prefill; generate decodes the key
    out = model.generate(prompt, **{CACHE_KWARG: cache}, max_new_tokens=1, do_sample=False)
    assert torch.equal(out[:, -1], manual)

    previous = fc.set_default_cache_options()
    try:
        fc.set_default_cache_options(page_size=PAGE_SIZE, sparse=config)
        generated = model.generate(prompt[:, :CONTEXT_TOKENS], max_new_tokens=2, do_sample=False,
                                   return_dict_in_generate=True)
        assert getattr(generated, CACHE_KWARG).sparse == config
    finally:
        fc.set_default_cache_options(page_size=previous["page_size"], sparse=previous["sparse"] or fc.SparseConfig())


# ---- a 1K-token context in 16-token pages (tests/data/retrieval_llama_1k: 1,024 keys, head dim 64) -----------------

WEIGHTS_1K = ROOT / "tests" / "data" / "retrieval_llama_1k"


@pytest.fixture(scope="module")
def model_1k():
    return LlamaForCausalLM.from_pretrained(WEIGHTS_1K, attn_implementation="flashcore", dtype=torch.float32).eval()


def test_16_token_pages_over_a_1k_context(model_1k):
    """The realistic page size on a longer context: 1,026 tokens in 65 pages of 16, one record among 1,024 per query,
    both layers sparse. The bounds alone (Quest) lose most queries at every budget; the exact second stage
    (rerank=4) is as good as dense at 1/4 and far better than the bounds below it. Measured (16 prompts x 8
    queries): topk 0.133 / 0.273 / 0.586 at 1/16 / 1/8 / 1/4, rerank=4 0.469 / 0.812 / 1.000, dense 1.000; scored
    by the key signs 0.602 / 0.992 / 1.000, with rerank=4 0.656 / 1.000 / 1.000. At 1/16 (the sink page, the recent
    page and two chosen pages) even exact scores of every page reach only 0.66."""
    task = SCRIPT.RetrievalTask.of_model(model_1k.config)
    prompts = task.make_batch(16, task.eval_records, 8, torch.Generator().manual_seed(20261201))
    table = SCRIPT.policy_table(model_1k, task, prompts, 16, (16, 8, 4))
    dense = table[("dense", 1)]
    print()
    SCRIPT.print_policy_table(table, task, 16, (16, 8, 4), "16 prompts x 8 queries")
    assert dense >= 0.9
    assert table[("topk_rerank", 4)] >= 0.95 * dense
    for fraction in (16, 8, 4):
        assert table[("topk_rerank", fraction)] >= table[("topk", fraction)] + 0.25
        assert table[("topk", fraction)] >= table[("streaming", fraction)]
        assert table[("topk_signs", fraction)] >= table[("topk", fraction)] + (0.3 if fraction > 4 else 0.0)
    assert table[("topk_signs", 8)] >= 0.95 * dense


# ---- a 4K-token context in 16-token pages (tests/data/retrieval_llama_4k: 4,096 keys, head dim 64, hidden 64) -------

WEIGHTS_4K = ROOT / "tests" / "data" / "retrieval_llama_4k"


def test_16_token_pages_over_a_4k_context():
    """The issue's size: 4,098 tokens in 257 pages of 16, one record among 4,096 per query, both layers sparse.
    Measured with `python scripts/train_retrieval_model.py --evaluate tests/data/retrieval_llama_4k --prompts 8`
    (8 prompts x 16 queries; dense 0.992), at 1/4 / 1/8 / 1/16 / 1/32: streaming 0.320 / 0.117 / 0.078 / 0.055,
    topk (bounds) 0.539 / 0.266 / 0.156 / 0.125, topk rerank=4 1.000 / 0.766 / 0.484 / 0.250; with the key signs
    0.992 / 0.984 / 0.953 / 0.859, and with rerank=4 1.000 / 0.984 / 0.992 / 0.977. This smaller table keeps the
    separation of the policies and the signs' target (>= 95% of dense at 1/16)."""
    model = LlamaForCausalLM.from_pretrained(WEIGHTS_4K, attn_implementation="flashcore", dtype=torch.float32).eval()
    task = SCRIPT.RetrievalTask.of_model(model.config)
    prompts = task.make_batch(8, task.eval_records, 8, torch.Generator().manual_seed(20261201))
    table = SCRIPT.policy_table(model, task, prompts, 16, (16, 4))
    print()
    SCRIPT.print_policy_table(table, task, 16, (16, 4), "8 prompts x 8 queries")
    dense = table[("dense", 1)]
    assert dense >= 0.9
    assert table[("topk_rerank", 4)] >= 0.95 * dense
    assert table[("topk_signs", 16)] >= 0.95 * dense
    for fraction in (16, 4):
        assert table[("topk_rerank", fraction)] >= table[("topk", fraction)] + 0.15
        assert table[("topk", fraction)] >= table[("streaming", fraction)]
        assert table[("topk_signs", fraction)] >= table[("topk", fraction)] + 0.3
        assert table[("topk_signs_rerank", fraction)] >= max(table[("topk_signs", fraction)], 0.95 * dense)
