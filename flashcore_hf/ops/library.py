"""Python wrappers of the `flashcore` op library (torch.ops.flashcore.*), with fake kernels for torch.compile.

The ops are declared once in C++ (csrc/bindings/ops.cpp) with a CPU implementation and, when built with CUDA, a
CUDA implementation under the same names. These wrappers resolve defaults and give the documented signatures;
paged attention itself goes through a plan (plan.py).
"""
from __future__ import annotations

import torch

from .. import _ext  # noqa: F401  (loads the extension, registering torch.ops.flashcore)
from ..layout import PageLayout

_ops = torch.ops.flashcore


def build_layout(token_to_page: torch.Tensor, seq_starts: torch.Tensor, seq_ends: torch.Tensor,
                 page_resident_bitmap: torch.Tensor, page_tokens: int = 128, num_pages: int = 1024) -> PageLayout:
    """Page lists of a batch from the physical page of every token.

    token_to_page [T] int32: physical page of each token of the flattened batch.
    seq_starts, seq_ends [B] int32: sequence b owns tokens [seq_starts[b], seq_ends[b]).
    page_resident_bitmap [num_pages] bool: True where the page is in device memory.
    page_tokens: tokens per page (a sequence cannot have more tokens than this on one page).
    num_pages: number of physical pages (page ids must lie in [0, num_pages)).

    Returns a PageLayout: for each sequence the distinct pages its tokens touch, in order of first touch;
    token_counts[j] = how many of the sequence's tokens are on page cols[j]; staging_ids[j] = -1 for a resident page,
    else the page's slot in a staging buffer, numbered 0, 1, ... in order of first appearance over the whole batch
    (a page shared by several sequences is staged once). Runs on the CPU; tensors on another device are copied
    to the CPU (a host sync) and the result is moved back.
    """
    device = token_to_page.device
    cpu = lambda t: t.cpu() if isinstance(t, torch.Tensor) else t  # noqa: E731
    result = _ops.build_layout(cpu(token_to_page), cpu(seq_starts), cpu(seq_ends), cpu(page_resident_bitmap),
                               int(page_tokens), int(num_pages))
    layout = PageLayout(*result)
    return layout if device.type == "cpu" else layout.to(device)


def append_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              slot_mapping: torch.Tensor, key_bounds: torch.Tensor | None = None,
              key_signs: torch.Tensor | None = None) -> None:
    """Write new tokens' K/V into page slots, in place; with key_bounds, also fold the new keys into their pages'
    bounds (and sign bits), in the same kernel on CUDA (a sparse layer's decode step).

    k_cache, v_cache [num_pages, page_size, Hkv, D] contiguous; k, v [T, Hkv, D] (same dtype, last dim contiguous);
    slot_mapping [T] int32/int64: slot = page * page_size + offset; a negative slot skips that token (padding).
    key_bounds [num_bound_rows, Hkv, 2 * D] (as in select_pages; bfloat16 only with bfloat16 keys), in place: a token
    at offset 0 of its page starts the page's bounds over, at offset > 0 it widens them, so pages must fill in slot
    order and the slots must name distinct pages (a decode step: one new token per sequence); pages without a row
    are skipped. key_signs [num_bound_rows, Hkv, page_size, ceil(D / 8)] uint8 (PageKeySummaries.signs; needs
    key_bounds): bit b of byte j of [page, h, offset] becomes (key channel 8 j + b) > 0 for each new token.
    """
    _ops.append_kv(k_cache, v_cache, k, v, slot_mapping, key_bounds, key_signs)


def select_pages(q: torch.Tensor, bounds: torch.Tensor, table_pages: torch.Tensor, table_counts: torch.Tensor,
                 table_bias: torch.Tensor, budget: int, query_len: int = 1, head_reduction: str = "max",
                 signs: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """"topk" page selection of one decode step of one layer: (cols, counts) [B, Hkv, budget] int32.

    q [B * query_len, Hq, D]: the step's packed queries (last dim contiguous).
    bounds [num_pages, Hkv, 2 * D] float32 / bfloat16: row `page` holds the page's element-wise key max
        ([..., :D]) and min ([..., D:]) (flashcore_hf.sparse.PageKeySummaries).
    table_pages / table_counts [B, M] int32, table_bias [B, M] float32: each sequence's pages, their valid tokens,
        and +inf (always keep) / -inf (never: entries past the sequence's end) / 0 (flashcore_hf.sparse.
        PaddedPageTable).
    signs [num_pages, Hkv, P, ceil(D / 8)] uint8 or None: each key's sign bits (PageKeySummaries.signs).
    Each page of (sequence b, kv head h) scores bias + reduce_g s_g over the query_len * Hq / Hkv query heads g of h
    (reduce: "max" or "sum"), where s_g is, without signs, sum_d relu(q_g,d) * max_d + min(q_g,d, 0) * min_d (an
    upper bound of q_g . k on the page, Quest), and with signs the largest over the page's valid keys k (the first
    min(count, P)) of sum_d q_g,d * (max_d if k_d > 0 else min_d) (each key estimated from its signs).
    Row (b, h) lists the `budget` (1 <= budget <= M) best entries' pages and counts in table order (key order);
    ties go to the lower index. No host sync on CUDA (CUDA-graph safe).
    """
    return _ops.select_pages(q, bounds, table_pages, table_counts, table_bias, int(budget), int(query_len),
                             head_reduction, signs)


def candidate_page_scores(q: torch.Tensor, k_cache: torch.Tensor, cols: torch.Tensor, counts: torch.Tensor,
                          forced_pages: torch.Tensor, query_len: int = 1) -> torch.Tensor:
    """Exact scores of candidate pages (the second stage of "topk" with rerank): scores [B, Hkv, C] float32.

    q [B * query_len, Hq, D] (last dim contiguous); k_cache [num_pages, page_size, Hkv, D] contiguous, q's dtype;
    cols / counts [B, Hkv, C] int32: each (sequence, kv head)'s candidate pages and their valid tokens;
    forced_pages [B, F] int32: page ids kept whatever their score (-1: none).
    Candidate c of (b, h) scores -inf when its count is <= 0 or its page id is outside the pool, +inf when the page
    is one of b's forced pages, else the largest q_g . k_t (fp32) over h's query_len * Hq / Hkv query heads g and the
    page's first min(count, page_size) keys t. One kernel on CUDA (no host sync, CUDA-graph safe).
    """
    return _ops.candidate_page_scores(q, k_cache, cols, counts, forced_pages, int(query_len))


def select_candidate_pages(scores: torch.Tensor, cols: torch.Tensor, counts: torch.Tensor,
                           budget: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rerank stage's pick: of each row's candidates, the `budget` with the largest score, as (cols, counts)
    [..., budget] int32 in candidate order (key order when the candidates are).

    scores [..., C] float32 (`candidate_page_scores`); cols / counts [..., C] int32: the candidates' page ids and
    valid tokens, copied for the picked entries. 1 <= budget <= C. Ties go to the lower index; scores order as IEEE
    total order (-NaN < -inf < ... < -0 < +0 < ... < +inf < +NaN). One kernel on CUDA (the radix select of
    `select_pages`; no host sync, CUDA-graph safe).
    """
    return _ops.select_candidate_pages(scores, cols, counts, int(budget))


def grouped_linear(x: torch.Tensor, weights: list[torch.Tensor],
                   biases: list[torch.Tensor | None] | None = None) -> list[torch.Tensor]:
    """Linear layers that share their input: [F.linear(x, weights[i], biases[i]) for each i], in one kernel on CUDA.

    x [..., k] float16 / bfloat16 (float32 on the CPU); weights [n_i, k] and biases [n_i] (or None) in x's dtype, on
    x's device. Returns [..., n_i] per weight in x's dtype. On CUDA all weights are read in one launch with fp32
    accumulation when a kernel measured faster than cuBLAS for the call: at most 2 tokens (the rows of a decode step),
    a GEMV kernel (it keeps enough loads in flight for small matrices such as k/v projections), except a single weight
    over 128 MiB; 3-64 tokens and 3+ weights (q/k/v of a batched step) on compute capability 9.0, a tensor-core kernel
    (TMA + wgmma). Otherwise, and on the CPU, it is torch's linear per weight (the same results bit for bit); on CUDA
    at up to 128 tokens the weights after the first run on a side stream beside it, joined before the call returns.
    """
    return list(_ops.grouped_linear(x, list(weights), list(biases) if biases is not None else [None] * len(weights)))


def kernel_supports(device: torch.device | str, dtype: torch.dtype, head_dim: int, page_size: int, max_q_len: int,
                    num_q_heads: int = 1, num_kv_heads: int = 1) -> bool:
    """Whether the compiled kernels for `device` handle this configuration (no device work, no sync).

    CPU: float32/float16/bfloat16, any head_dim <= 256, any page_size. CUDA: what the decode (max_q_len <= 16) or
    prefill kernels accept; False when the extension was built without CUDA kernels.
    """
    device_type = torch.device(device).type
    return bool(_ops.kernel_supports(device_type, dtype, int(head_dim), int(page_size), int(max_q_len),
                                     int(num_q_heads), int(num_kv_heads)))


# ---- fake kernels (shapes only), so torch.compile / opcheck can trace the ops ----------------------------------

@torch.library.register_fake("flashcore::build_layout")
def _build_layout_fake(token_to_page, seq_starts, seq_ends, page_resident_bitmap, page_tokens, num_pages):
    nnz = torch.library.get_ctx().new_dynamic_size()
    make = lambda n: token_to_page.new_empty((n,), dtype=torch.int32)  # noqa: E731
    return make(seq_starts.shape[0] + 1), make(nnz), make(nnz), make(nnz)


@torch.library.register_fake("flashcore::paged_attention")
def _paged_attention_fake(q, k_cache, v_cache, row_offsets, cols, token_counts, q_indptr, causal, sm_scale, window,
                          softcap, sinks, plan, workspace):
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    return out, lse


def _no_setup(ctx, inputs, output) -> None:
    pass


def _no_backward(ctx, grad_out, grad_lse):
    raise RuntimeError("flashcore::paged_attention has no backward pass: FlashCore is inference-only. Run the "
                       "forward under torch.no_grad() / torch.inference_mode(), or train with attn_implementation="
                       "'sdpa'.")


# Forward works with inputs that require grad (eval scripts often skip no_grad); a backward through it must fail
# loudly instead of torch's default of silently treating the op as constant.
torch.library.register_autograd("flashcore::paged_attention", _no_backward, setup_context=_no_setup)


@torch.library.register_fake("flashcore::append_kv")
def _append_kv_fake(k_cache, v_cache, k, v, slot_mapping, key_bounds=None, key_signs=None):
    return None


@torch.library.register_fake("flashcore::merge_attention_states")
def _merge_attention_states_fake(out_a, lse_a, out_b, lse_b, sinks, a_rows):
    return torch.empty_like(out_b)


@torch.library.register_fake("flashcore::select_pages")
def _select_pages_fake(q, bounds, table_pages, table_counts, table_bias, budget, query_len, head_reduction,
                       signs=None):
    shape = (table_pages.shape[0], bounds.shape[1], budget)
    return table_pages.new_empty(shape), table_pages.new_empty(shape)


@torch.library.register_fake("flashcore::candidate_page_scores")
def _candidate_page_scores_fake(q, k_cache, cols, counts, forced_pages, query_len):
    return cols.new_empty(cols.shape, dtype=torch.float32)


@torch.library.register_fake("flashcore::select_candidate_pages")
def _select_candidate_pages_fake(scores, cols, counts, budget):
    shape = (*scores.shape[:-1], budget)
    return cols.new_empty(shape), cols.new_empty(shape)


@torch.library.register_fake("flashcore::grouped_linear")
def _grouped_linear_fake(x, weights, biases):
    return [x.new_empty((*x.shape[:-1], w.shape[0])) for w in weights]
